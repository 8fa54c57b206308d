"""The forwarder's ceiling: DCMTK storescu against the gateway's own sender, into the same Orthanc.

Why: the gateway forwards with pynetdicom (``gateway.forward.DicomSender``: one persistent
association per destination, the stored dataset streamed as it is). Whatever the gateway does
before forwarding, its end-to-end rate cannot beat what that sender alone achieves. This script
runs that sender with nothing else of the daemon around it, side by side with storescu sending
the same set to a fresh Orthanc of the same configuration, and prints the ratio.

    .venv/bin/python -m bench.forward_ceiling [--n512 300] [--nlarge 40] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bench.common import (
    ORTHANC_AE,
    issue_sets,
    loadavg,
    orthanc,
    print_header,
    ratio_line,
    send_parallel,
    summarize,
    workdir,
    write_config,
)
from tests.dcmtk import free_port


def pynetdicom_send(root: Path, port: int, files: list[Path], associations: int = 1) -> float:
    """Seconds for the gateway's own sender (gateway.forward.DicomSender) to send ``files`` to
    the Orthanc on ``port`` over ``associations`` concurrent associations (one thread each, the
    files dealt round robin): the forwarder without the rest of the daemon."""
    from concurrent.futures import ThreadPoolExecutor

    from gateway.config import load_config
    from gateway.forward import DicomSender

    dest = (f'[destinations.pacs]\nkind = "dicom"\nhost = "127.0.0.1"\nport = {port}\n'
            f'ae_title = "{ORTHANC_AE}"\n')
    cfg = load_config(write_config(root / "sender.toml", state=root / "state", port=free_port(),
                                   destinations=dest))
    senders = [DicomSender(cfg.destinations["pacs"], lambda: cfg) for _ in range(associations)]

    def run(k: int) -> None:
        for f in files[k::associations]:
            senders[k].send(f, {})

    t0 = time.perf_counter()
    try:
        with ThreadPoolExecutor(associations) as pool:
            list(pool.map(run, range(associations)))
        return time.perf_counter() - t0
    finally:
        for sender in senders:
            sender.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n512", type=int, default=300)
    p.add_argument("--nlarge", type=int, default=40)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cache", type=Path, default=Path("/tmp/sentinel-bench-cache"))
    p.add_argument("--bundle", type=Path, default=None,
                   help="accepted like the other scripts' and unused: no detector runs here")
    p.add_argument("--associations", type=int, default=1,
                   help="concurrent associations of the gateway's sender (storescu: always one)")
    p.add_argument("--tiny", action="store_true", help="smoke mode: 6 x 512x512, one repeat")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.tiny:
        args.n512, args.nlarge, args.repeats = 6, 0, 1
    print_header("forwarder ceiling: storescu vs pynetdicom SCU into Orthanc",
                 ["bench.forward_ceiling", *(sys.argv[1:] if argv is None else argv)])
    with workdir() as work:
        for label, _rows, _cols, files in issue_sets(args.cache, args.n512, args.nlarge):
            n = len(files)
            dcmtk, py = [], []
            for r in range(args.repeats):
                with orthanc(work / "a") as pacs:
                    t0 = time.perf_counter()
                    send_parallel(pacs.dicom_port, [files], ORTHANC_AE)
                    dcmtk.append(n / (time.perf_counter() - t0))
                with orthanc(work / "b", gateway_port=free_port()) as pacs:
                    py.append(n / pynetdicom_send(work / "b", pacs.dicom_port, files,
                                                  args.associations))
                print(f"  repeat {r + 1}: storescu {dcmtk[-1]:.1f}/s, pynetdicom {py[-1]:.1f}/s, "
                      f"load {loadavg()}", flush=True)
            print(f"\n## {label}: {n} instances")
            print(f"storescu inst/s {summarize(dcmtk).fmt()}; pynetdicom inst/s "
                  f"{summarize(py).fmt()}")
            print(ratio_line(f"pynetdicom/storescu {label}",
                             [b / a for a, b in zip(dcmtk, py, strict=True)]))
    print(f"\nloadavg_end: {loadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
