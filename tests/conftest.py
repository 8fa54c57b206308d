"""Shared fixtures: where the real radiographs are.

Tests find the data through one environment variable, ``SENTINEL_DATA``, defaulting to
``../shared/data`` beside the repository. Where it is absent (a user's fresh clone) the
tests that need it skip and say so; CI always has it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    return Path(os.environ.get("SENTINEL_DATA", REPO_ROOT.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    root = data_root()
    if not root.is_dir():
        pytest.skip(
            f"shared radiographs not found at {root}: set SENTINEL_DATA to the data folder "
            "(see ../shared/data/README.md) to run this test"
        )
    return root


@pytest.fixture(scope="session")
def nema_dir(data_dir: Path) -> Path:
    d = data_dir / "dicom_cr_nema"
    if not d.is_dir():
        pytest.skip(f"{d} missing: the NEMA CR DICOMs are needed for this test")
    return d


@pytest.fixture(scope="session")
def fixture_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small valid model bundle (fixture CNN + forest on synthetic images), built once.

    Built by tests/fixture_bundle.py with TensorFlow and scikit-learn (test-only imports) in a
    few seconds; the models mean nothing clinically, they exercise every runtime code path.
    """
    from fixture_bundle import build_fixture_bundle

    return build_fixture_bundle(tmp_path_factory.mktemp("fixture-bundle") / "bundle")
