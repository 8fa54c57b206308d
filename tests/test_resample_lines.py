"""The resampling-line gate (detector.resample_lines): what it sees, what it must not, and its
path through the Detector, the scoring process, `sentinel score` and `sentinel calibrate`.

The images are synthetic so the cause of each score is known: a smooth field with sensor noise
at its native matrix (no line), the same field read through a 512 -> 224 resize by an
"attacker" whose ±1-level pattern repeats with the resize's period (a line), the clean field
JPEG-compressed (lines at k/8, which the JPEG check discounts), and the clean field resampled
from another matrix (a line the gate cannot tell from an attack: why it is off by default)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detector.cmd_calibrate import LINE_GATE_MIN_IMAGES, config_lines, propose_line_gate
from detector.resample_lines import CEILING, FLOOR, line_peak
from tests.dicom_factory import make_cr


def clean(seed: int, n: int = 512, levels: int = 255) -> np.ndarray:
    """A smooth radiograph-like field plus 1.5 levels of noise, rounded: no periodic structure."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:n, 0:n] / n
    field = 0.45 + 0.25 * np.sin(2.3 * x + 1.1 * y + seed) * np.cos(3.1 * y)
    img = field * levels + rng.normal(0, 1.5 * levels / 255, (n, n))
    return np.clip(np.rint(img), 0, levels)


def attacked(img: np.ndarray, seed: int, victim: int = 224, levels: int = 255) -> np.ndarray:
    """±1 level (of 8 bits) with the sign of a random victim-resolution gradient pulled back
    through a bilinear 512 -> ``victim`` resize: the pattern an attack at eps ~0.004 rounds to."""
    n = img.shape[0]
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((victim, victim))
    pos = (np.arange(n) + 0.5) * victim / n - 0.5  # where each native pixel reads from
    i0 = np.clip(np.floor(pos).astype(int), 0, victim - 2)
    w = np.clip(pos - i0, 0, 1)
    back = ((1 - w)[:, None] * (1 - w)[None, :] * g[i0][:, i0]
            + w[:, None] * (1 - w)[None, :] * g[i0 + 1][:, i0]
            + (1 - w)[:, None] * w[None, :] * g[i0][:, i0 + 1]
            + w[:, None] * w[None, :] * g[i0 + 1][:, i0 + 1])
    step = levels / 255.0
    return np.clip(img + np.sign(back) * step, 0, levels)


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img.astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf), dtype=np.float64)


def test_an_attack_through_a_resize_makes_a_line_and_clean_images_do_not() -> None:
    """Clean scores are the largest of ~240 noisy periodogram ratios: they spread up to about
    the floor (2% of NIH images pass it), never near an attack's."""
    for seed in range(4):
        x = clean(seed)
        assert line_peak(x, 255) < CEILING, seed
        assert line_peak(attacked(x, seed), 255) > CEILING, seed
        assert line_peak(attacked(x, seed, victim=256), 255) > CEILING, seed


def test_jpeg_blocks_are_not_a_line_but_an_attack_after_jpeg_is() -> None:
    x = clean(7)
    for quality in (85, 95):
        assert line_peak(jpeg(x, quality), 255) < CEILING
    assert line_peak(attacked(jpeg(x, 90), 7), 255) > CEILING


def test_the_same_at_any_bit_depth_and_on_a_non_square_matrix() -> None:
    x8 = attacked(clean(3), 3)
    x12 = x8 * (4095 / 255)  # the same image stored at 12 bits
    assert line_peak(x12, 4095) == pytest.approx(line_peak(x8, 255), rel=1e-2)
    wide = np.concatenate([clean(4, 512)[:, :80], x8, clean(5, 512)[:, :80]], axis=1)
    assert line_peak(wide, 255) == pytest.approx(line_peak(x8, 255), rel=1e-6)
    assert line_peak(np.zeros((40, 40)), 255) == 0.0  # too small to have a spectrum


def test_a_resampled_clean_image_looks_attacked_which_is_why_the_gate_is_opt_in() -> None:
    x = clean(9, 448).astype(np.uint8)
    up = np.asarray(Image.fromarray(x).resize((512, 512), Image.BILINEAR), dtype=np.float64)
    assert line_peak(up, 255) > CEILING


def test_calibrate_proposes_the_gate_only_where_the_site_has_no_lines() -> None:
    tight = [1.3 + 0.0005 * i for i in range(150)]  # a fitted tail far under the floor
    assert propose_line_gate(tight)["gate"] == pytest.approx(FLOOR)
    rng = np.random.default_rng(0)
    gumbel = list(1.3 + 0.2 * rng.gumbel(size=300))  # clean scores: maxima of noisy ratios
    proposal = propose_line_gate(gumbel, fpr=0.01)
    # the fitted 99.5% point of Gumbel(1.3, 0.2) is 1.3 + 0.2 * 5.30 = 2.36
    assert proposal["gate"] == pytest.approx(2.36, abs=0.1)
    assert proposal["flagged"] == np.mean(np.asarray(gumbel) >= proposal["gate"])
    assert propose_line_gate(gumbel, fpr=0.005)["gate"] > proposal["gate"]
    broad = list(np.minimum(1.5 + 0.3 * rng.gumbel(size=300), 2.6))  # a wide tail, no line
    assert "allow a larger --fpr" in propose_line_gate(broad)["why_not"]
    assert propose_line_gate([*gumbel[:-1], 3.5])["gate"] is not None  # one odd image: kept
    lined = [*gumbel[:290], *([3.5] * 10)]  # 3% of the site's images carry a line
    refused = propose_line_gate(lined)
    assert refused["gate"] is None and "resampled" in refused["why_not"]
    few = propose_line_gate(gumbel[: LINE_GATE_MIN_IMAGES - 1])
    assert few["gate"] is None and f"at least {LINE_GATE_MIN_IMAGES}" in few["why_not"]
    text = config_lines({"overall": {"threshold": 0.9}, "by_modality": {},
                         "line_gate": proposal})
    assert f"[detector]\nline_gate = {proposal['gate']:.4f}" in text


def write_cr(path: Path, img: np.ndarray) -> Path:
    return make_cr(path, img.astype(np.uint16) * 16, 12)  # 12-bit storage


def test_detector_flags_by_the_line_only_with_a_gate(tmp_path: Path, fixture_bundle: Path) -> None:
    from detector.scoring import Detector

    det = Detector.load(fixture_bundle)
    x = clean(11)
    plain = write_cr(tmp_path / "clean.dcm", x)
    lined = write_cr(tmp_path / "attacked.dcm", attacked(x, 11))
    off = det.score_path(lined, threshold=1.0)
    assert off.line_peak is None and not off.flagged
    on = det.score_path(lined, threshold=1.0, line_gate=CEILING)
    assert on.line_flagged and on.flagged and on.line_gate == CEILING and on.score < 1.0
    calm = det.score_path(plain, threshold=1.0, line_gate=CEILING)
    assert calm.line_peak is not None and calm.line_peak < CEILING and not calm.flagged
    measured = det.score_path(lined, threshold=1.0, line_gate=math.inf)  # calibrate's mode
    assert not measured.flagged and measured.line_peak == pytest.approx(on.line_peak)


def test_scoring_process_carries_the_gate_and_checks_the_verdict(
        tmp_path: Path, fixture_bundle: Path) -> None:
    from gateway.detector_process import ProcessDetector

    x = clean(12)
    lined = write_cr(tmp_path / "attacked.dcm", attacked(x, 12))
    det = ProcessDetector(fixture_bundle, 1, 60.0, 0)
    try:
        off = det.score_path(lined, threshold=1.0)
        on = det.score_path(lined, threshold=1.0, line_gate=CEILING)
    finally:
        det.close()
    assert off.line_peak is None and not off.flagged
    assert on.flagged and on.line_peak > CEILING and on.line_gate == CEILING


def test_sentinel_score_shows_the_lines(tmp_path: Path, fixture_bundle: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli import main

    lined = write_cr(tmp_path / "attacked.dcm", attacked(clean(13), 13))
    rc = main(["score", str(lined), "--bundle", str(fixture_bundle), "--threshold", "1.0",
               "--line-gate", str(CEILING)])
    out = capsys.readouterr().out
    assert rc == 1 and "lines" in out.splitlines()[0] and "FLAGGED" in out


def test_config_line_gate_is_validated(tmp_path: Path) -> None:
    import tomllib

    from gateway.config import ConfigError, parse_config

    base = (f'[listener]\n[state]\ndir = "{tmp_path}"\n[destinations.d]\nkind = "directory"\n'
            f'path = "{tmp_path}"\n[default]\naction = "screen"\ndestinations = ["d"]\n')
    assert parse_config(tomllib.loads(base), tmp_path / "c.toml").detector.line_gate is None
    cfg = parse_config(tomllib.loads(base + "[detector]\nline_gate = 2.3\n"), tmp_path / "c.toml")
    assert cfg.detector.line_gate == 2.3
    with pytest.raises(ConfigError, match=r"detector\.line_gate"):
        parse_config(tomllib.loads(base + '[detector]\nline_gate = "high"\n'),
                     tmp_path / "c.toml")


@pytest.mark.integration
def test_gateway_quarantines_by_the_line_and_audits_it(tmp_path: Path,
                                                       fixture_bundle: Path) -> None:
    """storescu -> sentinel serve with [detector] line_gate: the attacked copy is held though its
    score passes (threshold 1.0), the clean one forwarded; both scored lines are audited."""
    import json

    from gateway.quarantine import Quarantine
    from tests.dcmtk import free_port, require_dcmtk, storescu
    from tests.dicom_factory import sop_uid_of
    from tests.gateway_harness import GatewayProcess, wait_until, write_config

    require_dcmtk()
    x = clean(21)
    plain = write_cr(tmp_path / "src" / "clean.dcm", x)
    lined = write_cr(tmp_path / "src" / "attacked.dcm", attacked(x, 21))
    port, state, out = free_port(), tmp_path / "state", tmp_path / "archive"
    cfg = write_config(tmp_path / "c.toml", state=state, port=port,
                       destinations=f'[destinations.archive]\nkind = "directory"\npath = "{out}"\n',
                       default='action = "screen"\ndestinations = ["archive"]\nthreshold = 1.0',
                       bundle=fixture_bundle, relay_unscreened=False,
                       detector_extra=f"line_gate = {CEILING}")
    gw = GatewayProcess(cfg, tmp_path / "gateway.log", port).start()
    try:
        assert storescu(port, [plain, lined]).returncode == 0
        assert wait_until(lambda: len(list(out.rglob("*.dcm"))) == 1
                          and len(Quarantine(state / "quarantine").list()) == 1, 60), gw.log()
    finally:
        assert gw.stop() == 0
    (held,) = Quarantine(state / "quarantine").list()
    assert held.sop_uid == sop_uid_of(lined) and held.reason == "flagged"
    assert held.line_peak is not None and held.line_peak > CEILING and held.line_gate == CEILING
    events = [json.loads(line) for line in (state / "audit" / "audit.jsonl").read_text()
              .splitlines()]
    scored = {e["sop_uid"]: e for e in events if e["event"] == "scored"}
    assert scored[sop_uid_of(lined)]["line_peak"] > CEILING
    assert scored[sop_uid_of(plain)]["line_peak"] < CEILING
    assert {e["line_gate"] for e in scored.values()} == {CEILING}


def test_sentinel_calibrate_proposes_or_refuses_the_gate(
        tmp_path: Path, fixture_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """110 clean images: the gate is proposed as a [detector] line; the same images resampled
    (448 -> 512 bilinear, as a modality's rescale would): refused, and the reason says so."""
    from gateway.cli import main

    native, resampled = tmp_path / "native", tmp_path / "resampled"
    native.mkdir()
    resampled.mkdir()
    for s in range(110):
        Image.fromarray(clean(s, 256).astype(np.uint8)).save(native / f"{s}.png")
        small = Image.fromarray(clean(s, 224).astype(np.uint8))
        small.resize((256, 256), Image.BILINEAR).save(resampled / f"{s}.png")
    assert main(["calibrate", str(native), "--bundle", str(fixture_bundle)]) == 0
    out = capsys.readouterr().out
    assert "resampling-line gate: " in out and "\n[detector]\nline_gate = " in out
    assert main(["calibrate", str(resampled), "--bundle", str(fixture_bundle)]) == 0
    out = capsys.readouterr().out
    assert "resampling-line gate: not proposed" in out and "resampled" in out
    assert "line_gate" not in out.split("SIGHUP:")[-1]
