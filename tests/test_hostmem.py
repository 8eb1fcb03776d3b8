"""Huge pages for the step's temporaries (``jaxconv.train.hostmem``): the decision, and real processes.

The scenario: a jitted function whose temporaries XLA takes in one allocation larger than glibc keeps
(96 MiB) runs in a fresh process started as ``python -m jaxconv train`` starts itself, and in one left as it is;
the kernel's count of page faults per call says whether the memory was faulted in 4 KiB pages again."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from jaxconv.train import hostmem

from ._runs import ROOT, TINY_CONFIG

_SCRIPT = """
import json, resource, sys
import jax, jax.numpy as jnp
n = 8 * 2**20  # 32 MiB of float32; the temporaries: 96 MiB
def f(x):
    y = jnp.sin(x)
    return (jnp.cumsum(y) * jnp.flip(y)).sum()
program = jax.jit(f).lower(jax.ShapeDtypeStruct((n,), jnp.float32)).compile()
x = jnp.ones((n,), jnp.float32)
for _ in range(2):
    program(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    program(x).block_until_ready()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4
from jaxconv.train import hostmem
print(json.dumps(dict(faults=faults, temp=program.memory_analysis().temp_size_in_bytes, status=hostmem.status())))
"""


def _run(env):
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _plain_env():
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hostmem.ENV)}
    env.pop("XLA_FLAGS", None)
    return env


def test_huge_pages_end_the_faults_of_each_step_in_a_real_process():
    plain = _plain_env()
    huge = hostmem.environment(plain)
    default = _run(plain)
    assert default["temp"] >= 64 * 2**20
    if huge is None:  # nothing to ask for here: the status says why, and agrees with what the process saw
        status = hostmem.status(plain)
        assert status.reason and not status.reason.startswith("not asked for"), status
        if status.huge_pages:  # THP 'always': the kernel's pages are huge already
            assert default["faults"] < default["temp"] / 4096 / 10, default
        return
    assert huge["GLIBC_TUNABLES"].endswith(hostmem.TUNABLE)
    asked = _run(huge)
    assert asked["status"] == [True, f"GLIBC_TUNABLES has {hostmem.TUNABLE}"]
    pages = default["temp"] / 4096
    # Left as it is, the temporaries are faulted in again every call (most of their 4 KiB pages);
    # with huge pages, a 512th of that.
    assert default["faults"] > pages / 2, default
    assert asked["faults"] < default["faults"] / 20, (asked, default)


def _fake(monkeypatch, *, glibc=(2, 36), thp="madvise"):
    monkeypatch.setattr(hostmem, "_glibc_version", lambda: glibc)
    monkeypatch.setattr(hostmem, "thp_mode", lambda: thp)


def test_the_tunable_is_asked_for_only_where_it_changes_something(monkeypatch):
    _fake(monkeypatch)
    assert hostmem.environment({"A": "1"}) == {"A": "1", "GLIBC_TUNABLES": hostmem.TUNABLE}
    assert hostmem.environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) == {
        "GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{hostmem.TUNABLE}"
    }
    assert hostmem.status({}) == (False, f"not asked for: start the process with GLIBC_TUNABLES={hostmem.TUNABLE}")
    for env, why in [
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, (True, "GLIBC_TUNABLES has glibc.malloc.hugetlb=1")),
        ({"GLIBC_TUNABLES": "x=1:glibc.malloc.hugetlb=0"}, (False, "GLIBC_TUNABLES has glibc.malloc.hugetlb=0")),
        ({hostmem.ENV: "default"}, (False, f"${hostmem.ENV}=default: glibc's default settings")),
    ]:
        assert hostmem.environment(env) is None and hostmem.status(env) == why
    _fake(monkeypatch, thp="always")
    assert hostmem.environment({}) is None and hostmem.status({}).huge_pages
    _fake(monkeypatch, thp="never")
    assert hostmem.environment({}) is None and hostmem.status({}) == (
        False,
        "the kernel's transparent huge pages are 'never'",
    )
    _fake(monkeypatch, glibc=(2, 31))
    assert hostmem.environment({}) is None and "2.31 has no malloc.hugetlb" in hostmem.status({}).reason
    _fake(monkeypatch, glibc=None)
    assert hostmem.environment({}) is None and hostmem.status({}).reason.startswith("not glibc")


def test_thp_mode_reads_the_bracketed_word(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert hostmem.thp_mode(path) == "madvise"
    assert hostmem.thp_mode(tmp_path / "absent") is None


def test_fit_from_python_says_how_to_get_huge_pages(tmp_path, monkeypatch, capsys):
    from jaxconv.train import Config, fit

    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv(hostmem.ENV, raising=False)
    _fake(monkeypatch)  # glibc 2.36, THP 'madvise': the setting would help, and fit cannot start again
    fit(Config(**TINY_CONFIG, epochs=1, out=str(tmp_path / "run")))
    err = capsys.readouterr().err
    assert f"note: host memory: not asked for: start the process with GLIBC_TUNABLES={hostmem.TUNABLE}" in err


def test_restart_runs_the_same_command_line_with_the_tunable(monkeypatch):
    calls = []
    monkeypatch.setattr(hostmem.os, "execve", lambda *args: calls.append(args))
    monkeypatch.setattr(hostmem, "environment", lambda: {"GLIBC_TUNABLES": hostmem.TUNABLE})
    hostmem.restart_with_huge_pages(["python3", "-m", "jaxconv", "train", "--epochs", "2"])
    assert calls == [(sys.executable, [sys.executable, "-m", "jaxconv", "train", "--epochs", "2"], calls[0][2])]
    assert calls[0][2] == {"GLIBC_TUNABLES": hostmem.TUNABLE}
    monkeypatch.setattr(hostmem, "environment", lambda: None)  # nothing to ask for: returns, nothing started
    hostmem.restart_with_huge_pages(["python3", "-m", "jaxconv", "train"])
    monkeypatch.setattr(hostmem, "environment", lambda: {"GLIBC_TUNABLES": hostmem.TUNABLE})
    monkeypatch.setattr(hostmem.sys, "executable", "")  # an embedded interpreter: nothing to start again
    hostmem.restart_with_huge_pages(["python3", "-m", "jaxconv", "train"])
    assert len(calls) == 1
