"""Does the running gateway hold on to memory per instance? A soak of the real daemon.

``sentinel serve`` (screening on, the shipped bundle, a directory destination) receives
``--rounds`` rounds of ``--n`` instances from DCMTK ``storescu``; after each round, once every
instance has been screened and delivered, the daemon's resident set (VmRSS) is read. A leak
shows as a slope that does not flatten; the figures printed are the growth from the end of the
first round (warm: decoders, model and caches loaded) to the end of the last, and over the
second half of the rounds alone (a plateau reads 0), per instance.
Every tenth instance carries a made-up Modality value, the sender-controlled variety that once
grew the metrics without bound. With ``--hostile`` the rounds are instead the fuzz test's mutated
datasets (tests/test_fuzz.py, bit flips, truncations, wrong lengths and syntaxes), streamed by a
pynetdicom SCU as raw bytes, since storescu will not send what it cannot parse.

Run: ``.venv/bin/python -m bench.soak [--rounds 6 --n 500]``.
"""

from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path

import numpy as np

from bench.common import (
    STORESCU,
    GatewayProcess,
    bundle_dir,
    dcmtk_env,
    descendants,
    free_port,
    loadavg,
    make_cr,
    print_header,
    status_mb,
    wait_until,
    workdir,
    write_config,
)


def vm_rss_mb(pid: int) -> float:
    """Resident set of the daemon plus its scoring processes, MB."""
    return sum(status_mb(p, "VmRSS") for p in (pid, *descendants(pid)))


def make_round(directory: Path, n: int, round_no: int) -> list[Path]:
    """``n`` instances of 256x256, one study per 4; every 10th with a made-up Modality."""
    from pydicom.uid import generate_uid

    directory.mkdir(parents=True)
    rng = np.random.default_rng(round_no)
    files = []
    study = ""
    for i in range(n):
        if i % 4 == 0:
            study = generate_uid()
        pixels = (rng.random((256, 256)) * 4095).astype(np.uint16)
        modality = f"Z{round_no:02d}{i:04d}"[:16] if i % 10 == 0 else "CR"
        f = make_cr(directory / f"i{i:05d}.dcm", pixels, 12, study_uid=study,
                    instance_number=i + 1, modality=modality)
        files.append(f)
    return files


def make_hostile_round(directory: Path, n: int, seeds: list) -> list[Path]:  # type: ignore[type-arg]
    """``n`` files: the fuzz test's mutations of small valid seeds, each with its own UID."""
    import io

    import pydicom
    from hypothesis import HealthCheck, given, settings
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import generate_uid

    from tests.test_fuzz import hostile_inputs

    directory.mkdir(parents=True)
    cases: list[tuple[str, str, bytes]] = []

    @settings(max_examples=n, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(hostile_inputs(seeds))
    def collect(case: tuple[str, str, bytes]) -> None:
        cases.append(case)

    collect()
    files = []
    for i, (syntax, sop_class, data) in enumerate(cases[:n]):
        meta = pydicom.dataset.FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = syntax
        buf = io.BytesIO()
        buf.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(buf, meta, enforce_standard=True)
        buf.write(data)
        f = directory / f"h{i:05d}.dcm"
        f.write_bytes(buf.getvalue())
        files.append(f)
    return files


def send_raw(port: int, files: list[Path]) -> int:
    """Stream each file's dataset bytes as they are over one association; returns how many
    got any response (Success or a failure status)."""
    from pydicom.filereader import read_file_meta_info
    from pynetdicom import AE, _config

    from tests.test_fuzz import SYNTAXES

    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = AE(ae_title="MODALITY")
    classes = {str(read_file_meta_info(f).MediaStorageSOPClassUID) for f in files}
    for c in sorted(classes)[:12]:
        ae.add_requested_context(c, [str(s) for s in SYNTAXES][:10])
    answered = 0
    assoc = ae.associate("127.0.0.1", port, ae_title="SENTINEL")
    if not assoc.is_established:
        return 0
    try:
        for f in files:
            try:
                status = assoc.send_c_store(f)
            except (ValueError, RuntimeError):  # no context for its syntax: not sent
                continue
            if not assoc.is_established:
                assoc = ae.associate("127.0.0.1", port, ae_title="SENTINEL")
            if status:
                answered += 1
    finally:
        if assoc.is_established:
            assoc.release()
    return answered


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--n", type=int, default=500, help="instances per round")
    p.add_argument("--hostile", action="store_true",
                   help="rounds of mutated datasets (the fuzz test's) instead of clean ones")
    args = p.parse_args(argv)
    print_header("soak: the daemon's resident memory across rounds", argv or [])
    with workdir() as root:
        bundle, which = bundle_dir(root)
        out = root / "out"
        port = free_port()
        cfg = write_config(root / "c.toml", state=root / "state", port=port,
                           destinations=f'[destinations.o]\nkind = "directory"\n'
                                        f'path = "{out}"',
                           default='action = "screen"', bundle=bundle)
        gw = GatewayProcess(cfg, root / "gateway.log", port).start()
        assert gw.proc is not None
        rss: list[float] = []
        try:
            done = 0
            seeds = None
            if args.hostile:
                from tests.test_fuzz import make_seeds

                seeds = make_seeds(root / "seeds")
            for r in range(args.rounds):
                t0 = time.monotonic()
                if seeds is not None:
                    files = make_hostile_round(root / f"r{r}", args.n, seeds)
                    send_raw(port, files)
                    settled = wait_until(lambda: _spool_empty(root), 120)
                    done += len(files)
                else:
                    files = make_round(root / f"r{r}", args.n, r)
                    subprocess.run([STORESCU, "-aet", "MODALITY", "-aec", "SENTINEL", "-to",
                                    "30", "-td", "120", "127.0.0.1", str(port),
                                    *map(str, files)],
                                   env=dcmtk_env(), capture_output=True, check=False,
                                   timeout=600)
                    done += len(files)
                    settled = wait_until(lambda n=done: _handled(root) >= n, 120)
                time.sleep(1.0)
                rss.append(vm_rss_mb(gw.proc.pid))
                print(f"round {r + 1}: {done} instances handled={settled} in "
                      f"{time.monotonic() - t0:.0f}s ({_outcomes(root)}), VmRSS {rss[-1]:.1f} MB "
                      f"(load {loadavg()})", flush=True)
        finally:
            gw.stop()
    if len(rss) > 1:
        per = (rss[-1] - rss[0]) * 1024 / (args.n * (len(rss) - 1))
        half = len(rss) // 2
        late = (rss[-1] - rss[half]) * 1024 / (args.n * (len(rss) - 1 - half) or 1)
        print(f"bundle: {which}; growth after round 1: {rss[-1] - rss[0]:+.1f} MB over "
              f"{args.n * (len(rss) - 1)} instances = {per:+.2f} KiB per instance; over the "
              f"second half of the rounds: {late:+.2f} KiB per instance")
    return 0


def _event_counts(root: Path) -> dict[str, int]:
    """Audit events so far: forwarded, quarantined, rejected."""
    audit = root / "state" / "audit" / "audit.jsonl"
    text = audit.read_text() if audit.exists() else ""
    return {e: text.count('"event":"' + e + '"') for e in ("forwarded", "quarantined", "rejected")}


def _outcomes(root: Path) -> str:
    return ", ".join(f"{e} {n}" for e, n in _event_counts(root).items())


def _spool_empty(root: Path) -> bool:
    """Nothing left in the spool's incoming and work folders (everything routed)."""
    spool = root / "state" / "spool"
    return not any(p.is_file() for d in ("incoming", "work") for p in (spool / d).rglob("*"))


def _handled(root: Path) -> int:
    """Instances delivered to the directory or quarantined so far (from the audit log)."""
    counts = _event_counts(root)
    return counts["forwarded"] + counts["quarantined"]


if __name__ == "__main__":
    raise SystemExit(main())
