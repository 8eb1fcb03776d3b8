"""The documentation site (mkdocs.yml): the derivation pages and the API reference build with warnings as errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"

# Markdown links [text](target), not images' sources inside code spans.
_LINK = re.compile(r"(?<!\!)\[[^\]\n]*\]\(([^)\s]+)\)")


def _strip_code(text: str) -> str:
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def test_every_relative_link_in_docs_names_a_file_that_exists():
    """mkdocs reports links outside docs/ (to the sources, ../jaxconv/*.py) at info level only; here each
    relative link, inside docs/ or out, must name an existing file."""
    broken = []
    pages = sorted(DOCS.rglob("*.md"))
    assert len(pages) >= 8
    for page in pages:
        for target in _LINK.findall(_strip_code(page.read_text(encoding="utf-8"))):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = target.split("#", 1)[0]
            if not (page.parent / path).exists():
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert not broken, "\n".join(broken)


def test_link_check_sees_a_broken_link(tmp_path):
    page = "see [the rule](../jaxconv/ops/conv.py), [gone](../jaxconv/nothing.py) and `[not](a link)`"
    targets = _LINK.findall(_strip_code(page))
    assert targets == ["../jaxconv/ops/conv.py", "../jaxconv/nothing.py"]
    assert (DOCS / targets[0]).exists() and not (DOCS / targets[1]).exists()


def test_mkdocs_build_strict(tmp_path):
    """The docs extra (pip install jaxconv[docs], in the README's test command) builds the site with --strict."""
    site = tmp_path / "site"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stderr, result.stderr
    # The API reference holds the public API, docstrings included.
    expected = {
        "api/ops/index.html": [
            "jaxconv.ops.conv2d",
            "jaxconv.ops.conv_transpose3d",
            "jaxconv.ops.max_pool1d",
            "jaxconv.ops.batch_norm",
            "jaxconv.ops.softmax_cross_entropy",
        ],
        "api/nn/index.html": [
            "jaxconv.nn.layers.Conv",
            "jaxconv.nn.layers.ConvTranspose",
            "jaxconv.nn.layers.MaxPool",
            "jaxconv.nn.layers.GlobalAvgPool",
            "jaxconv.nn.models.resnet_small",
        ],
        "api/train/index.html": ["jaxconv.train.step.make_train_step", "jaxconv.train.checkpoint"],
        "api/verify/index.html": ["jaxconv.verify.rules.check_vjp", "jaxconv.verify.sweeps.sweep"],
        "api/plan/index.html": ["jaxconv.plan.planner.forms"],
        "api/matrix/index.html": ["jaxconv.matrix.im2row", "jaxconv.matrix.filter_matrix"],
        "api/reference/index.html": ["jaxconv.reference.conv_nd"],
    }
    for page, ids in expected.items():
        html = (site / page).read_text(encoding="utf-8")
        missing = [i for i in ids if f'id="{i}"' not in html]
        assert not missing, (page, missing)
    # A docstring assigned at import time (one template for conv_transpose1d/2d/3d) is rendered too.
    ops_html = (site / "api/ops/index.html").read_text(encoding="utf-8")
    section = ops_html.split('id="jaxconv.ops.conv_transpose2d"', 1)[1].split('id="jaxconv.ops.conv_transpose3d"')[0]
    assert "2-D transposed convolution" in section
    for page in ("convolution", "pooling", "layers", "losses", "checking", "architecture"):
        assert (site / page / "index.html").exists(), page
