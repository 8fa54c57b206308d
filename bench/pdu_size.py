"""Receive throughput of the gateway against the maximum PDU length it advertises.

Why: "unlimited" (``max_pdu_kb = 0``) let a peer make the gateway buffer a PDU of any length
(issue 20, defect 2), so the advertised maximum must be bounded; this measures what each bound
costs. The gateway only receives here (rule ``pass``, its destination down, so nothing is
screened or forwarded), and each advertised size gets a fresh gateway; sizes are interleaved
across repeats so the machine's noise falls on all of them alike.

Two senders, because they use the advertised maximum differently:
- DCMTK ``storescu`` (``TCP_NODELAY=1``) never sends a PDU longer than 128 KiB, whatever is
  advertised (its ``--max-send-pdu`` ceiling);
- pynetdicom (chunked send, ``TCP_NODELAY`` set) fills whatever is advertised (one PDU per
  instance when unlimited).

    .venv/bin/python -m bench.pdu_size                       # 16, 128, 256, 1024, 4096 KiB
    .venv/bin/python -m bench.pdu_size --sizes 0,256,1024 --repeats 3 --nlarge 10 --n512 60
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from bench.common import (
    GATEWAY_AE,
    loadavg,
    make_set,
    megabytes,
    print_header,
    send_parallel,
    summarize,
    workdir,
)
from tests.dcmtk import free_port
from tests.gateway_harness import GatewayProcess, write_config


@contextlib.contextmanager
def receive_only(root: Path, max_pdu_kb: int) -> Iterator[int]:
    """A gateway advertising ``max_pdu_kb`` that routes everything ``pass`` to a dead port."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    dest = (f'[destinations.down]\nkind = "dicom"\nhost = "127.0.0.1"\nport = {free_port()}\n'
            'ae_title = "NOBODY"\n')
    cfg = write_config(root / f"gw-{max_pdu_kb}.toml", state=root / f"state-{max_pdu_kb}",
                       port=port, destinations=dest, default='action = "pass"',
                       callers=("MODALITY",),
                       limits=f"max_pdu_kb = {max_pdu_kb}\nmax_instance_mb = 200",
                       forwarding="backoff_initial_s = 30\nbackoff_max_s = 60\nmax_age_s = 600")
    gw = GatewayProcess(cfg, root / f"gw-{max_pdu_kb}.log", port)
    gw.start(timeout=120, env={"TCP_NODELAY": "1", "OPENBLAS_NUM_THREADS": "1"})
    try:
        yield port
    finally:
        gw.stop()


def send_pynetdicom(port: int, files: Sequence[Path]) -> float:
    """One association, chunked send (the file's dataset bytes as they are); wall seconds."""
    import pydicom
    from pynetdicom import AE, _config

    _config.STORE_SEND_CHUNKED_DATASET = True
    meta = pydicom.filereader.read_file_meta_info(files[0])
    ae = AE(ae_title="MODALITY")
    ae.maximum_pdu_size = 0
    ae.add_requested_context(str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
    t0 = time.perf_counter()
    assoc = ae.associate("127.0.0.1", port, ae_title=GATEWAY_AE)
    if not assoc.is_established:
        raise RuntimeError("pynetdicom: association refused")
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        for f in files:
            status = assoc.send_c_store(f)
            if status is None or int(getattr(status, "Status", -1)) != 0:
                raise RuntimeError(f"pynetdicom: C-STORE of {f.name} failed: {status}")
    finally:
        assoc.release()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="16,128,256,1024,4096",
                   help="advertised maxima in KiB, comma separated (0: unlimited where allowed)")
    p.add_argument("--nlarge", type=int, default=10, help="2048x2500 16-bit CR (10 MB each)")
    p.add_argument("--n512", type=int, default=60, help="512x512 16-bit CR (0.5 MB each)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cache", type=Path, default=Path("/tmp/sentinel-bench-cache"))
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    print_header("pdu_size: gateway receive rate per advertised maximum PDU length",
                 ["bench.pdu_size", *argv])
    sets = {"2048x2500": make_set(args.cache / f"set-2500x2048-{args.nlarge}", args.nlarge,
                                  2500, 2048),
            "512x512": make_set(args.cache / f"set-512x512-{args.n512}", args.n512, 512, 512)}
    warm = make_set(args.cache / "warm-512x512-2", 2, 512, 512, seed=1)
    rates: dict[tuple[int, str, str], list[float]] = {}
    with workdir() as work:
        for rep in range(args.repeats):
            for kb in sizes:
                with receive_only(work / f"r{rep}", kb) as port:
                    send_parallel(port, [warm], GATEWAY_AE)
                    for label, files in sets.items():
                        wall = send_parallel(port, [files], GATEWAY_AE)
                        rates.setdefault((kb, label, "storescu"), []).append(
                            megabytes(files) / wall)
                    files = sets["2048x2500"]
                    wall = send_pynetdicom(port, files)
                    rates.setdefault((kb, "2048x2500", "pynetdicom"), []).append(
                        megabytes(files) / wall)
            print(f"repeat {rep + 1}/{args.repeats} done (load {loadavg()})", flush=True)
    print("\nMB/s received (median [min-max] n), by advertised max_pdu_kb:")
    for key in sorted({(k[1], k[2]) for k in rates}):
        label, sender = key
        base = summarize(rates[(sizes[0], label, sender)]).median
        print(f"  {label} via {sender}:")
        for kb in sizes:
            s = summarize(rates[(kb, label, sender)])
            print(f"    {kb:>6} KiB: {s.fmt(1)} MB/s  ({s.median / base:.2f}x of {sizes[0]} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
