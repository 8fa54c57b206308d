"""Hand-made hostile instances sent through the real SCP of a running `sentinel serve`.

Each must end with a clear failure status or a quarantine entry whose reason says what is wrong
(``unreadable`` or the typed reason of ``detector.errors``), never a silent forward and never
an instance stuck in the spool. A dataset larger than the configured maximum is refused while it
streams in: no Success, nothing kept, and the daemon's peak RSS does not grow by its size.

The files are built byte by byte where pydicom would refuse to write them, and sent with
pynetdicom's chunked sending, which streams the file's dataset bytes without parsing them (what
a broken modality would put on the wire).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pynetdicom import AE, _config

from bench.reliability import record_figures, vm_hwm_kib
from gateway.quarantine import Quarantine
from tests.dcmtk import free_port
from tests.dicom_factory import make_cr
from tests.gateway_harness import GatewayProcess, wait_until, write_config

CR = "1.2.840.10008.5.1.4.1.1.1"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
MPEG2 = "1.2.840.10008.1.2.4.100"
MIB = 1024 * 1024


@pytest.fixture()
def chunked_send() -> Iterator[None]:
    """Stream files as they are (pynetdicom global switch; restored afterwards)."""
    saved = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    yield
    _config.STORE_SEND_CHUNKED_DATASET = saved


def _good(path: Path, rows: int = 64, cols: int = 64, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    return make_cr(path, rng.integers(0, 4096, (rows, cols), dtype=np.uint16), 12)


def truncated(d: Path) -> Path:
    p = _good(d / "truncated.dcm")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 3000])  # cut inside Pixel Data
    return p


def truncated_header(d: Path) -> Path:
    p = _good(d / "truncated-header.dcm", seed=1)
    ds = pydicom.dcmread(p, stop_before_pixels=True)
    from pynetdicom.dsutils import split_dataset

    _meta, offset = split_dataset(p)
    data = p.read_bytes()
    p.write_bytes(data[: offset + 200])  # cut inside the header
    assert ds.SOPInstanceUID
    return p


def bad_vr(d: Path) -> Path:
    """SOP Class UID's VR 'UI' replaced by 'TI', an unknown VR."""
    p = _good(d / "bad-vr.dcm", seed=2)
    data = bytearray(p.read_bytes())
    from pynetdicom.dsutils import split_dataset

    _meta, offset = split_dataset(p)
    at = data.index(b"\x08\x00\x16\x00UI", offset)
    data[at + 4: at + 6] = b"TI"
    p.write_bytes(bytes(data))
    return p


def bad_vr_in_matched_attribute(d: Path) -> Path:
    """Body Part Examined (a rule matches on it) with an unknown VR."""
    p = _good(d / "bad-vr-bodypart.dcm", seed=3)
    data = bytearray(p.read_bytes())
    at = data.index(b"\x18\x00\x15\x00CS")
    data[at + 4: at + 6] = b"BS"
    p.write_bytes(bytes(data))
    return p


def huge_matrix(d: Path) -> Path:
    """Rows = Columns = 65535 declared, 10 bytes of Pixel Data."""
    p = _good(d / "bomb.dcm", 2, 2, seed=4)
    ds = pydicom.dcmread(p)
    ds.Rows = ds.Columns = 65535
    ds.PixelData = b"\0" * 10
    ds.save_as(p, enforce_file_format=True)
    return p


def pixels_short(d: Path) -> Path:
    p = _good(d / "short.dcm", seed=5)
    ds = pydicom.dcmread(p)
    ds.PixelData = ds.PixelData[:-64]
    ds.save_as(p, enforce_file_format=True)
    return p


def pixels_long(d: Path) -> Path:
    """4 KiB more Pixel Data than Rows x Columns x 2 bytes: a payload riding along."""
    p = _good(d / "long.dcm", seed=6)
    ds = pydicom.dcmread(p)
    ds.PixelData = ds.PixelData + b"\x01\x02" * 2048
    ds.save_as(p, enforce_file_format=True)
    return p


def unsupported_syntax(d: Path) -> Path:
    p = _good(d / "mpeg2.dcm", seed=7)
    ds = pydicom.dcmread(p)
    ds.PixelData = encapsulate([b"\0" * 64])
    ds.file_meta.TransferSyntaxUID = MPEG2
    ds.save_as(p)
    return p


def garbage_dataset(d: Path) -> Path:
    """A valid file meta followed by random bytes."""
    p = _good(d / "garbage.dcm", seed=8)
    from pynetdicom.dsutils import split_dataset

    _meta, offset = split_dataset(p)
    rng = np.random.default_rng(8)
    p.write_bytes(p.read_bytes()[:offset] + rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    return p


def undefined_length_sequence(d: Path) -> Path:
    """A sequence of undefined length that never ends (no delimiter) before Pixel Data."""
    p = _good(d / "open-sequence.dcm", seed=9)
    data = bytearray(p.read_bytes())
    at = data.index(b"\xe0\x7f\x10\x00")
    item = b"\xfe\xff\x00\xe0\xff\xff\xff\xff"  # item of undefined length, never closed
    seq = b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff" + item
    data[at:at] = seq
    p.write_bytes(bytes(data))
    return p


# case -> the quarantine reasons that are a correct answer
CASES = {
    "truncated": (truncated, {"unreadable", "pixel-length"}),
    "truncated-header": (truncated_header, {"unreadable", "no-pixel-data"}),
    "bad-vr": (bad_vr, {"unreadable"}),
    "bad-vr-matched-attribute": (bad_vr_in_matched_attribute, {"unreadable"}),
    "65535x65535": (huge_matrix, {"too-large"}),
    "pixels-short": (pixels_short, {"pixel-length"}),
    "pixels-long": (pixels_long, {"pixel-length"}),
    "unsupported-syntax": (unsupported_syntax, {"unsupported-syntax"}),
    "garbage": (garbage_dataset, {"unreadable", "no-pixel-data"}),
    "open-sequence": (undefined_length_sequence, {"unreadable", "no-pixel-data"}),
}

RULE = """
[[rules]]
name = "feet"
action = "screen"
[rules.match]
BodyPartExamined = "FOOT"
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, fixture_bundle: Path
           ) -> Iterator[tuple[GatewayProcess, Path]]:
    tmp = tmp_path_factory.mktemp("hostile")
    port = free_port()
    state = tmp / "state"
    cfg = write_config(tmp / "c.toml", state=state, port=port,
                       destinations=f'[destinations.o]\nkind = "directory"\npath = "{tmp}/out"\n',
                       rules=RULE, default='action = "screen"\nthreshold = 1.0',
                       bundle=fixture_bundle, limits="max_instance_mb = 8")
    gw = GatewayProcess(cfg, tmp / "gateway.log", port).start()
    yield gw, state
    assert gw.stop() == 0


def send(port: int, path: Path) -> int | None:
    meta = pydicom.filereader.read_file_meta_info(path)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
    assoc = ae.associate("127.0.0.1", port, ae_title="SENTINEL")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(path)
    except RuntimeError:  # the association was aborted under the send
        status = None
    finally:
        if assoc.is_established:
            assoc.release()
    return int(status.Status) if status is not None and "Status" in status else None


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_instance_gets_a_typed_outcome(case: str, daemon: tuple[GatewayProcess, Path],
                                               tmp_path: Path, chunked_send: None) -> None:
    gw, state = daemon
    make, allowed = CASES[case]
    path = make(tmp_path)
    uid = str(pydicom.filereader.read_file_meta_info(path).MediaStorageSOPInstanceUID)
    status = send(gw.port, path)
    quarantine = Quarantine(state / "quarantine")
    if status == 0:
        # acknowledged: it must be resolved (quarantined with a typed reason), not left behind
        ok = wait_until(lambda: quarantine.get(uid) is not None
                        or bool(list((state.parent / "out").rglob(f"{uid}.dcm"))), 20)
        spool = state / "spool"
        stuck = [p.name for d in ("incoming", "work") for p in (spool / d).glob(f"{uid}*")]
        assert ok, f"{case}: acknowledged, then neither forwarded nor quarantined; {stuck}"
        record = quarantine.get(uid)
        assert record is not None, f"{case}: forwarded silently"
        assert record.reason in allowed, f"{case}: quarantined as {record.reason}"
        record_figures(f"hostile_{case}", {"status": "0x0000", "quarantine_reason": record.reason})
    else:
        assert status is None or status != 0
        record_figures(f"hostile_{case}", {"status": "none" if status is None else hex(status)})
    assert gw.proc is not None and gw.proc.poll() is None, "the daemon died"


def test_over_size_limit_refused_without_holding_it_in_memory(
        daemon: tuple[GatewayProcess, Path], tmp_path: Path, chunked_send: None) -> None:
    gw, state = daemon
    assert gw.proc is not None
    # 64 MiB of pixel data against a limit of 8 MiB
    rows = 4096
    big = make_cr(tmp_path / "big.dcm", np.zeros((rows, 8192), dtype=np.uint16), 12)
    small = _good(tmp_path / "small.dcm", seed=11)
    send(gw.port, small)  # warm the receive path first, so the baseline is fair
    time.sleep(0.5)
    before = vm_hwm_kib(gw.proc.pid)
    t0 = time.monotonic()
    status = send(gw.port, big)
    spent = time.monotonic() - t0
    after = vm_hwm_kib(gw.proc.pid)
    assert status != 0, "Success for an instance over the size limit"
    growth_mib = (after - before) / 1024
    assert growth_mib < 24, f"peak RSS grew by {growth_mib:.0f} MiB for a 64 MiB instance"
    uid = str(pydicom.filereader.read_file_meta_info(big).MediaStorageSOPInstanceUID)
    spool = state / "spool"
    # nothing kept as an instance (a partial receive in spool/tmp is swept later; see
    # tests/test_fault_disk.py for the sweep)
    assert not [p for p in spool.rglob(f"*{uid}*")]
    assert not [p for d in ("incoming", "work", "outbox") for p in (spool / d).rglob("*.dcm")
                if p.stat().st_size > 8 * MIB]
    assert send(gw.port, small) == 0  # still serving
    record_figures("hostile_over_size_limit", {
        "instance_mib": 64, "limit_mib": 8,
        "status": "none (aborted)" if status is None else hex(status),
        "peak_rss_growth_mib": round(growth_mib, 1), "seconds": round(spent, 2)})
