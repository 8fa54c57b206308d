"""Routing rules: first match wins, default, non-image pass, thresholds, and `rules test`."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from gateway.config import load_config
from gateway.rules import Association, decide, early_rule
from tests.dicom_factory import make_sr, synthetic

CONFIG = """
[listener]
port = 11112
[state]
dir = "state"
[destinations.pacs]
kind = "directory"
path = "pacs"
[destinations.research]
kind = "directory"
path = "research"
[detector.thresholds]
CR = 0.3

[[rules]]
name = "blocked-sender"
action = "reject"
[rules.match]
calling_ae = "OLDBOX"

[[rules]]
name = "knee"
action = "pass"
destinations = ["research"]
[rules.match]
BodyPartExamined = { regex = "KNEE|TIBIA" }

[[rules]]
name = "chest-dx"
action = "screen"
threshold = 0.8
shadow = true
[rules.match]
Modality = "DX"
BodyPartExamined = "CHEST"

[default]
action = "screen"
destinations = ["pacs"]
"""

A = Association(calling_ae="CR1", called_ae="SENTINEL", peer="127.0.0.1")


@pytest.fixture()
def cfg(tmp_path: Path):  # type: ignore[no-untyped-def]
    p = tmp_path / "c.toml"
    p.write_text(CONFIG)
    return load_config(p)


def ds_of(path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(path, defer_size=1024)


def test_first_match_and_default(cfg, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    knee = ds_of(synthetic(tmp_path / "k.dcm", 64, 64, body_part="KNEE"))
    d = decide(cfg, knee, A)
    assert (d.rule.name, d.action, d.destinations) == ("knee", "pass", ("research",))
    assert any("matched" in r for r in d.reasons)

    chest_cr = ds_of(synthetic(tmp_path / "c.dcm", 64, 64, body_part="CHEST"))
    d = decide(cfg, chest_cr, A)
    assert (d.rule.name, d.action, d.threshold, d.shadow) == ("default", "screen", 0.3, False)
    assert any("Modality='DX': value 'CR' does not match" in r for r in d.reasons)

    chest_dx = ds_of(synthetic(tmp_path / "d.dcm", 64, 64, body_part="CHEST", modality="DX"))
    d = decide(cfg, chest_dx, A)
    assert (d.rule.name, d.threshold, d.shadow) == ("chest-dx", 0.8, True)


def test_association_facts(cfg, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ds = ds_of(synthetic(tmp_path / "k.dcm", 64, 64, body_part="KNEE"))
    d = decide(cfg, ds, Association("OLDBOX", "SENTINEL", "10.0.0.1"))
    assert (d.rule.name, d.action) == ("blocked-sender", "reject")
    # The SCP can refuse before acknowledging: the rule needs association facts only.
    r = early_rule(cfg, "OLDBOX", "SENTINEL", "10.0.0.1", "1.2.840.10008.5.1.4.1.1.1")
    assert r is not None and r.name == "blocked-sender"
    # For other callers the outcome depends on the dataset: unknown at association time.
    assert early_rule(cfg, "CR1", "SENTINEL", "10.0.0.1", "1.2.840.10008.5.1.4.1.1.1") is None


def test_non_image_passes_unless_a_rule_says_otherwise(cfg, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sr = ds_of(make_sr(tmp_path / "sr.dcm"))
    d = decide(cfg, sr, A)
    assert d.action == "pass" and d.destinations == ("pacs",)
    assert "non-image-pass" in d.reasons
    d = decide(cfg, sr, Association("OLDBOX", "SENTINEL", ""))
    assert d.action == "reject"


def test_rules_test_command(cfg, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    from gateway.cli import main

    knee = synthetic(tmp_path / "k.dcm", 64, 64, body_part="TIBIA")
    chest = synthetic(tmp_path / "c.dcm", 64, 64)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    rc = main(["rules", "test", "--config", str(cfg.path), "--calling-ae", "CR1",
               str(knee), str(chest), str(junk)])
    out = capsys.readouterr().out
    assert rc == 1  # one file unreadable
    assert f"{knee}: rule 'knee' -> pass to research" in out
    assert f"{chest}: rule 'default' -> screen to pacs, threshold 0.3" in out
    assert "BodyPartExamined~/KNEE|TIBIA/: matched" in out
    assert f"{junk}: unreadable" in out
