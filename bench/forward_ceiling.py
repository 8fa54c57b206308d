"""The forwarder's ceiling: DCMTK storescu against a bare pynetdicom SCU, into the same Orthanc.

Why: the gateway forwards with pynetdicom (one persistent association per destination, the
stored dataset streamed as it is: ``STORE_SEND_CHUNKED_DATASET``). Whatever the gateway does
before forwarding, its end-to-end rate cannot beat what that sender alone achieves. This script
measures the sender with nothing else running, side by side with storescu sending the same set
to a fresh Orthanc of the same configuration, and prints the ratio.

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
)
from tests.dcmtk import free_port


def pynetdicom_send(port: int, files: list[Path]) -> float:
    """Seconds for a pynetdicom SCU set up as gateway.forward.DicomSender to send ``files``."""
    from pydicom.filereader import read_file_meta_info
    from pynetdicom import AE, _config, evt

    from gateway.forward import _nodelay_handler

    _config.STORE_SEND_CHUNKED_DATASET = True
    meta = read_file_meta_info(files[0])
    ae = AE(ae_title="SENTINEL")
    ae.maximum_pdu_size = 0
    ae.add_requested_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", port, ae_title=ORTHANC_AE,
                         evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay_handler)])
    if not assoc.is_established:
        raise RuntimeError("Orthanc refused the pynetdicom association")
    t0 = time.perf_counter()
    for f in files:
        status = assoc.send_c_store(f)
        if int(getattr(status, "Status", -1)) != 0:
            raise RuntimeError(f"C-STORE of {f} failed: {status}")
    took = time.perf_counter() - t0
    assoc.release()
    return took


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n512", type=int, default=300)
    p.add_argument("--nlarge", type=int, default=40)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cache", type=Path, default=Path("/tmp/sentinel-bench-cache"))
    p.add_argument("--bundle", type=Path, default=None,
                   help="accepted like the other scripts' and unused: no detector runs here")
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
                    py.append(n / pynetdicom_send(pacs.dicom_port, files))
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
