"""Full disk: the spool on a small tmpfs that the test mounts.

What is promised: the SCP answers Out of Resources (0xA700 family) once free space on the spool
falls below its watermark, i.e. before the disk is actually full; the refused instance leaves no
file anywhere in the spool; Verification (C-ECHO) keeps working; and instances are accepted
again as soon as space frees. An instance larger than all the space left (the watermark cannot
see it coming: pynetdicom streams it to disk before the handler runs) must still never get
Success nor be kept, the gateway must keep serving, and its partial receive must be swept from
spool/tmp (slow test: the sweep waits for 2 x the network timeout + 60 s).

Needs ``mount -t tmpfs`` (root, or CAP_SYS_ADMIN); skipped with a message elsewhere.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from bench.reliability import record_figures
from gateway.audit import verify
from tests.dcmtk import echoscu, free_port, require_dcmtk
from tests.dicom_factory import make_cr, sop_uid_of
from tests.gateway_harness import GatewayProcess, audit_events, wait_until, write_config

CR = "1.2.840.10008.5.1.4.1.1.1"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
MIB = 1024 * 1024


@pytest.fixture()
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 48 MiB tmpfs mounted for this test only."""
    mnt = tmp_path / "spoolfs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m,mode=0755", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for the spool here ({r.stderr.strip()}); run as root "
                    "(or with CAP_SYS_ADMIN) to test the full-disk behaviour")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def instance(path: Path, mib: float, seed: int) -> Path:
    """A 16-bit CR of about ``mib`` MiB of pixel data."""
    rows = 1024
    cols = max(8, int(mib * MIB / (rows * 2)))
    rng = np.random.default_rng(seed)
    return make_cr(path, rng.integers(0, 4096, (rows, cols), dtype=np.uint16), 12)


def fill_to(mnt: Path, leave: int) -> Path:
    """A ballast file that leaves ``leave`` bytes free on ``mnt`` (other users of the disk)."""
    ballast = mnt / "ballast.bin"
    size = free(mnt) - leave
    with ballast.open("wb") as fh:
        fh.write(b"\0" * max(0, size))
    return ballast


def spool_files(state: Path) -> list[Path]:
    spool = state / "spool"
    return [p for p in spool.rglob("*") if p.is_file() and "sent" not in p.parts]


def test_out_of_resources_before_full_echo_still_works_and_recovers(
        small_fs: Path, tmp_path: Path, fixture_bundle: Path) -> None:
    require_dcmtk()
    port, nobody = free_port(), free_port()
    state = small_fs / "state"
    # the PACS is unreachable, so accepted instances stay in the outbox and use the disk up
    dest = (f'[destinations.pacs]\nkind = "dicom"\nhost = "127.0.0.1"\nport = {nobody}\n'
            'ae_title = "GONE"\n')
    cfg = write_config(tmp_path / "c.toml", state=state, port=port, destinations=dest,
                       bundle=fixture_bundle, min_free_mb=8)
    gw = GatewayProcess(cfg, tmp_path / "gateway.log", port).start()
    files = [instance(tmp_path / "in" / f"i{i}.dcm", 1.0, i) for i in range(12)]
    ballast = fill_to(small_fs, 12 * MIB)  # 12 MiB free, watermark 8 MiB: room for ~4
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CR, EXPLICIT_LE)
    ae.add_requested_context(Verification)
    statuses: list[int] = []
    free_at_refusal = -1
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="SENTINEL")
        assert assoc.is_established
        refused: Path | None = None
        for f in files:
            st = assoc.send_c_store(pydicom.dcmread(f))
            statuses.append(int(st.Status))
            if int(st.Status) & 0xFF00 == 0xA700:
                free_at_refusal = free(small_fs)
                refused = f
                break
        assert refused is not None, f"never refused: {[hex(s) for s in statuses]}"
        assert statuses[:-1] and all(s == 0 for s in statuses[:-1])
        assert free_at_refusal >= 6 * MIB, "refused before the disk was full"
        # C-ECHO on the same association and on a new one
        assert assoc.send_c_echo().Status == 0
        assoc.release()
        assert echoscu(port).returncode == 0
        # the refused instance left nothing behind
        uid = sop_uid_of(refused)
        assert not [p for p in spool_files(state) if uid in p.name]
        assert not list((state / "spool" / "tmp").iterdir())
        # space frees (the ballast goes): accepted again, on a new association
        ballast.unlink()
        assoc = ae.associate("127.0.0.1", port, ae_title="SENTINEL")
        assert int(assoc.send_c_store(pydicom.dcmread(refused)).Status) == 0
        assoc.release()
        assert [p for p in spool_files(state) if uid in p.name and p.suffix == ".dcm"]
    finally:
        rc = gw.stop()
    assert rc == 0
    events = audit_events(state / "audit" / "audit.jsonl")
    assert any(e["event"] == "rejected" and e.get("reason") == "spool-full" for e in events)
    assert verify(state / "audit" / "audit.jsonl").ok
    assert "No space left" not in gw.log()
    record_figures("disk_watermark", {
        "accepted_before_refusal": len(statuses) - 1,
        "refusal_status": hex(statuses[-1]),
        "free_mib_at_refusal": round(free_at_refusal / MIB, 1),
        "watermark_mib": 8,
        "echo_while_refusing": "ok",
        "accepted_after_space_freed": True,
    })


def enospc_mid_receive(small_fs: Path, tmp_path: Path, bundle: Path, sweep: bool
                       ) -> dict[str, object]:
    """ENOSPC while pynetdicom streams the dataset: no Success, no instance kept, still serving.

    With ``sweep`` the test also waits for the partial receive in spool/tmp to be removed (the
    daemon sweeps receives idle for 2 x max(network, DIMSE timeout) + 60 s, once a minute).
    """
    require_dcmtk()
    port = free_port()
    state = small_fs / "state"
    out = tmp_path / "out"  # forwarded instances leave the small disk
    cfg = write_config(tmp_path / "c.toml", state=state, port=port,
                       destinations=f'[destinations.o]\nkind = "directory"\npath = "{out}"\n',
                       bundle=bundle, min_free_mb=2)
    gw = GatewayProcess(cfg, tmp_path / "gateway.log", port).start()
    big = instance(tmp_path / "big.dcm", 10.0, 1)
    small = instance(tmp_path / "small.dcm", 0.1, 2)
    ballast = fill_to(small_fs, 6 * MIB)  # above the watermark, but less than `big`
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CR, EXPLICIT_LE)
    ae.add_requested_context(Verification)
    tmp_dir = state / "spool" / "tmp"
    swept_after = None
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="SENTINEL")
        assert assoc.is_established
        status = None
        with contextlib.suppress(Exception):
            status = assoc.send_c_store(pydicom.dcmread(big))
        code = None if status is None or "Status" not in status else int(status.Status)
        assert code != 0, "Success for an instance that cannot be on disk"
        if assoc.is_established:
            assoc.release()
        t_end = time.monotonic()
        uid = sop_uid_of(big)
        assert not [p for p in spool_files(state) if uid in p.name and "tmp" not in p.parts]
        assert echoscu(port).returncode == 0  # still serving
        if sweep:
            # the partial receive must not hold the space for ever
            assert wait_until(lambda: not list(tmp_dir.iterdir()), 200, 1.0), list(
                tmp_dir.iterdir())
            swept_after = round(time.monotonic() - t_end)
        ballast.unlink()
        assoc = ae.associate("127.0.0.1", port, ae_title="SENTINEL")
        assert int(assoc.send_c_store(pydicom.dcmread(small)).Status) == 0
        assert int(assoc.send_c_store(pydicom.dcmread(big)).Status) == 0
        assoc.release()
    finally:
        rc = gw.stop()
    assert rc == 0
    return {"status_for_instance_bigger_than_free_space":
            "none (aborted)" if code is None else hex(code),
            "partial_receive_swept_after_s": swept_after}


def test_instance_larger_than_the_space_left(small_fs: Path, tmp_path: Path,
                                             fixture_bundle: Path) -> None:
    record_figures("disk_enospc", enospc_mid_receive(small_fs, tmp_path, fixture_bundle, False))


@pytest.mark.slow
def test_partial_receive_after_enospc_is_swept(small_fs: Path, tmp_path: Path,
                                               fixture_bundle: Path) -> None:
    record_figures("disk_enospc_sweep",
                   enospc_mid_receive(small_fs, tmp_path, fixture_bundle, True))
