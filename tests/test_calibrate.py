"""`sentinel calibrate`: a site's threshold from its own clean images (never below the
bundle's), per Modality, as config lines the gateway accepts."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from detector.calibration import calibrate_threshold
from detector.cmd_calibrate import (
    calibrate,
    config_lines,
    min_images_to_lower,
    propose_cnn_gate,
    propose_line_ramp,
    raise_cnn_gate,
)
from tests.dicom_factory import make_series


def test_threshold_flags_at_most_the_target_share() -> None:
    rng = np.random.default_rng(0)
    s = rng.random(1000)
    for fpr in (0.001, 0.01, 0.05):
        t = calibrate_threshold(s, fpr)
        assert np.mean(s >= t) <= fpr
        assert np.mean(s >= np.nextafter(np.sort(s)[::-1][int(fpr * 1000)], -1)) > fpr
    assert calibrate_threshold(s, 1.0) == 0.0
    with pytest.raises(ValueError, match="at least one"):
        calibrate_threshold(np.array([]), 0.01)


def test_site_thresholds_per_modality_and_never_below_the_bundle() -> None:
    rng = np.random.default_rng(1)
    noisy = list(0.80 + 0.15 * rng.random(400))  # a source that scores high when clean
    quiet = list(0.30 * rng.random(300))
    r = calibrate({"CR": noisy, "DX": quiet}, 0.01, bundle_threshold=0.85)
    cr, dx = r["by_modality"]["CR"], r["by_modality"]["DX"]
    assert cr["threshold"] > 0.85 and cr["fpr_at_threshold"] <= 0.01
    assert cr["fpr_at_bundle_threshold"] > 0.5
    assert dx["threshold"] == 0.85  # quiet images never lower it
    assert r["overall"]["images"] == 700 and r["overall"]["enough_images"]
    # the overall point is the site's baseline on [default]; per Modality only what tightens it
    # (Modality is sender-written: a relabelled image must not pick a more lenient threshold)
    snippet = tomllib.loads(config_lines(r))
    assert snippet["default"]["threshold"] == pytest.approx(r["overall"]["threshold"], abs=1e-6)
    assert r["overall"]["threshold"] > 0.85
    assert snippet["detector"]["thresholds"] == {"DX": 0.85}  # CR's point is above: left out
    only = tomllib.loads(config_lines(calibrate({"": quiet}, 0.01, 0.85)))
    assert only == {"default": {"threshold": 0.85}}
    assert not dx["below_bundle"] and not dx["lower_refused"]  # not asked to lower


def test_allow_lower_needs_enough_images_and_keeps_the_target_rate() -> None:
    """--allow-lower: a quiet source with enough clean images gets its own 1% point, below the
    bundle's; one with too few keeps the bundle's and says why; a noisy one still goes up."""
    rng = np.random.default_rng(2)
    quiet = list(0.30 * rng.random(400))
    few = list(0.30 * rng.random(100))
    noisy = list(0.80 + 0.15 * rng.random(400))
    assert min_images_to_lower(0.01) == 300
    r = calibrate({"CR": quiet, "DX": few, "MG": noisy}, 0.01, 0.85, allow_lower=True)
    cr, dx, mg = (r["by_modality"][m] for m in ("CR", "DX", "MG"))
    assert cr["threshold"] < 0.3 and cr["below_bundle"] and cr["fpr_at_threshold"] <= 0.01
    assert cr["threshold"] == pytest.approx(np.nextafter(np.sort(quiet)[::-1][4], 1.0))
    assert dx["threshold"] == 0.85 and dx["lower_refused"] and not dx["below_bundle"]
    assert mg["threshold"] > 0.85 and not mg["lower_refused"]


def test_cli_on_clean_dicoms_prints_config_the_gateway_loads(tmp_path: Path,
                                                             fixture_bundle: Path) -> None:
    make_series(tmp_path / "clean", 6, rows=64, cols=64)
    r = subprocess.run([sys.executable, "-m", "gateway.cli", "calibrate", str(tmp_path / "clean"),
                        "--bundle", str(fixture_bundle)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "6 clean image(s) scored" in r.stdout and "[default]" in r.stdout
    assert "use at least 100" in r.stderr  # 6 images cannot show a 1% rate
    snippet = r.stdout.split("and SIGHUP:")[1].split("\n\nmeasure")[0]
    from gateway.config import load_config
    from tests.gateway_harness import write_config
    threshold = tomllib.loads(snippet)["default"]["threshold"]
    cfg_path = write_config(tmp_path / "c.toml", state=tmp_path / "state", port=11112,
                            destinations=f'[destinations.o]\nkind = "directory"\n'
                                         f'path = "{tmp_path}/out"\n',
                            bundle=fixture_bundle,
                            default=f'action = "screen"\nthreshold = {threshold}',
                            relay_unscreened=False)
    assert load_config(cfg_path).default.threshold == pytest.approx(threshold)
    # --allow-lower is wired through, and 6 images are too few to go below the bundle's
    r = subprocess.run([sys.executable, "-m", "gateway.cli", "calibrate", str(tmp_path / "clean"),
                        "--bundle", str(fixture_bundle), "--allow-lower", "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    overall = json.loads(r.stdout)["overall"]
    assert overall["below_bundle"] is False
    assert overall["threshold"] >= json.loads(r.stdout)["bundle_threshold"]


def test_cli_says_when_the_images_are_too_large_for_the_area_view(tmp_path: Path,
                                                                 fixture_bundle: Path) -> None:
    """A site of CR-sized images is told that attacks made through a resize without
    antialiasing are averaged away at 224 and that the line gate is what sees them; a site of
    small images is not."""
    make_series(tmp_path / "small", 3, rows=64, cols=64)
    make_series(tmp_path / "large", 3, rows=1024, cols=1100)
    for folder, large in (("small", False), ("large", True)):
        r = subprocess.run([sys.executable, "-m", "gateway.cli", "calibrate",
                            str(tmp_path / folder), "--bundle", str(fixture_bundle)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert ("1100 pixels a side" in r.stderr and "line gate" in r.stderr) is large
        assert ("averages away" in r.stderr) is large
    r = subprocess.run([sys.executable, "-m", "gateway.cli", "calibrate", str(tmp_path / "large"),
                        "--bundle", str(fixture_bundle), "--json"],
                       capture_output=True, text=True, timeout=120)
    assert json.loads(r.stdout)["matrix"] == {"median_side": 1100.0, "large": True,
                                              "side_from": 1000}


def test_cli_refuses_bad_fpr_and_empty_folders(tmp_path: Path, fixture_bundle: Path) -> None:
    (tmp_path / "empty").mkdir()
    for extra, what in ((["--fpr", "0"], "--fpr"), ([], "no image could be scored")):
        r = subprocess.run([sys.executable, "-m", "gateway.cli", "calibrate",
                            str(tmp_path / "empty"), "--bundle", str(fixture_bundle), *extra],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and what in r.stderr


def test_site_calibration_halves_never_share_a_patient() -> None:
    from train.site_calibration import patient_halves

    patients = [f"p{i // 3}" for i in range(300)]  # three images per patient
    cal = patient_halves(patients, seed=0)
    assert np.array_equal(cal, patient_halves(patients, seed=0))
    in_cal = {p for p, c in zip(patients, cal, strict=True) if c}
    in_test = {p for p, c in zip(patients, cal, strict=True) if not c}
    assert not in_cal & in_test and len(in_cal) == 50 and len(in_test) == 50


@pytest.mark.data
def test_processed_site_is_pointed_to_the_zoo_bundle(tmp_path: Path, data_dir: Path) -> None:
    """A site whose modality applies CLAHE: the default bundle flags many of its clean images,
    and `sentinel calibrate` says so and names the shipped zoo bundle, which flags at most half
    as many; a site with plain images gets no such advice. Then `bundle = "zoo"` loads."""
    from PIL import Image

    from detector.bundle import BUILTIN_BUNDLES
    from train.processing import clahe

    if not (BUILTIN_BUNDLES["zoo"] / "manifest.json").is_file():
        pytest.fail(f"the zoo bundle is missing from {BUILTIN_BUNDLES['zoo']}")
    pngs = sorted((data_dir / "nih_cxr14_1000" / "img512").rglob("*.png"))[-100:]
    for name in ("plain", "clahe"):
        (tmp_path / name).mkdir()
    for p in pngs:
        x = np.asarray(Image.open(p).convert("L"), np.float32) / 255.0
        Image.open(p).convert("L").save(tmp_path / "plain" / p.name)
        y = np.round(clahe(x, clip=3.0, tiles=8) * 255.0).astype(np.uint8)
        Image.fromarray(y).save(tmp_path / "clahe" / p.name)

    def calibrate_json(folder: str) -> dict:
        r = subprocess.run([sys.executable, "-m", "gateway.cli", "calibrate",
                            str(tmp_path / folder), "--json"],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    processed = calibrate_json("clahe")
    flagged = processed["overall"]["fpr_at_bundle_threshold"]
    alt = processed["alternative"]
    assert flagged > 0.03 and alt is not None, (flagged, alt)
    assert alt["recommended"] and alt["fpr_at_bundle_threshold"] <= flagged / 2, alt
    assert calibrate_json("plain")["alternative"] is None

    from gateway.config import load_config
    from tests.gateway_harness import write_config

    dest = f'[destinations.o]\nkind = "directory"\npath = "{tmp_path}/o"\n'
    cfg = write_config(tmp_path / "c.toml", state=tmp_path / "state", port=11112,
                       destinations=dest,
                       bundle=Path("zoo"), default='action = "screen"', relay_unscreened=False)
    assert load_config(cfg).detector.bundle == BUILTIN_BUNDLES["zoo"]


def test_cnn_gate_takes_what_the_threshold_and_line_gate_leave_of_the_budget() -> None:
    """1,000 clean images at --fpr 1%: the threshold and the line gate flag one each, so the
    gate's share is 0.8% of the other 998; it leaves above it the most images k for which
    k or fewer would still be unlikely (5%) at that share (scipy's binomial, independently)."""
    from scipy.stats import binom

    rng = np.random.default_rng(3)
    n = 1000
    fused, lines, cnn = rng.uniform(0, 0.5, n), rng.uniform(1, 2, n), rng.uniform(0, 0.6, n)
    fused[0], lines[1] = 0.95, 3.0  # one image over the threshold, another over the line gate
    cnn[0], cnn[1] = 0.99, 0.98  # both also the CNN's highest: already counted
    r = propose_cnn_gate(fused, lines, cnn, threshold=0.9, line_gate=2.5, fpr=0.01)
    gate = r["gate"]
    assert gate is not None
    k = int(((cnn >= gate) & (fused < 0.9) & (lines < 2.5)).sum())
    assert k == r["above"]
    assert binom.cdf(k, n - 2, 0.008) <= 0.05 < binom.cdf(k + 1, n - 2, 0.008)
    assert np.sort(cnn[2:])[::-1][k] < gate  # the next image stays clean
    assert r["fpr_with_gate"] == pytest.approx((k + 2) / n)
    # 300 images at 1% with nothing flagged yet: the gate goes above all of them (k = 0)
    r300 = propose_cnn_gate(fused[2:302], lines[2:302], cnn[2:302], 0.9, 2.5, 0.01)
    assert r300["above"] == 0 and r300["gate"] > cnn[2:302].max()
    # too few images for the share; a budget the threshold alone already spends
    few = propose_cnn_gate(fused[2:102], lines[2:102], cnn[2:102], 0.9, 2.5, 0.01)
    assert few["gate"] is None and "use at least" in few["why_not"]
    over = propose_cnn_gate(fused, lines, cnn, threshold=0.0, line_gate=None, fpr=0.01)
    assert over["gate"] is None and "already flag" in over["why_not"]


def test_line_ramp_is_the_lowest_floor_that_flags_none_of_the_clean_images() -> None:
    """300 clean images at --fpr 1%: the ramp's floor is the lowest step at which no image the
    threshold and gate pass is lifted to the threshold by its line (checked against the
    formula, independently of detector.scoring), and the step below lifts one; images the gate
    or threshold already flag do not hold it up. Refused without a gate and with too few."""
    rng = np.random.default_rng(4)
    n, threshold, gate = 300, 0.9, 2.3
    fused, lines = rng.uniform(0.05, 0.85, n), rng.uniform(1.2, 2.1, n)
    fused[0], lines[0] = 0.89, 2.2  # a clean image with both a high score and a line
    fused[1], lines[1] = 0.99, 2.25  # flagged by the threshold already
    lines[2] = 2.6  # flagged by the gate already
    r = propose_line_ramp(fused, lines, threshold, gate, 0.01)
    ramp = r["ramp"]
    assert ramp is not None and 1.5 <= ramp < gate

    def lifted(floor: float) -> np.ndarray:
        logit = np.log(fused / (1 - fused)) + 25.0 * np.log(np.maximum(lines, floor) / floor)
        return (lines > floor) & (logit >= np.log(threshold / (1 - threshold)))

    passed = (fused < threshold) & (lines < gate)
    assert not np.any(lifted(ramp) & passed)
    assert np.any(lifted(round(ramp - 0.01, 2)) & passed)  # the step below flags one
    assert lifted(round(ramp - 0.01, 2))[0]  # the image with both signs decides it
    assert propose_line_ramp(fused, lines, threshold, None, 0.01)["ramp"] is None
    few = propose_line_ramp(fused[:200], lines[:200], threshold, gate, 0.01)
    assert few["ramp"] is None and "use at least 300" in few["why_not"]
    text = config_lines({"overall": {"threshold": 0.9}, "by_modality": {},
                         "line_gate": {"gate": gate}, "line_ramp": r})
    assert tomllib.loads(text)["detector"] == {"line_gate": gate, "line_ramp": ramp}


def test_cnn_gate_rises_to_the_known_attacks_low_end_and_never_below_the_clean_point() -> None:
    """300 attacked images: the gate goes to the highest point that leaves unflagged the most
    of them k for which k or fewer would still be unlikely (5%) at a 5% miss rate (scipy's
    binomial, independently); images the threshold already flags count as caught."""
    from scipy.stats import binom

    rng = np.random.default_rng(5)
    n = 300
    cnn, fused, lines = rng.uniform(0.6, 1.0, n), rng.uniform(0, 0.5, n), np.zeros(n)
    fused[:20] = 0.95  # caught by the threshold whatever their CNN says
    cnn[:20] = 0.1
    r = raise_cnn_gate(0.4, fused, lines, cnn, threshold=0.9, line_gate=None)
    assert r["raised"] and r["gate"] > 0.6
    missed = int(((cnn < r["gate"]) & (fused < 0.9)).sum())
    assert binom.cdf(missed, n, 0.05) <= 0.05 < binom.cdf(missed + 1, n, 0.05)
    assert r["attack_caught"] == pytest.approx(1 - missed / n)
    # attacks the CNN does not separate from clean: the clean-budget gate stays
    low = raise_cnn_gate(0.7, fused, lines, cnn - 0.5, 0.9, None)
    assert not low["raised"] and low["gate"] == 0.7 and "low end" in low["why_not"]
    # no clean-budget gate (the threshold spends the budget): nothing to raise
    assert raise_cnn_gate(None, fused, lines, cnn, 0.9, None)["gate"] is None
    few = raise_cnn_gate(0.4, fused[:40], lines[:40], cnn[:40], 0.9, None)
    assert not few["raised"] and "use at least 60" in few["why_not"]
    caught = raise_cnn_gate(0.4, np.ones(n), lines, cnn, 0.9, None)
    assert not caught["raised"] and caught["attack_caught"] == 1.0


@pytest.mark.data
def test_cli_cnn_gate_proposal_is_what_score_and_the_gateway_apply(tmp_path: Path,
                                                                   data_dir: Path) -> None:
    """`calibrate --cnn-gate` on 120 clean NIH radiographs at --fpr 0.05: the shipped bundle's
    own threshold flags almost none of them, so the gate gets the budget and may leave one or
    two above it (at 95% confidence); the proposed gate loads in the gateway config, and
    `sentinel score --cnn-gate` with it flags what the CNN alone reaches, within 5%."""
    pngs = sorted((data_dir / "nih_cxr14_1000" / "img512").rglob("*.png"))[:120]
    r = subprocess.run([sys.executable, "-m", "gateway.cli", "calibrate", *map(str, pngs),
                        "--fpr", "0.05", "--cnn-gate", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    gate = result["cnn_gate"]["gate"]
    assert gate is not None, result["cnn_gate"]
    assert result["cnn_gate"]["fpr_with_gate"] <= 0.05
    assert tomllib.loads(result["config"])["detector"]["cnn_gate"] == gate
    from gateway.config import load_config
    from tests.gateway_harness import write_config
    cfg_path = write_config(tmp_path / "c.toml", state=tmp_path / "state", port=11112,
                            destinations=f'[destinations.o]\nkind = "directory"\n'
                                         f'path = "{tmp_path}/out"\n',
                            detector_extra=f"cnn_gate = {gate!r}")
    assert load_config(cfg_path).detector.cnn_gate == gate
    threshold = result["overall"]["threshold"]  # the proposed [default] threshold beside it
    r = subprocess.run([sys.executable, "-m", "gateway.cli", "score", *map(str, pngs),
                        "--threshold", repr(threshold), "--cnn-gate", repr(gate), "--json"],
                       capture_output=True, text=True, timeout=300)
    rows = json.loads(r.stdout)["files"]
    assert all(row["cnn_gate"] == gate for row in rows)
    flagged = [row for row in rows if row["verdict"] == "flagged"]
    assert 0 < len(flagged) <= 6
    assert len(flagged) == result["cnn_gate"]["above"] + sum(
        row["score"] >= threshold for row in rows)
    # the gate alone flags some: the CNN's peak reaches it where the fused score stays under
    assert any(row["cnn_peak"] >= gate and row["score"] < threshold for row in flagged)
    assert all(row["verdict"] == "flagged" for row in rows if row["cnn_peak"] >= gate)
    assert r.returncode == 1  # something flagged


@pytest.mark.data
def test_cli_line_ramp_proposal_is_what_score_and_the_gateway_apply(tmp_path: Path,
                                                                    data_dir: Path) -> None:
    """`calibrate` on 300 clean NIH radiographs proposes the line gate and, below it, the line
    ramp; both load in the gateway config, and `sentinel score` with them flags none of these
    images by the ramp (it was placed to flag none), while a ramp one step lower would."""
    pngs = sorted((data_dir / "nih_cxr14_1000" / "img512").rglob("*.png"))[:300]
    r = subprocess.run([sys.executable, "-m", "gateway.cli", "calibrate", *map(str, pngs),
                        "--json"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    gate, ramp = result["line_gate"]["gate"], result["line_ramp"]["ramp"]
    assert gate is not None and ramp is not None and 1.5 <= ramp < gate, result["line_ramp"]
    assert tomllib.loads(result["config"])["detector"] == {"line_gate": gate,
                                                           "line_ramp": ramp}
    from gateway.config import load_config
    from tests.gateway_harness import write_config
    cfg_path = write_config(tmp_path / "c.toml", state=tmp_path / "state", port=11112,
                            destinations=f'[destinations.o]\nkind = "directory"\n'
                                         f'path = "{tmp_path}/out"\n',
                            detector_extra=f"line_gate = {gate!r}\nline_ramp = {ramp!r}")
    assert load_config(cfg_path).detector.line_ramp == ramp
    threshold = result["overall"]["threshold"]

    def by_ramp(with_ramp: float) -> int:
        """How many of the images only the ramp flags."""
        out = subprocess.run([sys.executable, "-m", "gateway.cli", "score", *map(str, pngs),
                              "--threshold", repr(threshold), "--line-gate", repr(gate),
                              "--line-ramp", repr(with_ramp), "--json"],
                             capture_output=True, text=True, timeout=600)
        rows = json.loads(out.stdout)["files"]
        assert len(rows) == 300 and all(row["line_ramp"] == with_ramp for row in rows)
        return sum(row["verdict"] == "flagged" and row["score"] < threshold
                   and row["line_peak"] < gate for row in rows)

    assert by_ramp(ramp) == 0
    assert by_ramp(round(ramp - 0.01, 2)) > 0  # the step below flags one: the lowest floor


@pytest.mark.data
def test_cli_raises_the_cnn_gate_to_attacked_copies(tmp_path: Path, data_dir: Path) -> None:
    """`calibrate --cnn-gate --cnn-gate-attacks` with the shipped bundle: 120 clean NIH images
    place the clean-budget gate; 100 Kermany test images with one grey level flipped on 70% of
    their pixels (which the CNN scores high and the fused score often misses) raise it. The
    raised gate is what the config carries, still keeps the clean images within --fpr, and
    `sentinel score` with it flags the attacked copies (as PNG files) as calibrate said."""
    from PIL import Image

    files = sorted((data_dir / "kermany224" / "test").rglob("*.jpeg"))[:100]
    x = np.stack([np.asarray(Image.open(f).convert("L"), np.float32) / 255 for f in files])
    rng = np.random.default_rng(0)
    flip = (rng.random(x.shape) < 0.7) * rng.choice([-1, 1], x.shape) / 255
    att = np.clip(np.round((x + flip) * 255), 0, 255)
    np.save(tmp_path / "att.npy", (att / 255).astype(np.float32))
    (tmp_path / "att").mkdir()
    for i, im in enumerate(att.astype(np.uint8)):
        Image.fromarray(im).save(tmp_path / "att" / f"{i:03d}.png")
    clean = sorted((data_dir / "nih_cxr14_1000" / "img512").rglob("*.png"))[:120]
    cli = [sys.executable, "-m", "gateway.cli"]
    r = subprocess.run([*cli, "calibrate", *map(str, clean), "--fpr", "0.05", "--cnn-gate",
                        "--cnn-gate-attacks", str(tmp_path / "att.npy"), "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    cg, ra = result["cnn_gate"], result["cnn_gate_attacks"]
    assert ra["raised"] and ra["attack_images"] == 100, ra
    assert cg["gate"] == ra["gate"] > cg["clean_budget_gate"]
    assert cg["fpr_with_gate"] <= 0.05 and ra["attack_caught"] >= 0.95
    assert tomllib.loads(result["config"])["detector"]["cnn_gate"] == cg["gate"]
    r = subprocess.run([*cli, "score", str(tmp_path / "att"), "--threshold",
                        repr(result["overall"]["threshold"]), "--cnn-gate", repr(cg["gate"]),
                        "--json"], capture_output=True, text=True, timeout=300)
    rows = json.loads(r.stdout)["files"]
    flagged = np.mean([row["verdict"] == "flagged" for row in rows])
    assert len(rows) == 100 and abs(flagged - ra["attack_caught"]) <= 0.03
    # the option needs the gate it raises; a stack that is not 224x224 images is refused
    r = subprocess.run([*cli, "calibrate", *map(str, clean[:5]), "--cnn-gate-attacks",
                        str(tmp_path / "att.npy")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "add --cnn-gate" in r.stderr
    np.save(tmp_path / "bad.npy", np.zeros((3, 100, 100), np.float32))
    r = subprocess.run([*cli, "calibrate", *map(str, clean[:5]), "--cnn-gate",
                        "--cnn-gate-attacks", str(tmp_path / "bad.npy")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "(n, 224, 224)" in r.stderr


def test_attacked_images_from_files_and_stacks_score_alike(tmp_path: Path,
                                                           fixture_bundle: Path) -> None:
    """--cnn-gate-attacks takes image files and .npy stacks together: each gives one row of
    (fused score, line peak, CNN peak), whatever else is scored for clean images."""
    from PIL import Image

    from detector.cmd_calibrate import _score_attacks
    from detector.scoring import Detector

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (3, 224, 224)).astype(np.uint8)
    (tmp_path / "png").mkdir()
    for i, im in enumerate(x):
        Image.fromarray(im).save(tmp_path / "png" / f"{i}.png")
    np.save(tmp_path / "s.npy", (x / 255).astype(np.float32))
    rows = _score_attacks(Detector.load(fixture_bundle),
                          [str(tmp_path / "png"), str(tmp_path / "s.npy")])
    assert rows.shape == (6, 3)
    np.testing.assert_allclose(rows[:3, 0], rows[3:, 0], atol=1e-4)  # the same images
