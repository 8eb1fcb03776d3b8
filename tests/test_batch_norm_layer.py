"""nn.BatchNorm: running statistics (PyTorch's convention), train/eval modes, state kept out of the gradient and
the optimizer, updated inside the jitted step, and a BN network's gradient equal to autodiff's."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxconv
from jaxconv import nn, train
from jaxconv.nn import models
from jaxconv.verify import check_vjp


def _bn(momentum=0.1, eps=1e-5):
    init, apply = nn.BatchNorm(momentum=momentum, eps=eps)
    _, params = init(jax.random.key(0), (-1, 3, 4, 5))
    return init, apply, params


def test_running_statistics_follow_pytorch():
    """running <- (1 - m) running + m batch, with the unbiased batch variance for the running variance."""
    _, apply, params = _bn(momentum=0.3)
    rng = np.random.default_rng(0)
    running_mean, running_var = np.zeros(5), np.ones(5)
    for _ in range(3):
        x = rng.normal(2.0, 3.0, (6, 3, 4, 5)).astype(np.float32)
        y, params = nn.train_apply(apply, params, x)
        flat = x.reshape(-1, 5).astype(np.float64)
        running_mean = 0.7 * running_mean + 0.3 * flat.mean(0)
        running_var = 0.7 * running_var + 0.3 * flat.var(0, ddof=1)
        np.testing.assert_allclose(params["batch_stats"]["mean"], running_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(params["batch_stats"]["var"], running_var, rtol=1e-5)
        # Training mode normalises with the batch's own (biased) statistics.
        expected = (flat - flat.mean(0)) / np.sqrt(flat.var(0) + 1e-5)
        np.testing.assert_allclose(np.asarray(y).reshape(-1, 5), expected, rtol=1e-4, atol=1e-5)


def test_eval_mode_uses_the_running_statistics():
    _, apply, params = _bn()
    params = dict(
        params,
        scale=jnp.arange(1.0, 6.0),
        offset=jnp.full(5, 0.5),
        batch_stats={"mean": jnp.linspace(-1, 1, 5), "var": jnp.linspace(0.5, 2.0, 5)},
    )
    x = np.random.default_rng(1).normal(size=(2, 3, 4, 5)).astype(np.float32)
    expected = (x - np.linspace(-1, 1, 5)) / np.sqrt(np.linspace(0.5, 2.0, 5) + 1e-5) * np.arange(1, 6) + 0.5
    np.testing.assert_allclose(apply(params, x), expected, rtol=1e-5, atol=1e-6)
    # The default mode is evaluation: one image gives the same answer alone or in a batch.
    np.testing.assert_allclose(apply(params, x[:1]), apply(params, x)[:1], rtol=1e-6)


def test_partition_and_merge_round_trip():
    init, _ = models.resnet_small(10)
    _, params = init(jax.random.key(0), (-1, 8, 8, 1))
    trainable, state = nn.partition_state(params)
    assert jax.tree_util.tree_structure(nn.merge_state(trainable, state)) == jax.tree_util.tree_structure(params)
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    assert names and all("batch_stats" in n for n in names)
    assert not any(
        "batch_stats" in jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(trainable)[0]
    )
    # A network without state: trainable is params, unchanged; the state has no leaves.
    init, _ = models.lenet5(10)
    _, plain = init(jax.random.key(0), (-1, 8, 8, 1))
    t, s = nn.partition_state(plain)
    assert jax.tree_util.tree_structure(t) == jax.tree_util.tree_structure(plain) and not jax.tree.leaves(s)


def test_the_step_updates_statistics_without_gradient_or_decay():
    """Running statistics change only by the momentum formula: no gradient, no weight decay, no optimizer."""
    init, apply = nn.serial(
        nn.Conv(4, 3, padding="SAME", bias=False), nn.BatchNorm(momentum=0.5), nn.Relu, nn.Flatten, nn.Dense(3)
    )
    _, params = init(jax.random.key(1), (-1, 5, 5, 2))
    optimizer = train.make_optimizer("momentum", 0.5, weight_decay=0.3)
    opt_state = train.init_optimizer(optimizer, params)
    x = np.random.default_rng(2).normal(size=(8, 5, 5, 2)).astype(np.float32)
    y = np.arange(8, dtype=np.int32) % 3
    step = train.make_train_step(apply, optimizer)
    new_params, _, _ = step(params, opt_state, (x, y))
    conv_out = np.asarray(jaxconv.conv2d(x, params[0]["w"], padding="SAME"), np.float64).reshape(-1, 4)
    np.testing.assert_allclose(new_params[1]["batch_stats"]["mean"], 0.5 * conv_out.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new_params[1]["batch_stats"]["var"], 0.5 + 0.5 * conv_out.var(0, ddof=1), rtol=1e-5)
    assert not np.array_equal(new_params[1]["scale"], params[1]["scale"])  # the weights did train
    # The optimizer state covers the weights only.
    assert not any(
        "batch_stats" in jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(opt_state)[0]
    )


def test_a_bn_network_gradient_equals_autodiff_float64():
    """The whole training-mode network, hand rules (batch_norm's included) vs the plain-lax reference."""
    init, apply = models.resnet_small(4, widths=(4, 6))
    with jax.enable_x64(True):
        _, params = init(jax.random.key(3), (-1, 6, 6, 2))
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        # Non-trivial scales everywhere (the zero-initialised ones would hide a branch).
        leaves, tree = jax.tree.flatten(params)
        rng = np.random.default_rng(4)
        params = jax.tree.unflatten(
            tree, [jnp.asarray(rng.normal(size=np.shape(a)) * 0.5 + (a if a.ndim == 1 else 0)) for a in leaves]
        )
        x = jnp.asarray(rng.normal(size=(5, 6, 6, 2)))

        def net(ops):
            return lambda p, images: apply(p, images, ops=ops, train=True)

        check_vjp(
            net(None),
            net(jaxconv.reference),
            params,
            x,
            names=["params", "x"],
            finite_differences=False,
            second_order=False,
            name="resnet_small with BN, training mode",
        ).assert_ok()


def test_train_apply_under_jit_equals_eager_and_leaves_stateless_networks_alone():
    _, apply, params = _bn()
    x = np.random.default_rng(5).normal(size=(4, 3, 4, 5)).astype(np.float32)
    eager = nn.train_apply(apply, params, x)
    jitted = jax.jit(lambda p, v: nn.train_apply(apply, p, v))(params, x)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    calls = []

    def plain(p, v):  # an apply_fun that takes no keywords at all
        calls.append(1)
        return v * p

    y, same = nn.train_apply(plain, 2.0, x)
    assert same == 2.0 and calls and np.allclose(y, 2 * x)


def test_bad_settings_and_shared_statistics_are_refused():
    for kwargs, match in (
        ({"momentum": 0.0}, "momentum"),
        ({"momentum": 1.5}, "momentum"),
        ({"eps": 0.0}, "eps"),
        ({"eps": float("nan")}, "eps"),
    ):
        with pytest.raises(ValueError, match=match):
            nn.BatchNorm(**kwargs)
    init, _ = nn.BatchNorm()
    with pytest.raises(ValueError, match="input_shape"):
        init(jax.random.key(0), (-1,))
    _, apply = nn.serial(nn.BatchNorm(), nn.BatchNorm())
    _, _, one = _bn()
    with pytest.raises(ValueError, match="two layers"):
        nn.train_apply(apply, [one, one], np.ones((2, 3, 4, 5), np.float32))


def test_resnet_small_has_bn_and_the_no_bn_variant_has_none():
    for name, expect in (("resnet_small", True), ("resnet_small_nobn", False)):
        init, _ = models.MODELS[name](10)
        _, params = init(jax.random.key(0), (-1, 8, 8, 1))
        assert nn.has_state(params) is expect
    opt = optax.sgd(0.1)
    init, apply = models.resnet_small_nobn(10)
    _, params = init(jax.random.key(0), (-1, 8, 8, 1))
    assert jax.tree_util.tree_structure(train.init_optimizer(opt, params)) == jax.tree_util.tree_structure(
        opt.init(params)
    )
