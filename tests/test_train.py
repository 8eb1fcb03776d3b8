"""jaxconv.train: the SGD step, evaluation, determinism, and 4 fake CPU devices equal to 1."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxconv
from jaxconv import nn, reference, train
from jaxconv.nn import models


def _digits(n=None, standardise=True):
    """sklearn's bundled 8x8 digits, the fixed stratified 1437/360 split, standardised or in [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]
    labels = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(images, labels, test_size=360, random_state=0, stratify=labels)
    if standardise:
        x_train, x_test = train.standardize(x_train, x_test)
    return x_train[:n], y_train[:n], x_test, y_test


def _small_model():
    return nn.serial(nn.Conv(4, 3), nn.Relu, nn.MaxPool(2), nn.Flatten, nn.Dense(10))


def _run(apply, params, x, y, *, steps, batch_size=32, seed=0, mesh=None, l2=1e-4, optimizer=None):
    optimizer = optimizer or train.default_optimizer(0.05, 0.9, 5e-4)
    step = train.make_train_step(apply, optimizer, l2=l2, mesh=mesh)
    opt_state = train.init_optimizer(optimizer, params)
    history = []
    done = 0
    for epoch in range(10**6):
        for idx in train.epoch_batches(len(x), batch_size, seed=seed, epoch=epoch):
            batch = (x[idx], y[idx])
            if mesh is not None:
                batch = train.shard_batch(batch, mesh)
            params, opt_state, metrics = step(params, opt_state, batch)
            history.append({k: float(v) for k, v in metrics.items()})
            done += 1
            if done == steps:
                return params, opt_state, history


# --- the optimizer ---------------------------------------------------------------------


def test_default_optimizer_is_sgd_momentum_with_coupled_weight_decay():
    lr, momentum, wd = 0.1, 0.9, 0.01
    optimizer = train.default_optimizer(lr, momentum, wd)
    w = {"w": jnp.array([1.0, -2.0])}
    state = optimizer.init(w)
    velocity = np.zeros(2)
    expected = np.array([1.0, -2.0])
    for g in ([0.5, 0.25], [-1.0, 2.0], [0.0, 0.0]):
        updates, state = optimizer.update({"w": jnp.array(g)}, state, w)
        w = optax.apply_updates(w, updates)
        velocity = momentum * velocity + (np.array(g) + wd * expected)
        expected = expected - lr * velocity
        np.testing.assert_allclose(w["w"], expected, rtol=1e-12)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(learning_rate=0.0), r"`learning_rate` \(=0.0\)"),
        (dict(learning_rate=-1), r"`learning_rate` \(=-1\)"),
        (dict(momentum=float("nan")), r"`momentum` \(=nan\)"),
        (dict(weight_decay=-1e-4), r"`weight_decay` \(=-0.0001\)"),
        (dict(momentum="0.9"), r"`momentum` \(='0.9'\)"),
    ],
)
def test_default_optimizer_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        train.default_optimizer(**kwargs)


# --- the step ------------------------------------------------------------------------------


def test_a_short_training_run_lowers_the_loss():
    x, y, x_test, y_test = _digits(256)
    init, apply = _small_model()
    _, params = train.init_params(init, x.shape, seed=0)
    before = train.evaluate(apply, params, x_test, y_test)
    params, _, history = _run(apply, params, x, y, steps=40)
    after = train.evaluate(apply, params, x_test, y_test)
    first, last = np.mean([h["loss"] for h in history[:5]]), np.mean([h["loss"] for h in history[-5:]])
    assert last < 0.3 * first
    assert after["loss"] < 0.3 * before["loss"] and after["accuracy"] > 0.8 > before["accuracy"]


def test_step_metrics_and_the_l2_objective():
    x, y, _, _ = _digits(32)
    init, apply = _small_model()
    _, params = train.init_params(init, x.shape)
    lam = 1e-2
    step = train.make_train_step(apply, optax.sgd(0.0), l2=lam)
    new_params, _, metrics = step(params, optax.sgd(0.0).init(params), (x, y))
    logits = apply(params, x)
    cross_entropy = jaxconv.softmax_cross_entropy(logits, y)
    assert set(metrics) == {"loss", "objective", "accuracy", "finite_loss", "finite_params"}
    assert bool(metrics["finite_loss"]) and bool(metrics["finite_params"])
    np.testing.assert_allclose(metrics["loss"], cross_entropy, rtol=1e-6)
    np.testing.assert_allclose(metrics["objective"], cross_entropy + jaxconv.l2_penalty(params, lam), rtol=1e-6)
    np.testing.assert_allclose(metrics["accuracy"], np.mean(np.argmax(logits, -1) == y), rtol=0)
    assert all(jnp.array_equal(a, b) for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(params)))


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_step_flags_a_non_finite_loss_and_non_finite_parameters():
    x, y, _, _ = _digits(32)
    init, apply = _small_model()
    _, params = train.init_params(init, x.shape)
    step = train.make_train_step(apply, optax.sgd(0.1))
    poisoned = np.array(x)
    poisoned[3, 2, 2, 0] = np.nan  # one NaN pixel in the batch
    _, _, metrics = step(params, optax.sgd(0.1).init(params), (poisoned, y))
    assert not bool(metrics["finite_loss"]) and not bool(metrics["finite_params"])

    huge = train.make_train_step(apply, optax.sgd(1e300))
    new_params, _, metrics = huge(params, optax.sgd(1e300).init(params), (x, y))
    assert bool(metrics["finite_loss"]) and not bool(metrics["finite_params"])  # the loss was taken before the update
    assert train.nonfinite_leaves(new_params) and not train.nonfinite_leaves(params)
    assert bool(train.all_finite(params)) and not bool(train.all_finite(new_params))
    assert bool(train.all_finite({"step": jnp.asarray(3)}))  # integer leaves are always finite


def test_standardize_with_stored_statistics():
    x, _, x_test, _ = _digits(64)
    stats = train.standardization(x)
    a, b = train.standardize(x, x_test)
    (c,) = train.standardize(x_test, stats=stats)
    np.testing.assert_array_equal(b, c)
    with pytest.raises(ValueError, match=r"standard deviation 0.0"):
        train.standardization(np.ones((4, 8, 8, 1)))
    with pytest.raises(ValueError, match=r"`stats`"):
        train.standardize(x, stats=(0.0, 0.0))


def test_step_equals_autodiff_of_the_reference_objective():
    """One step of the hand rules lands where autodiff of the plain-lax model and loss lands (float64)."""
    rng = np.random.default_rng(0)
    init, apply = models.lenet5()
    _, params = train.init_params(init, (8, 8, 8, 1), seed=1)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
    x = rng.standard_normal((8, 8, 8, 1))
    y = rng.integers(0, 10, 8).astype(np.int32)
    optimizer = train.default_optimizer(0.1, 0.9, 1e-3)
    lam = 1e-3
    hand, _, _ = train.make_train_step(apply, optimizer, l2=lam)(params, optimizer.init(params), (x, y))

    def objective(p):
        return reference.softmax_cross_entropy(apply(p, x, ops=reference), y) + reference.l2_penalty(p, lam)

    updates, _ = optimizer.update(jax.grad(objective)(params), optimizer.init(params), params)
    expected = optax.apply_updates(params, updates)
    for a, e in zip(jax.tree.leaves(hand), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, e, rtol=1e-12, atol=1e-14)


def test_any_optax_optimizer():
    x, y, _, _ = _digits(64)
    init, apply = _small_model()
    _, params = train.init_params(init, x.shape)
    _, state, history = _run(apply, params, x, y, steps=12, optimizer=optax.adam(3e-3))
    assert history[-1]["loss"] < history[0]["loss"]
    assert isinstance(state[0], optax.ScaleByAdamState)


def test_deterministic_for_a_fixed_seed():
    x, y, _, _ = _digits(96)
    init, apply = models.MODELS["resnet_small"](widths=(4, 8))
    results = []
    for _ in range(2):
        _, params = train.init_params(init, x.shape, seed=7)
        params, _, history = _run(apply, params, x, y, steps=4, seed=7)
        results.append((params, history))
    assert results[0][1] == results[1][1]
    assert all(jnp.array_equal(a, b) for a, b in zip(jax.tree.leaves(results[0][0]), jax.tree.leaves(results[1][0])))
    _, other = train.init_params(init, x.shape, seed=8)
    assert not jnp.array_equal(other[0]["w"], results[0][0][0]["w"])


# --- data parallel ---------------------------------------------------------------------


@pytest.mark.parametrize("num_devices", [4, 2])
def test_fake_devices_equal_one_device(num_devices):
    assert len(jax.devices()) == 4  # tests/conftest.py's XLA_FLAGS
    x, y, _, _ = _digits(64)
    init, apply = models.alexnet_small(width=4)  # conv, LRN, max pooling: every sharded rule
    _, params = train.init_params(init, x.shape, seed=0)
    single, _, single_history = _run(apply, params, x, y, steps=3, batch_size=16)
    mesh = train.make_mesh(num_devices)
    assert mesh.axis_names == ("batch",) and mesh.size == num_devices
    sharded, opt_state, sharded_history = _run(
        apply, train.replicate(params, mesh), x, y, steps=3, batch_size=16, mesh=mesh
    )
    for a, e in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)):
        assert a.sharding.is_equivalent_to(NamedSharding(mesh, P()), a.ndim)
        np.testing.assert_allclose(a, e, rtol=2e-5, atol=2e-6)
    for a, e in zip(sharded_history, single_history):
        assert a.keys() == e.keys()
        np.testing.assert_allclose([a[k] for k in a], [e[k] for k in a], rtol=2e-5)


def test_mesh_step_takes_unsharded_inputs():
    x, y, _, _ = _digits(8)
    init, apply = _small_model()
    _, params = train.init_params(init, x.shape)
    optimizer = train.default_optimizer()
    mesh = train.make_mesh(4)
    new_params, _, _ = train.make_train_step(apply, optimizer, mesh=mesh)(params, optimizer.init(params), (x, y))
    expected, _, _ = train.make_train_step(apply, optimizer)(params, optimizer.init(params), (x, y))
    for a, e in zip(jax.tree.leaves(new_params), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-7)


def test_shard_batch_and_replicate_placement():
    mesh = train.make_mesh()
    assert mesh.size == 4
    images, labels = train.shard_batch((np.zeros((8, 2, 2, 1), np.float32), np.arange(8, dtype=np.int32)), mesh)
    assert images.sharding == NamedSharding(mesh, P("batch"))
    assert [shard.data.shape for shard in labels.addressable_shards] == [(2,)] * 4
    np.testing.assert_array_equal(labels, np.arange(8))
    tree = train.replicate({"w": np.ones(3)}, mesh)
    assert tree["w"].sharding == NamedSharding(mesh, P())
    assert len(tree["w"].addressable_shards) == 4


def test_indivisible_batch_is_a_clear_error():
    mesh = train.make_mesh(4)
    with pytest.raises(ValueError, match=r"batch size \(=6\) must be divisible by the number of devices.*\(=4\)"):
        train.shard_batch((np.zeros((6, 2)), np.zeros(6, np.int32)), mesh)
    init, apply = _small_model()
    _, params = train.init_params(init, (6, 8, 8, 1))
    optimizer = train.default_optimizer()
    step = train.make_train_step(apply, optimizer, mesh=mesh)
    with pytest.raises(ValueError, match=r"batch size \(=6\)"):
        step(params, optimizer.init(params), (np.zeros((6, 8, 8, 1), np.float32), np.zeros(6, np.int32)))


@pytest.mark.parametrize("bad", [0, 5, -1, 2.0, True])
def test_make_mesh_bad_device_count(bad):
    with pytest.raises(
        ValueError, match=r"`num_devices` \(=" + repr(bad).replace(".", r"\.") + r"\) must be an int in \[1, 4\]"
    ):
        train.make_mesh(bad)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(l2=-1.0), r"`l2` \(=-1.0\)"),
        (dict(l2=float("inf")), r"`l2` \(=inf\)"),
        (dict(optimizer="sgd"), r"`optimizer` \(='sgd'\)"),
        (dict(mesh="batch"), r"`mesh` \(='batch'\)"),
    ],
)
def test_make_train_step_bad_arguments(kwargs, match):
    args = dict(optimizer=optax.sgd(0.1))
    args.update(kwargs)
    optimizer = args.pop("optimizer")
    with pytest.raises(ValueError, match=match):
        train.make_train_step(_small_model()[1], optimizer, **args)


def test_step_bad_batch():
    init, apply = _small_model()
    _, params = train.init_params(init, (4, 8, 8, 1))
    step = train.make_train_step(apply, optax.sgd(0.1))
    with pytest.raises(ValueError, match=r"`batch`: images \(4, 8, 8, 1\) and labels \(3,\)"):
        step(params, optax.sgd(0.1).init(params), (np.zeros((4, 8, 8, 1), np.float32), np.zeros(3, np.int32)))
    with pytest.raises(ValueError, match=r"`batch` must be a pair"):
        step(params, optax.sgd(0.1).init(params), np.zeros((4, 8, 8, 1), np.float32))


# --- evaluate and batches ---------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [7, 50, 512])
def test_evaluate_equals_one_pass(batch_size):
    x, y, _, _ = _digits(50)
    init, apply = _small_model()
    _, params = train.init_params(init, x.shape, seed=3)
    result = train.evaluate(apply, params, x, y, batch_size=batch_size)
    logits = apply(params, x)
    assert set(result) == {"loss", "accuracy"} and all(isinstance(v, float) for v in result.values())
    np.testing.assert_allclose(result["loss"], jaxconv.softmax_cross_entropy(logits, y), rtol=1e-5)
    assert result["accuracy"] == np.mean(np.argmax(logits, -1) == y)


def test_evaluate_bad_arguments():
    init, apply = _small_model()
    _, params = train.init_params(init, (2, 8, 8, 1))
    with pytest.raises(ValueError, match=r"`batch_size` \(=0\)"):
        train.evaluate(apply, params, np.zeros((2, 8, 8, 1)), np.zeros(2, np.int32), batch_size=0)
    with pytest.raises(ValueError, match=r"`labels` \(3,\)"):
        train.evaluate(apply, params, np.zeros((2, 8, 8, 1)), np.zeros(3, np.int32))


def test_epoch_batches():
    first = train.epoch_batches(10, 3, seed=0, epoch=0)
    assert [len(b) for b in first] == [3, 3, 3] and len(set(np.concatenate(first))) == 9
    again = train.epoch_batches(10, 3, seed=0, epoch=0)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(np.concatenate(first), np.concatenate(train.epoch_batches(10, 3, seed=0, epoch=1)))
    full = train.epoch_batches(10, 3, seed=1, epoch=0, drop_last=False)
    assert sorted(np.concatenate(full)) == list(range(10)) and len(full[-1]) == 1
    with pytest.raises(ValueError, match=r"`batch_size` \(=11\) exceeds `num_examples` \(=10\)"):
        train.epoch_batches(10, 11, seed=0, epoch=0)


def test_standardize():
    a, b = train.standardize(np.array([[0.0, 2.0]]), np.array([4.0]))
    np.testing.assert_allclose(a, [[-1.0, 1.0]])
    np.testing.assert_allclose(b, [3.0])
    assert a.dtype == b.dtype == np.float32
    with pytest.raises(ValueError, match=r"standard deviation 0.0"):
        train.standardize(np.ones((3, 2)))


# --- the default recipe -----------------------------------------------------------------


def test_defaults_name_a_model_and_every_hyperparameter():
    keys = {
        "model",
        "epochs",
        "batch_size",
        "optimizer",
        "learning_rate",
        "schedule",
        "warmup_epochs",
        "momentum",
        "weight_decay",
        "l2",
        "val_fraction",
        "augment",
        "seed",
    }
    assert train.DEFAULTS is train.RECIPES["digits"]
    for recipe in train.RECIPES.values():
        assert set(recipe) == keys
        assert recipe["model"] in models.MODELS and recipe["optimizer"] in train.OPTIMIZERS
        assert recipe["schedule"] in train.SCHEDULES


_RECIPE_SCRIPT = """
import json, sys, time
import jax
from jaxconv import train
from jaxconv.nn import models
from tests.test_train import _digits, _run

seed, standardise = int(sys.argv[1]), sys.argv[2] == "True"
d = train.DEFAULTS
x, y, x_test, y_test = _digits(standardise=standardise)
init, apply = models.MODELS[d["model"]]()
_, params = train.init_params(init, x.shape, seed=seed)
steps = d["epochs"] * (len(x) // d["batch_size"])
schedule = train.make_schedule(d["learning_rate"], d["schedule"], total_steps=steps)
optimizer = train.make_optimizer(d["optimizer"], schedule, momentum=d["momentum"], weight_decay=d["weight_decay"])
start = time.perf_counter()
params, _, _ = _run(apply, params, x, y, steps=steps, batch_size=d["batch_size"], seed=seed, l2=d["l2"],
                    optimizer=optimizer)
jax.block_until_ready(params)
seconds = time.perf_counter() - start
print(json.dumps(dict(train.evaluate(apply, params, x_test, y_test), seconds=seconds)))
"""


@pytest.mark.slow
@pytest.mark.parametrize("seed,standardise", [(0, True), (1, True), (0, False)])
def test_digits_recipe(seed, standardise):
    """DEFAULTS train the default model on the digits to >= 97% test accuracy in well under 2 minutes.

    In a fresh process with XLA's default flags (this suite's conftest turns
    LLVM optimisation off, which makes training several times slower), as the
    CLI runs; float32, one device.
    """
    import json
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_ENABLE_X64")}
    done = subprocess.run(
        [sys.executable, "-c", _RECIPE_SCRIPT, str(seed), str(standardise)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"seed {seed}, standardised {standardise}: {result}")
    assert result["accuracy"] >= 0.97
    assert result["seconds"] < 120
