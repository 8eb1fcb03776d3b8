"""Optimizers and schedules by name, the validation split, and in-step augmentation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxconv import train


def test_schedules_warm_up_then_follow_their_shape():
    total, warm = 100, 10
    const = train.make_schedule(0.4, "constant", total_steps=total, warmup_steps=warm)
    cosine = train.make_schedule(0.4, "cosine", total_steps=total, warmup_steps=warm)
    step = train.make_schedule(0.4, "step", total_steps=total, warmup_steps=warm)
    for s in (const, cosine, step):
        assert float(s(0)) == 0.0 and float(s(5)) == pytest.approx(0.2)  # linear warm-up from 0
        assert float(s(warm)) == pytest.approx(0.4)
    assert float(const(99)) == pytest.approx(0.4)
    # Half a cosine from the peak after the warm-up to 0 at the end.
    assert float(cosine(warm + 45)) == pytest.approx(0.2, rel=1e-5)
    assert float(cosine(total)) == pytest.approx(0.0, abs=1e-7)
    # Divided by 10 at 50% and at 75% of the run.
    assert float(step(49)) == pytest.approx(0.4) and float(step(51)) == pytest.approx(0.04)
    assert float(step(76)) == pytest.approx(0.004)
    assert float(train.make_schedule(0.4, "cosine", total_steps=total)(0)) == pytest.approx(0.4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"schedule": "linear"}, "schedule"),
        ({"warmup_steps": 100}, "warmup_steps"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"total_steps": 0}, "total_steps"),
    ],
)
def test_bad_schedules(kwargs, match):
    with pytest.raises(ValueError, match=match):
        train.make_schedule(0.1, **{"total_steps": 100, **kwargs})


def test_each_optimizer_is_the_named_update():
    w = {"w": jnp.asarray([1.0, -2.0])}
    g = {"w": jnp.asarray([0.5, 0.25])}
    lr, wd = 0.1, 0.01

    def first_update(name, **kw):
        opt = train.make_optimizer(name, lr, weight_decay=wd, **kw)
        updates, _ = opt.update(g, opt.init(w), w)
        return np.asarray(updates["w"])

    coupled = np.asarray(g["w"]) + wd * np.asarray(w["w"])
    np.testing.assert_allclose(first_update("sgd"), -lr * coupled, rtol=1e-6)
    np.testing.assert_allclose(first_update("momentum", momentum=0.9), -lr * coupled, rtol=1e-6)
    # Adam's first step is lr * sign-like m/sqrt(v) = lr (up to eps) of the (decayed) gradient.
    np.testing.assert_allclose(first_update("adam"), -lr * np.sign(coupled), rtol=1e-5)
    # AdamW: the decay is added after Adam's scaling (decoupled).
    np.testing.assert_allclose(first_update("adamw"), -lr * (np.sign(g["w"]) + wd * np.asarray(w["w"])), rtol=1e-5)
    with pytest.raises(ValueError, match="name"):
        train.make_optimizer("rmsprop", 0.1)
    with pytest.raises(ValueError, match="weight_decay"):
        train.make_optimizer("adam", 0.1, weight_decay=-1.0)
    # A schedule is followed step by step: 0 at step 0 (no update at all), then lr, which gives the
    # constant-lr step (plain SGD has no state; Adam's bias-corrected moments of a constant gradient are too).
    for name in ("sgd", "adam", "adamw"):
        opt = train.make_optimizer(name, optax.linear_schedule(0.0, lr, 1), weight_decay=wd)
        first, state = opt.update(g, opt.init(w), w)
        np.testing.assert_array_equal(np.asarray(first["w"]), 0.0)
        second, _ = opt.update(g, state, w)
        np.testing.assert_allclose(np.asarray(second["w"]), first_update(name), rtol=1e-5)


def test_validation_split_is_fixed_disjoint_and_complete():
    x = np.arange(100).reshape(100, 1)
    y = np.arange(100) % 10
    a = train.split_validation(x, y, 0.1)
    b = train.split_validation(x, y, 0.1)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    fit, val = a[0][:, 0], a[2][:, 0]
    assert len(val) == 10 and len(fit) == 90 and not set(fit) & set(val) and set(fit) | set(val) == set(range(100))
    np.testing.assert_array_equal(a[3], y[val])
    assert len(train.split_validation(x, y, 0.0)[2]) == 0
    assert len(train.split_validation(x[:3], y[:3], 0.01)[2]) == 1  # at least one when asked for any
    for bad in (1.0, -0.1, True):
        with pytest.raises(ValueError, match="fraction"):
            train.split_validation(x, y, bad)


def test_augmentation_crops_and_flips_deterministically():
    images = jnp.asarray(np.random.default_rng(0).normal(size=(64, 6, 6, 2)).astype(np.float32))
    key = jax.random.key(7)
    out = train.augment_images(key, images, pad=2, flip=True)
    np.testing.assert_array_equal(out, train.augment_images(key, images, pad=2, flip=True))
    assert out.shape == images.shape
    assert not np.array_equal(out, train.augment_images(jax.random.key(8), images, pad=2, flip=True))
    # Every output is a shifted (and maybe mirrored) window of the zero-padded image.
    padded = np.pad(np.asarray(images), ((0, 0), (2, 2), (2, 2), (0, 0)))
    flips = 0
    for n in range(64):
        found = None
        for mirrored in (False, True):
            src = padded[n, :, ::-1] if mirrored else padded[n]
            for i in range(5):
                for j in range(5):
                    if np.array_equal(src[i : i + 6, j : j + 6], np.asarray(out[n])):
                        found = mirrored
        assert found is not None, n
        flips += found
    assert 10 < flips < 54  # about half are mirrored
    plain = train.augment_images(key, images, pad=1, flip=False)
    assert jax.jit(lambda k, x: train.augment_images(k, x, pad=1, flip=False))(key, images).shape == plain.shape
