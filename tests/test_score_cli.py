"""`sentinel score`: table and JSON output, exit codes, errors per file, missing bundle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fixture_bundle import synthetic_images
from PIL import Image

from gateway.cli import main


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["score", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_nema_directory_scores_all_four(
    fixture_bundle: Path, nema_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, _ = run_cli(capsys, "--bundle", str(fixture_bundle), "--json", str(nema_dir))
    doc = json.loads(out)
    rows = {Path(r["file"]).name: r for r in doc["files"]}
    assert set(rows) == {"RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG3_UNCR.dcm", "RG3_J2KR.dcm"}
    assert all(r["verdict"] in ("clean", "flagged") for r in rows.values())
    assert rc == (1 if doc["summary"]["flagged"] else 0)
    for name in ("RG1", "RG3"):
        a, b = rows[f"{name}_UNCR.dcm"], rows[f"{name}_J2KR.dcm"]
        assert abs(a["score"] - b["score"]) <= 1e-6
        assert abs(a["p_cnn"] - b["p_cnn"]) <= 1e-6 and abs(a["p_rf"] - b["p_rf"]) <= 1e-6
        assert a["sop_instance_uid"].startswith("1.3.6.1.4.1.5962")
        assert a["frames"] == 1
        assert set(a["timings_ms"]) == {"decode", "features", "cnn", "forest", "total"}
    # the table form has one row per file plus header and summary
    rc2, table, _ = run_cli(capsys, "--bundle", str(fixture_bundle), str(nema_dir))
    assert rc2 == rc
    lines = table.strip().splitlines()
    assert lines[0].split()[:2] == ["file", "SOP"]
    assert sum("RG" in line for line in lines) == 4
    assert lines[-1].startswith("4 file(s)")


def test_exit_codes_follow_threshold(
    fixture_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    imgs, _ = synthetic_images(2, seed=21)
    for i, img in enumerate(imgs):
        Image.fromarray(np.round(img * 255).astype(np.uint8)).save(tmp_path / f"im{i}.png")
    base = ("--bundle", str(fixture_bundle))
    assert run_cli(capsys, *base, "--threshold", "1.01", str(tmp_path))[0] == 0
    rc, out, _ = run_cli(capsys, *base, "--threshold", "0", str(tmp_path))
    assert rc == 1 and out.count("FLAGGED") == 2
    rc, out, _ = run_cli(capsys, *base, "--threshold", "paper_0.5", "--json", str(tmp_path))
    assert json.loads(out)["threshold"] == 0.5
    rc, _, err = run_cli(capsys, *base, "--threshold", "nonsense", str(tmp_path))
    assert rc == 2 and "paper_0.5" in err


def test_errors_are_reported_per_file(
    fixture_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "good.png"
    Image.fromarray(np.full((64, 64), 100, np.uint8)).save(good)
    colour = tmp_path / "colour.png"
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[..., 2] = 255
    Image.fromarray(rgb).save(colour)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\x00" * 10)
    rc, out, _ = run_cli(
        capsys,
        "--bundle",
        str(fixture_bundle),
        "--threshold",
        "1.01",
        "--json",
        str(good),
        str(colour),
        str(junk),
        str(tmp_path / "absent.png"),
    )
    assert rc == 2
    rows = {Path(r["file"]).name: r for r in json.loads(out)["files"]}
    assert rows["good.png"]["verdict"] == "clean"
    assert rows["colour.png"]["error"]["reason"] == "colour"
    assert rows["junk.dcm"]["error"]["reason"] == "unreadable"
    assert rows["absent.png"]["error"]["reason"] == "unreadable"
    rc, table, _ = run_cli(capsys, "--bundle", str(fixture_bundle), str(colour))
    assert rc == 2 and "ERROR" in table and "error [colour]" in table


def test_directory_skips_non_images(
    fixture_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "README.txt").write_text("not an image")
    Image.fromarray(np.full((32, 32), 7, np.uint8)).save(tmp_path / "a.png")
    rc, out, _ = run_cli(capsys, "--bundle", str(fixture_bundle), "--json", str(tmp_path))
    assert [Path(r["file"]).name for r in json.loads(out)["files"]] == ["a.png"]
    assert rc in (0, 1)
    (tmp_path / "a.png").unlink()
    rc, _, err = run_cli(capsys, "--bundle", str(fixture_bundle), str(tmp_path))
    assert rc == 2 and "no DICOM or PNG/JPEG" in err


def test_missing_default_bundle_says_how_to_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import detector.bundle

    empty = tmp_path / "default"
    empty.mkdir()
    monkeypatch.setattr(detector.bundle, "DEFAULT_BUNDLE", empty)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "x.png")
    rc, out, err = run_cli(capsys, str(tmp_path / "x.png"))
    assert rc == 2 and out == ""
    assert "--bundle" in err and "sentinel train" in err


def test_corrupt_bundle_exit_2_names_file(
    fixture_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    b = tmp_path / "b"
    shutil.copytree(fixture_bundle, b)
    data = bytearray((b / "forest.npz").read_bytes())
    data[100] ^= 0xFF
    (b / "forest.npz").write_bytes(bytes(data))
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "x.png")
    rc, _, err = run_cli(capsys, "--bundle", str(b), str(tmp_path / "x.png"))
    assert rc == 2 and "forest.npz" in err


def test_real_command_line(fixture_bundle: Path, nema_dir: Path) -> None:
    """The console entry point in a fresh process, as an operator runs it."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "score",
            "--bundle",
            str(fixture_bundle),
            str(nema_dir),
        ],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode in (0, 1), proc.stderr
    rows = [line for line in proc.stdout.splitlines() if ".dcm" in line]
    assert len(rows) == 4
    assert all(("clean" in r) != ("FLAGGED" in r) for r in rows)


def test_gated_bundle_adds_the_grid_column(
    fixture_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With a stride-grid gate the table shows the gate's feature, so a held image whose CNN
    and forest score low says why; the JSON carries it as grid_peaks."""
    from PIL import Image

    from detector.bundle import load_manifest, write_bundle
    from detector.forest import ForestArrays

    m = load_manifest(fixture_bundle)
    gated = write_bundle(tmp_path / "gated", cnn_tflite=m.path_of("cnn"),
                         forest=ForestArrays.load(m.path_of("forest")),
                         feature_names=m.feature_names, w_cnn=m.w_cnn, threshold=0.99,
                         thresholds={}, training_data={}, metrics={},
                         rule={"name": "stack", "gate": {"feature": "stride_grid_peaks",
                                                         "threshold": 0.6, "slope": 10.0}})
    yy, xx = np.mgrid[0:224, 0:224]
    tile = np.random.default_rng(8).choice([-1, 1], (8, 8))
    img = np.clip(120 + 20 * np.sin(yy / 30) + tile[yy % 8, xx % 8], 0, 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "stride.png")
    rc, out, _ = run_cli(capsys, "--bundle", str(gated), "--json", str(tmp_path / "stride.png"))
    (row,) = json.loads(out)["files"]
    assert rc == 1 and row["verdict"] == "flagged" and row["grid_peaks"] > 1.0
    _, table, _ = run_cli(capsys, "--bundle", str(gated), str(tmp_path / "stride.png"))
    head, line = table.strip().splitlines()[:2]
    cols = head.split()
    assert cols.index("grid") == cols.index("P_rf") + 1 and f"{row['grid_peaks']:.3f}" in line
    _, plain, _ = run_cli(capsys, "--bundle", str(fixture_bundle), str(tmp_path / "stride.png"))
    assert "grid" not in plain.splitlines()[0]
