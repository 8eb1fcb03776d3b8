"""Test configuration: float64 everywhere unless a test asks for float32."""

import os

# Must precede the first jax import.  Four fake CPU devices for the data-parallel
# tests; and no LLVM optimisation: float64 convolutions are compiled to loops on
# CPU, and at the default level each takes ~0.5 s to compile against ~0.02 s at
# level 0, which dominates a suite of small float64 checks.  Speed is measured in
# benchmarks/, never here.
os.environ["XLA_FLAGS"] = " ".join(
    [
        os.environ.get("XLA_FLAGS", ""),
        "--xla_force_host_platform_device_count=4",
        "--xla_backend_optimization_level=0",
    ]
).strip()

import contextlib  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import jaxconv  # noqa: E402

jax.config.update("jax_enable_x64", True)

# Each example compiles several XLA programs, so examples are few and deadlines off.
settings.register_profile(
    "default", max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile(
    "slow", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture
def forms():
    """``forms(conv_forward=..., conv_backward=..., pool=...)``: force those forms for the rest of the test
    (``jaxconv.plan.forms`` entered until the test ends)."""
    with contextlib.ExitStack() as stack:
        yield lambda **names: stack.enter_context(jaxconv.plan.forms(**names))
