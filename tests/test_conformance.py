"""The conformance harness: every op of ``jaxconv.verify.registry.REGISTRY`` through the same checks.

Per op, from its registered grid, reference and hypothesis strategy:
float64 VJP against ``jax.vjp`` of the reference (relative error <= 1e-12,
random cotangents), central finite differences and grad-of-grad on every grid
configuration; every registered form (``jaxconv.plan.forms``) on the first
configuration; float32; eager (op by op) and jit; vmap over an extra leading
axis; a few hypothesis-drawn configurations; and, behind ``-m slow``, a
hypothesis sweep with the full check.  A new op is one registry entry.
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxconv
from jaxconv import plan
from jaxconv.verify import check_vjp
from jaxconv.verify.registry import REGISTRY

OPS = sorted(REGISTRY)
GRID = [(name, i) for name in OPS for i in range(len(REGISTRY[name].grid))]
FORMS = [(name, i) for name in OPS for i in range(1, len(REGISTRY[name].forms))]


def _ids(params):
    return [f"{name}-{i}" for name, i in params]


def _case(name, index=0, seed=0):
    spec = REGISTRY[name]
    return spec.make(np.random.default_rng([seed, index, 1]), spec.grid[index])


def _check(case, **options):
    return check_vjp(
        case.f, case.ref, *case.args, names=case.names, name=f"{case.op} {case.label}", **{**case.options, **options}
    )


def _forms(name, index):
    forms = REGISTRY[name].forms[index]
    return plan.forms(**forms) if forms else contextlib.nullcontext()


def _ops_rules():
    """Every ``jax.custom_vjp`` defined at module level in a module of :mod:`jaxconv.ops`, by (module, name)."""
    rules = {}
    for info in pkgutil.iter_modules(jaxconv.ops.__path__):
        module = importlib.import_module(f"{jaxconv.ops.__name__}.{info.name}")
        for attr, value in vars(module).items():
            if isinstance(value, jax.custom_vjp):
                rules[(module.__name__, attr)] = module
    return rules


def test_every_hand_rule_is_registered(monkeypatch):
    """Every ``jax.custom_vjp`` rule in jaxconv.ops (found in its modules, not listed) is reached by a
    registered op, and every registered op reaches one; every public op marked as a hand rule is
    registered, and every entry is that public op with the reference of the same name: a new op or
    rule cannot be left out of the checks."""
    rules = _ops_rules()
    reached: dict[str, set] = {}
    current = [None]
    for key, module in rules.items():
        rule = getattr(module, key[1])

        def recording(*args, _key=key, _rule=rule, **kwargs):
            reached.setdefault(current[0], set()).add(_key)
            return _rule(*args, **kwargs)

        monkeypatch.setattr(module, key[1], recording)
    for name in OPS:
        current[0] = name
        case = _case(name)
        jax.eval_shape(case.f, *case.args)
        assert reached.get(name), f"{name} is registered but runs no custom_vjp rule of jaxconv.ops"
    unreached = set(rules) - set().union(*reached.values())
    assert not unreached, f"custom_vjp rules no registered op runs: {sorted(unreached)}"

    marked = {name for name in jaxconv.__all__ if getattr(getattr(jaxconv, name), "is_hand_rule", False)}
    drop_ins = {f"lax.{name}" for name in jaxconv.lax.__all__ if getattr(jaxconv.lax, name).is_hand_rule}
    assert marked | drop_ins == set(REGISTRY)
    for name, spec in REGISTRY.items():
        if name in drop_ins:  # jax.lax's own op, or Flax's pool in plain lax
            short = name.removeprefix("lax.")
            assert spec.op is getattr(jaxconv.lax, short)
            assert spec.ref is getattr(jax.lax, short, None) or spec.ref is getattr(jaxconv.reference, f"flax_{short}")
        else:
            assert spec.op is getattr(jaxconv, name)
            assert spec.ref is getattr(jaxconv.reference, name)
        assert spec.grid and callable(spec.strategy)


@pytest.mark.parametrize("name,index", GRID, ids=_ids(GRID))
def test_float64_vjp_finite_differences_second_order(name, index):
    _check(_case(name, index)).assert_ok()


@pytest.mark.parametrize("name,index", FORMS, ids=[f"{n}-{'-'.join(REGISTRY[n].forms[i].values())}" for n, i in FORMS])
def test_float64_every_form(name, index):
    with _forms(name, index):
        _check(_case(name, 0, seed=index)).assert_ok()


@pytest.mark.parametrize("name", OPS)
def test_float32(name):
    _check(_case(name, 0, seed=7), dtype=jnp.float32, finite_differences=False, second_order=False).assert_ok()


def _stack(a, b):
    return jax.tree.map(lambda u, v: np.stack([u, v]), a, b)


@pytest.mark.parametrize("name", OPS)
def test_eager_and_vmap(name):
    """Op by op without jit; and vmap over an extra leading axis of the registered arguments
    (the others shared), rule against reference."""
    spec = REGISTRY[name]
    case = _case(name, 0, seed=11)
    _check(case, jit=False, finite_differences=False, second_order=False).assert_ok()
    if not spec.vmap_args:  # l2_penalty reduces a whole pytree: nothing to map over
        return
    other = _case(name, 0, seed=12)
    args = tuple(_stack(a, b) if i in spec.vmap_args else a for i, (a, b) in enumerate(zip(case.args, other.args)))
    axes = tuple(0 if i in spec.vmap_args else None for i in range(len(args)))
    report = check_vjp(
        jax.vmap(case.f, in_axes=axes),
        jax.vmap(case.ref, in_axes=axes),
        *args,
        names=case.names,
        finite_differences=False,
        name=f"vmap {case.op}",
    )
    report.assert_ok()
    # The mapped rule equals the rule applied entry by entry.
    mapped = jax.vmap(case.f, in_axes=axes)(*args)
    for k in range(2):
        single = case.f(*(a[k] if i in spec.vmap_args else a for i, a in enumerate(args)))
        np.testing.assert_allclose(np.asarray(mapped[k]), np.asarray(single), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", OPS)
@settings(max_examples=2)
@given(data=st.data())
def test_hypothesis_vjp(name, data):
    spec = REGISTRY[name]
    case = spec.make(np.random.default_rng([3, 1]), data.draw(spec.strategy(), label="config"))
    _check(case, finite_differences=False, second_order=False).assert_ok()


@pytest.mark.slow
@pytest.mark.parametrize("name", OPS)
@settings(max_examples=40)
@given(data=st.data())
def test_sweep_slow(name, data):
    spec = REGISTRY[name]
    config = data.draw(spec.strategy(), label="config")
    form = data.draw(st.sampled_from(spec.forms), label="form")
    with plan.forms(**form) if form else contextlib.nullcontext():
        case = spec.make(np.random.default_rng([4, 1]), config)
        # Finite differences need kink-free inputs: the makers draw them (permutations, ReLU away from 0).
        _check(case).assert_ok()
