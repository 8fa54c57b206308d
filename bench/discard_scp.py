"""A pynetdicom Storage SCP that acknowledges every C-STORE and keeps nothing (the ingest
baseline: what Python DICOM networking alone costs on this machine, no disk, no screening).

Same socket settings as the gateway's receiver, so the comparison isolates the gateway's own
work: ``TCP_NODELAY`` on each accepted socket and ``maximum_pdu_size = 0``. Run as a child
process so its GIL is not shared with the benchmark driver:

    .venv/bin/python -m bench.discard_scp --port 11112
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import socket
import sys
import threading
from typing import Any

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]


def _nodelay(event: Any) -> None:
    with contextlib.suppress(AttributeError, OSError):
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _discard(event: Any) -> int:
    return 0x0000  # the dataset is never decoded


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ae-title", default="SENTINEL")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    ae = AE(ae_title=args.ae_title)
    ae.maximum_pdu_size = 0
    ae.maximum_associations = 64
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
    server = ae.start_server(("127.0.0.1", args.port), block=False,
                             evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay),
                                           (evt.EVT_C_STORE, _discard)])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print("ready", flush=True)
    stop.wait()
    server.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
