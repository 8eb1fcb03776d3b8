"""``python -m jaxconv check`` never reports success having checked nothing, and refuses bad input clearly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from jaxconv.verify import command as check_cli

RULES = textwrap.dedent('''
    import jax
    import jax.numpy as jnp
    from jax import lax


    def conv(x, w, *, stride=1, padding="VALID"):
        """A plain function whose statics are keyword-only."""
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        return lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


    def conv_ref(x, w, *, stride=1, padding="VALID"):
        return lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


    def scaled(x, *, scale=1.0):
        return x * 2.0


    def scaled_ref(x, *, scale=1.0):
        return x * 2.0 * scale


    @jax.custom_vjp
    def returns_none(x):
        return None


    returns_none.defvjp(lambda x: (None, x), lambda r, g: (jnp.zeros_like(r),))


    def plain_none(x):
        return None


    def labels_only(x):
        return jnp.argmax(x)
''')


@pytest.fixture
def module(tmp_path, monkeypatch):
    name = f"reliab_rules_{abs(hash(str(tmp_path)))}"
    (tmp_path / f"{name}.py").write_text(RULES)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


CONV = ["--arg", "x=1,5,5,1", "--arg", "w=2,2,1,1", "--no-second-order", "--no-finite-differences"]


@pytest.mark.parametrize("sweep", [[], ["--sweep", "2"]])
@pytest.mark.parametrize(
    "static, message",
    [
        ("stride=0", "stride must be >= 1, got 0"),
        ("padding='NONSENSE'", "NONSENSE"),
    ],
)
def test_keyword_only_statics_reach_the_function(module, capsys, sweep, static, message):
    code = check_cli.main([f"{module}:conv_ref", "--ref", f"{module}:conv", *CONV, "--static", static, *sweep])
    out, err = capsys.readouterr()
    # A rejected argument: a usage error in a single check, a failed configuration in a sweep; never a pass.
    assert code == (1 if sweep else 2), out + err
    assert message in out + err


def test_a_keyword_only_static_changes_what_is_compared(module, capsys):
    base = [f"{module}:scaled", "--ref", f"{module}:scaled_ref", "--arg", "x=3", "--no-second-order"]
    assert check_cli.main([*base, "--static", "scale=1.0"]) == 0
    capsys.readouterr()
    assert check_cli.main([*base, "--static", "scale=3.0"]) == 1  # the reference now differs: it was passed
    assert "vjp: argument x" in capsys.readouterr().out


def test_the_sweep_reproducer_of_a_keyword_only_static_calls_the_functions_with_it(module, capsys):
    assert (
        check_cli.main(
            [
                f"{module}:scaled",
                "--ref",
                f"{module}:scaled_ref",
                "--arg",
                "x=N",
                "--dim",
                "N=1-3",
                "--static",
                "scale=3.0",
                "--sweep",
                "2",
            ]
        )
        == 1
    )
    out = capsys.readouterr().out
    assert f"from {module} import scaled\n" in out and f"from {module} import scaled_ref\n" in out
    assert "check_vjp(partial(scaled, scale=3.0), partial(scaled_ref, scale=3.0), x," in out


def test_a_keyword_only_array_or_choice_with_a_reference_is_a_usage_error(module, capsys):
    assert (
        check_cli.main([f"{module}:scaled", "--ref", f"{module}:scaled_ref", "--arg", "x=3", "--arg", "scale=3"]) == 2
    )
    assert "keyword-only parameter of the reference" in capsys.readouterr().err
    assert (
        check_cli.main(
            [
                f"{module}:scaled",
                "--ref",
                f"{module}:scaled_ref",
                "--arg",
                "x=3",
                "--choices",
                "scale=1.0,2.0",
                "--sweep",
                "2",
            ]
        )
        == 2
    )
    assert "--choices scale" in capsys.readouterr().err


@pytest.mark.parametrize(
    "target, ref", [("returns_none", None), ("plain_none", "plain_none"), ("labels_only", "labels_only")]
)
@pytest.mark.parametrize("sweep", [[], ["--sweep", "2"]])
def test_a_function_returning_nothing_to_check_fails(module, capsys, target, ref, sweep):
    argv = [f"{module}:{target}", "--arg", "x=4", *(["--ref", f"{module}:{ref}"] if ref else []), *sweep]
    assert check_cli.main(argv) == 1
    out = capsys.readouterr().out
    assert "nothing was checked" in out and "passed" not in out
    assert check_cli.main([*argv, "--json"]) == 1
    record = json.loads(capsys.readouterr().out)
    assert record["passed"] is False and "nothing was checked" in record["error"]


@pytest.mark.parametrize("code", ["0", "None", "'bye'"])
def test_a_module_calling_sys_exit_at_import_is_a_usage_error(tmp_path, monkeypatch, capsys, code):
    name = f"exits_{abs(hash(str(tmp_path)))}"
    (tmp_path / f"{name}.py").write_text(f"import sys\nsys.exit({code})\ndef f(x):\n    return x\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert check_cli.main([f"{name}:f", "--arg", "x=3"]) == 2
        assert f"importing {name} called sys.exit(" in capsys.readouterr().err
        assert check_cli.main([f"{tmp_path / name}.py:f", "--arg", "x=3"]) == 2
        assert "called sys.exit(" in capsys.readouterr().err
    finally:
        sys.modules.pop(name, None)


def test_sys_exit_at_import_exits_2_from_the_command_line(tmp_path):
    (tmp_path / "exits.py").write_text("import sys\nsys.exit(0)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(
        [sys.executable, "-m", "jaxconv", "check", "exits:f", "--arg", "x=3"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert done.returncode == 2 and "called sys.exit(0)" in done.stderr and "nothing was checked" in done.stderr


@pytest.mark.parametrize("flag", ["--rtol", "--max-residual-ratio"])
@pytest.mark.parametrize("value", ["-1", "nan", "inf", "-inf", "abc"])
def test_negative_or_nan_tolerances_are_usage_errors_naming_the_flag(module, capsys, flag, value):
    assert check_cli.main([f"{module}:returns_none", "--arg", "x=3", f"{flag}={value}"]) == 2
    assert f"argument {flag}:" in capsys.readouterr().err


def test_zero_tolerance_is_accepted(module, capsys):
    assert check_cli.main(
        [
            f"{module}:scaled",
            "--ref",
            f"{module}:scaled_ref",
            "--arg",
            "x=3",
            "--rtol",
            "0",
            "--no-second-order",
            "--no-finite-differences",
        ]
    ) in (0, 1)
    assert "error" not in capsys.readouterr().err


def test_a_file_that_is_not_python_is_a_clear_usage_error(capsys):
    assert check_cli.main(["/etc/passwd:x", "--arg", "x=3"]) == 2
    err = capsys.readouterr().err
    assert "is not a Python source file (.py)" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--arg", "x=100000,100000"], "--arg x: 10000000000 elements"),
        (["--arg", "x=N,N", "--dim", "N=1-100000", "--sweep", "2"], "--arg x: 10000000000 elements (at its largest)"),
    ],
)
def test_huge_arrays_are_refused_before_allocating(module, capsys, argv, message):
    assert check_cli.main([f"{module}:returns_none", *argv]) == 2
    assert message in capsys.readouterr().err
