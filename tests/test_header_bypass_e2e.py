"""End to end: an image relabelled to dodge screening is screened anyway (issue 20, defect 3).

The routing is the one the example config shipped before the fix: screen ``Modality in [CR, DX]``
and pass everything else. Anyone who can write the pixels can write the header too, so a copy
relabelled ``Modality = OT``, lower-case ``cr``, or as a Basic Text SR with its Pixel Data kept
(SOPClassUID and MediaStorageSOPClassUID both, so DCMTK's storescu negotiates the SR class) went
through unscored. Each is sent with /usr/bin/storescu to ``sentinel serve`` and must be scored
and quarantined, never forwarded; a real SR without pixels still passes.

Two tests: a fast one (fixture bundle; the default's ``threshold = 0`` stands in for an attacked
image, so whatever the default screens is flagged) and one with the trained default bundle and a
`sentinel attack` PGD copy of the real NEMA CR RG1, relabelled (skips without SENTINEL_DATA).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.quarantine import Quarantine
from tests.dcmtk import free_port, require_dcmtk, storescu
from tests.dicom_factory import make_sr, relabel, sentinel_attack, sop_uid_of, synthetic
from tests.gateway_harness import GatewayProcess, audit_events, wait_until, write_config

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR Storage
ROUTING = """
[[rules]]
name = "radiographs"
action = "screen"
destinations = ["archive"]
[rules.match]
Modality = ["CR", "DX"]
"""


def _attacked_copies(src: Path, out: Path) -> dict[str, Path]:
    """``src`` relabelled the three ways of the issue, each with its own SOP Instance UID."""
    return {
        "OT": relabel(src, out / "as-ot.dcm", modality="OT"),
        "cr": relabel(src, out / "as-lower-cr.dcm", modality="cr"),
        "SR-with-pixels": relabel(src, out / "as-sr.dcm", modality="SR", sop_class=SR_CLASS),
    }


def _run(tmp_path: Path, bundle: Path, default: str, relabelled: dict[str, Path],
         forwarded_ok: list[Path]) -> None:
    """Send everything over one storescu association; the relabelled copies must be scored
    (flagged) and quarantined, the ``forwarded_ok`` files forwarded."""
    require_dcmtk()
    port = free_port()
    state = tmp_path / "state"
    archive = tmp_path / "archive"
    dest = f'[destinations.archive]\nkind = "directory"\npath = "{archive}"\n'
    cfg = write_config(tmp_path / "c.toml", state=state, port=port, destinations=dest,
                       rules=ROUTING, default=default, bundle=bundle, relay_unscreened=False)
    gw = GatewayProcess(cfg, tmp_path / "gateway.log", port).start()
    try:
        r = storescu(port, [*relabelled.values(), *forwarded_ok])
        assert r.returncode == 0, r.stderr
        q = Quarantine(state / "quarantine")
        held = {sop_uid_of(f) for f in relabelled.values()}
        ok = {sop_uid_of(f) for f in forwarded_ok}

        def done() -> bool:
            fwd = {p.stem for p in archive.rglob("*.dcm")}
            return len({rec.sop_uid for rec in q.list()} | fwd) >= len(held | ok)

        assert wait_until(done, 120), gw.log()[-3000:]
    finally:
        assert gw.stop() == 0
    forwarded = {p.stem for p in archive.rglob("*.dcm")}
    records = {rec.sop_uid: rec for rec in q.list()}
    events = audit_events(state / "audit" / "audit.jsonl")
    for label, f in relabelled.items():
        uid = sop_uid_of(f)
        assert uid not in forwarded, f"{label}: forwarded"
        assert uid in records and records[uid].reason == "flagged", f"{label}: not held as flagged"
        scored = [e for e in events if e["event"] == "scored" and e.get("sop_uid") == uid]
        assert scored and scored[-1]["verdict"] == "flagged", f"{label}: not scored"
        received = [e for e in events if e["event"] == "received" and e.get("sop_uid") == uid]
        assert "says pass, but the instance carries PixelData" in received[-1]["detail"], label
    for f in forwarded_ok:
        assert sop_uid_of(f) in forwarded, f"{f.name}: not forwarded"


def test_relabelled_images_screened_fast(tmp_path: Path, fixture_bundle: Path) -> None:
    """Fixture bundle: the default's threshold 0 flags whatever the default screens."""
    src = synthetic(tmp_path / "src" / "cr.dcm", 128, 128, seed=5)
    relabelled = _attacked_copies(src, tmp_path / "src")
    sr = make_sr(tmp_path / "src" / "report.dcm")
    _run(tmp_path, fixture_bundle, 'action = "pass"\nthreshold = 0.0', relabelled, [sr])


def test_relabelled_attacked_nema_cr_screened(tmp_path: Path, nema_dir: Path) -> None:
    """The trained default bundle; a PGD (eps 0.006) copy of the real 15-bit CR RG1, relabelled.
    The original RG1 (CR) and an SR pass; the three relabelled attacked copies are held."""
    bundle = REPO / "detector" / "models" / "default"
    if not (bundle / "manifest.json").is_file():
        pytest.skip("no trained default bundle in detector/models/default")
    original = nema_dir / "RG1_UNCR.dcm"
    attacked = sentinel_attack(original, tmp_path / "src" / "rg1-pgd.dcm", bundle)
    relabelled = _attacked_copies(attacked, tmp_path / "src")
    sr = make_sr(tmp_path / "src" / "report.dcm")
    _run(tmp_path, bundle, 'action = "pass"', relabelled, [original, sr])
