"""``python -m jaxconv check``: a user's rule in a module outside the package, checked from the command line.

The subprocess tests write a real module file into ``tmp_path`` and run the
command there, as a user would (``python -m jaxconv check`` is the same
code as ``python -m jaxconv check``: ``add_parser`` registers it, tested below).
The usage errors run in-process through ``check_cli.main``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from jaxconv.verify import command as check_cli

RULES = textwrap.dedent('''
    """A user's rules, not in jaxconv: a strided 'valid' correlation with a nondiff stride."""
    from functools import partial

    import jax
    import jax.numpy as jnp
    from jax import lax


    def _corr(x, w, stride):
        return lax.conv_general_dilated(x, w, (stride, stride), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


    @partial(jax.custom_vjp, nondiff_argnums=(2,))
    def corr(x, w, stride=1):
        return _corr(x, w, stride)


    def _fwd(x, w, stride):
        return _corr(x, w, stride), (x, w)


    def _bwd(stride, res, g):
        x, w = res
        dx, dw = jax.vjp(lambda x, w: _corr(x, w, stride), x, w)[1](g)
        return dx, dw * SCALE


    SCALE = 1.0
    corr.defvjp(_fwd, _bwd)


    def _tap_bwd(res, g):
        x, w = res
        kh, kw, c, o = w.shape
        ho, wo = g.shape[1:3]
        taps = w.reshape(kh * kw, c, o)
        dx = jnp.zeros_like(x)
        dw = []
        for i in range(kh):
            for j in range(kw):
                tap = taps[i * kh + j]  # planted: the row stride of the flattened taps is kw
                dx = dx.at[:, i:i + ho, j:j + wo, :].add(jnp.einsum("nhwo,co->nhwc", g, tap))
                dw.append(jnp.einsum("nhwc,nhwo->co", x[:, i:i + ho, j:j + wo, :], g))
        return dx, jnp.stack(dw).reshape(kh, kw, c, o)


    taps = jax.custom_vjp(lambda x, w: _corr(x, w, 1))
    taps.defvjp(lambda x, w: (_corr(x, w, 1), (x, w)), _tap_bwd)


    def plain(x, w):
        return _corr(x, w, 1)
''')


def _write(directory, name="user_rules", scale=1.0):
    path = directory / f"{name}.py"
    path.write_text(RULES.replace("SCALE = 1.0", f"SCALE = {scale!r}"))
    return path


def _run(args, cwd, env=None):
    return subprocess.run(
        [sys.executable, "-m", "jaxconv", "check", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def test_right_rule_in_a_user_module_passes(tmp_path):
    _write(tmp_path)
    done = _run(["user_rules:corr", "--arg", "x=2,7,7,3", "--arg", "w=3,3,3,4", "--static", "stride=2"], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert out.startswith("check_rule: corr\n")
    assert "note: held fixed (nondiff_argnums): stride" in out
    for kind in ("forward", "vjp", "finite-diff", "second-order", "jit"):
        assert f"\n{kind} " in out
    assert "residuals: the rule saves" in out and out.rstrip().endswith("all checks passed")


def test_planted_bug_exits_1_naming_the_argument_and_json_is_strict(tmp_path):
    _write(tmp_path, scale=1.001)
    done = _run(
        ["user_rules:corr", "--arg", "x=1,5,5,2", "--arg", "w=2,2,2,3", "--json", "--no-second-order"], tmp_path
    )
    assert done.returncode == 1, done.stderr
    record = json.loads(done.stdout)  # one strict JSON object: no NaN/Infinity
    assert record["passed"] is False and record["mode"] == "check"
    assert record["arguments"] == {"x": [1, 5, 5, 2], "w": [2, 2, 2, 3]}
    failures = record["report"]["failures"]
    assert failures and all("argument w" in line for line in failures)
    assert any(line.startswith("vjp: argument w: relative error 1.000e-03") for line in failures)


def test_sweep_shrinks_a_non_square_kernel_bug_and_prints_a_reproducer(tmp_path):
    _write(tmp_path)
    done = _run(
        [
            "user_rules:taps",
            "--arg",
            "x=1,H,W,1",
            "--arg",
            "w=KH,KW,1,1",
            "--dim",
            "H=1-4",
            "--dim",
            "W=1-4",
            "--dim",
            "KH=1-3",
            "--dim",
            "KW=1-3",
            "--sweep",
            "10",
            "--no-finite-differences",
        ],
        tmp_path,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    out = done.stdout
    assert out.startswith("sweep(taps): FAILED")
    # The smallest: the image exactly the kernel, and a non-square kernel.
    found = re.search(r"dims: H=(\d), W=(\d), KH=(\d), KW=(\d);", out)
    assert found, out
    h, w, kh, kw = map(int, found.groups())
    assert (h, w) == (kh, kw) and kh != kw
    assert "vjp: argument x" in out
    assert "from user_rules import taps" in out and "report = check_rule(taps, kwargs={'x': x, 'w': w}" in out


def test_a_module_file_path_and_pythonpath_work_from_another_directory(tmp_path):
    rules_dir, elsewhere = tmp_path / "rules", tmp_path / "elsewhere"
    rules_dir.mkdir()
    elsewhere.mkdir()
    path = _write(rules_dir, "path_rules")
    common = ["--arg", "x=1,4,4,1", "--arg", "w=2,2,1,1", "--no-second-order", "--no-finite-differences"]
    by_file = _run([f"{path}:corr", *common], elsewhere)
    assert by_file.returncode == 0, by_file.stdout + by_file.stderr
    by_path = _run(["path_rules:corr", *common], elsewhere, env={"PYTHONPATH": str(rules_dir)})
    assert by_path.returncode == 0, by_path.stdout + by_path.stderr
    missing = _run(["path_rules:corr", *common], elsewhere)
    assert missing.returncode == 2
    assert "importing 'path_rules' failed: ModuleNotFoundError" in missing.stderr


# --- in-process: parsing and usage errors (exit 2) ------------------------------------------


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A fresh module in tmp_path, the current directory (as a user runs the command)."""
    name = f"user_rules_{abs(hash(str(tmp_path)))}"
    _write(tmp_path, name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["{m}:corr", "--arg", "x=2,7,7,3", "--arg", "w=3,3,4,4"], "cannot be evaluated at these arguments"),
        (["{m}:plain", "--arg", "x=1,4,4,1", "--arg", "w=2,2,1,1"], "plain function"),
        (["{m}:nothing", "--arg", "x=3"], "has no attribute 'nothing'"),
        (["{m}.corr", "--arg", "x=3"], "expected MODULE:FUNCTION"),
        (["{m}:corr", "--arg", "x=1-3,4,4,1", "--arg", "w=2,2,1,1"], "ranges and --choices need --sweep"),
        (["{m}:corr", "--arg", "x=N,4,4,1", "--arg", "w=2,2,1,1"], "dimension(s) ['N'] need a size"),
        (["{m}:corr", "--arg", "x=2,7x,1", "--arg", "w=2,2,1,1"], "is not a size"),
        (["{m}:corr", "--arg", "x=2,4,4,1:gauss"], "unknown values 'gauss'"),
        (["{m}:corr", "--arg", "labels=4:int:5:5"], "needs LO < HIGH"),
        (["{m}:corr", "--static", "stride=2"], "at least one array argument"),
        (["{m}:corr", "--arg", "x=2", "--arg", "x=3"], "given twice"),
        (["{m}:corr", "--arg", "1x=2"], "NAME a Python identifier"),
    ],
)
def test_bad_usage_exits_2_with_a_message(user_module, capsys, argv, message):
    assert check_cli.main([a.format(m=user_module) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m jaxconv check: error: ") and message in err, err


def test_argparse_errors_and_help_exit_codes(capsys):
    assert check_cli.main([]) == 2
    assert check_cli.main(["m:f", "--dtype", "int8"]) == 2
    assert check_cli.main(["m:f", "--sweep", "0"]) == 2
    assert check_cli.main(["--help"]) == 0
    assert "--arg NAME=SHAPE[:VALUES]" in capsys.readouterr().out


def test_plain_function_with_a_reference_and_float32(user_module, capsys):
    code = check_cli.main(
        [
            f"{user_module}:plain",
            "--ref",
            f"{user_module}:plain",
            "--arg",
            "x=1,4,4,2",
            "--arg",
            "w=2,2,2,1",
            "--no-second-order",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("check_vjp: plain")
    code = check_cli.main(
        [
            f"{user_module}:corr",
            "--arg",
            "x=1,5,5,2",
            "--arg",
            "w=3,3,2,2",
            "--dtype",
            "float32",
            "--no-second-order",
            "--no-finite-differences",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "float32 forward" in out and "float32 vjp" in out and "reduction size 18" in out


def test_values_statics_and_choices_parse():
    name, spec = check_cli.parse_arg("labels=4:int:0:10")
    assert (name, spec.shape, spec.values) == ("labels", (4,), ("int", 0, 10))
    assert check_cli.parse_arg("t=")[1].shape == () and check_cli.parse_arg("t=()")[1].shape == ()
    assert check_cli.parse_arg("x=N,1-8,3:permutation")[1].shape == ("N", (1, 8), 3)
    assert check_cli.parse_arg("u=2:uniform:-2:2")[1].values == ("uniform", -2.0, 2.0)
    assert check_cli._literal("2") == 2 and check_cli._literal("SAME") == "SAME"
    assert check_cli._literal("((1, 0), (0, 1))") == ((1, 0), (0, 1))


def test_add_parser_registers_check_on_the_jaxconv_command_line(user_module, capsys):
    parser = argparse.ArgumentParser(prog="python -m jaxconv")
    sub = parser.add_subparsers(dest="command", required=True)
    check_cli.add_parser(sub)
    args = parser.parse_args(
        [
            "check",
            f"{user_module}:corr",
            "--arg",
            "x=1,4,4,1",
            "--arg",
            "w=2,2,1,1",
            "--static",
            "stride=2",
            "--no-second-order",
        ]
    )
    assert args.func is check_cli.run
    assert args.func(args) == 0
    assert "all checks passed" in capsys.readouterr().out


def test_sweep_json_with_choices_in_process(user_module, capsys):
    code = check_cli.main(
        [
            f"{user_module}:corr",
            "--arg",
            "x=1,H,W,C",
            "--arg",
            "w=2,2,C,1",
            "--dim",
            "H=2-5",
            "--dim",
            "W=2-5",
            "--dim",
            "C=1-2",
            "--choices",
            "stride=1,2",
            "--sweep",
            "4",
            "--json",
            "--no-finite-differences",
        ]
    )
    record = json.loads(capsys.readouterr().out)
    assert code == 0 and record["mode"] == "sweep" and record["passed"] is True
    assert record["sweep"]["examples"] == 4 and record["sweep"]["config"] is None
    code = check_cli.main(
        [
            f"{user_module}:taps",
            "--arg",
            "x=1,H,W,1",
            "--arg",
            "w=KH,KW,1,1",
            "--dim",
            "H=1-4",
            "--dim",
            "W=1-4",
            "--dim",
            "KH=1-3",
            "--dim",
            "KW=1-3",
            "--sweep",
            "8",
            "--json",
            "--no-finite-differences",
        ]
    )
    record = json.loads(capsys.readouterr().out)
    assert code == 1 and record["passed"] is False
    config = record["sweep"]["config"]
    assert config["shapes"]["x"][1:3] == config["shapes"]["w"][:2] and config["dims"]["KH"] != config["dims"]["KW"]
    assert record["sweep"]["report"]["failures"][0].startswith("vjp: argument x")
