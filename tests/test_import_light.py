"""The runtime stays light: no TensorFlow on import, none in the install requirements."""

from __future__ import annotations

import configparser
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("tensorflow", "keras", "sklearn", "torch", "jax")


def _modules_after(code: str) -> set[str]:
    """sys.modules (top-level names) after running ``code`` in a fresh interpreter."""
    script = (
        code
        + "\nimport json, sys\nprint(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_import_detector_and_gateway_leaves_tensorflow_out() -> None:
    mods = _modules_after(
        "import detector, gateway\n"
        "import detector.preprocess, detector.features, detector.forest, detector.bundle\n"
        "import detector.cnn, detector.scoring, detector.cmd_score"
    )
    assert {"detector", "gateway"} <= mods
    assert not mods & set(HEAVY), mods & set(HEAVY)


def test_loading_a_detector_needs_no_tensorflow(fixture_bundle: Path) -> None:
    """Scoring end to end (LiteRT + numpy forest) without TensorFlow or scikit-learn."""
    mods = _modules_after(
        "import numpy as np\n"
        "from detector.scoring import Detector\n"
        f"d = Detector.load({str(fixture_bundle)!r})\n"
        "print(d.score_unit(np.full((224, 224), 0.5, np.float32)))"
    )
    assert "ai_edge_litert" in mods
    assert not mods & set(HEAVY), mods & set(HEAVY)


def test_cli_parser_is_light() -> None:
    """`sentinel --help` builds every subcommand's parser: none may pull TensorFlow."""
    mods = _modules_after("from gateway.cli import build_parser\nbuild_parser()")
    assert not mods & {"tensorflow", "keras"}, mods & {"tensorflow", "keras"}


def test_the_gateway_never_imports_the_console_web_stack() -> None:
    """The review console (gateway/console) runs as its own process: `sentinel serve`, the
    CLI's parser and the config loader (which parses [console]) import none of its web stack."""
    mods = _modules_after("from gateway.cli import build_parser\nbuild_parser()\n"
                          "import gateway.service, gateway.cmd_serve, gateway.config")
    web = {"starlette", "jinja2", "argon2", "uvicorn", "multipart", "httpx"}
    assert not mods & web, mods & web


def _requirement_names(lines: str) -> list[str]:
    names = []
    for line in lines.strip().splitlines():
        line = line.split("#")[0].strip()
        if line:
            names.append(re.split(r"[<>=!~;\[ ]", line, maxsplit=1)[0].lower())
    return names


def test_install_requires_has_no_tensorflow() -> None:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    runtime = _requirement_names(cfg["options"]["install_requires"])
    assert "ai-edge-litert" in runtime and "pydicom" in runtime
    assert not [n for n in runtime if n.startswith(("tensorflow", "keras", "tf-", "scikit"))]
    train = _requirement_names(cfg["options.extras_require"]["train"])
    assert any(n.startswith("tensorflow") for n in train)  # TensorFlow lives in the extra


@pytest.mark.slow
def test_pip_resolution_pulls_no_tensorflow(tmp_path: Path) -> None:
    """Ask pip (network) what `pip install .` would install into an empty environment."""
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--ignore-installed",
            "--quiet",
            "--report",
            str(report),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        pytest.skip(f"pip could not resolve (no network?): {proc.stderr.strip()[-300:]}")
    names = {i["metadata"]["name"].lower() for i in json.loads(report.read_text())["install"]}
    assert "ai-edge-litert" in names and "pydicom" in names
    assert not {n for n in names if n.startswith(("tensorflow", "keras", "scikit"))}, names
