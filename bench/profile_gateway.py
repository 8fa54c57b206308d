"""Profile the running gateway with py-spy while storescu sends a set through it to Orthanc.

Why a script: the profile that matters is the daemon's under the benchmark's own load (the
receiver, screening workers and forwarder threads competing for two cores and one GIL), so
this starts the same servers as bench/throughput.py, attaches ``py-spy record`` (sampling,
non-blocking) to the gateway process and its scoring children for the duration of the send,
and prints where the on-CPU samples go: by thread role, by self time, and by inclusive time of
the gateway's and detector's own functions. The raw collapsed stacks are kept for flame graphs.

Needs py-spy (``.venv/bin/pip install py-spy``) and ptrace permission on the child.

    .venv/bin/python -m bench.profile_gateway --n 200 --rows 512 --cols 512 --out /tmp/prof512
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.common import (
    GATEWAY_AE,
    SCREEN_ALL,
    bundle_dir,
    free_port,
    gateway,
    loadavg,
    make_set,
    orthanc,
    send_parallel,
    split,
    wait_until,
    workdir,
)

OWN = re.compile(r"\((gateway|detector)/")


def role(thread_frame: str, stack: list[str]) -> str:
    text = ";".join(stack)
    if "detector_process.py" in text:
        return "scoring process (decode + score)"
    if "forward.py" in text and "_run" in text:
        return "forwarder"
    if "screening.py" in text:
        return "screening"
    if "scp.py" in text or "dul.py" in text or "dimse" in text or "association.py" in text:
        return "receiver (pynetdicom)"
    return "other"


def summarize_collapsed(path: Path, top: int) -> None:
    per_role: collections.Counter[str] = collections.Counter()
    self_t: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        n = int(count_text)
        frames = stack_text.split(";")
        total += n
        per_role[role(frames[0], frames[1:])] += n
        if len(frames) > 1:
            self_t[frames[-1]] += n
        for f in set(frames[1:]):
            if OWN.search(f) or "pynetdicom" in f or "pydicom" in f:
                incl[f] += n
    print(f"on-CPU samples: {total}")
    print("by thread role:")
    for k, v in per_role.most_common():
        print(f"  {100.0 * v / total:5.1f}%  {k}")
    print(f"top {top} self:")
    for k, v in self_t.most_common(top):
        print(f"  {100.0 * v / total:5.1f}%  {k}")
    print(f"top {top} inclusive (gateway, detector, pynetdicom, pydicom frames):")
    for k, v in incl.most_common(top):
        print(f"  {100.0 * v / total:5.1f}%  {k}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--cols", type=int, default=512)
    p.add_argument("--k", type=int, default=1, help="concurrent associations")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    p.add_argument("--idle", action="store_true", help="also sample waiting threads")
    p.add_argument("--gil", action="store_true",
                   help="only sample the thread holding the GIL (where Python time goes)")
    p.add_argument("--no-screen", action="store_true",
                   help='default rule action = "pass": receive + forward only')
    p.add_argument("--receive-only", action="store_true",
                   help='action = "pass" to a destination with nothing listening: the receive '
                   "path alone (as bench.ingest --receive-only)")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--out", type=Path, default=Path("/tmp/sentinel-profile"))
    p.add_argument("--cache", type=Path, default=Path("/tmp/sentinel-bench-cache"))
    p.add_argument("--bundle", type=Path, default=None)
    args = p.parse_args(argv)
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    files = make_set(args.cache / f"set-{args.rows}x{args.cols}-{args.n}", args.n, args.rows,
                     args.cols)
    bundle, which = bundle_dir(args.cache, args.bundle)
    args.out.mkdir(parents=True, exist_ok=True)
    raw = args.out / "gateway.collapsed.txt"
    print(f"profile: {args.n} x {args.rows}x{args.cols}, k={args.k}, bundle: {which}, "
          f"load {loadavg()}")
    with workdir() as work:
        port = free_port()
        pass_only = args.no_screen or args.receive_only
        with orthanc(work / "orthanc", gateway_port=port) as pacs, \
                gateway(work / "gw", free_port() if args.receive_only else pacs.dicom_port, port,
                        bundle, workers=args.workers,
                        default_rule='action = "pass"' if pass_only else SCREEN_ALL) as gw:
            cmd = [pyspy, "record", "--pid", str(gw.pid), "--rate", str(args.rate), "--format",
                   "raw", "--threads", "--nonblocking", "--subprocesses", "-o", str(raw)]
            if args.idle:
                cmd.append("--idle")
            if args.gil:
                cmd.append("--gil")
            spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(1.0)
            t0 = time.time()
            ack = send_parallel(port, split(files, args.k), GATEWAY_AE)
            if not args.receive_only:
                wait_until(lambda: len(gw.forwarded_times()) >= args.n, timeout=600,
                           interval=0.05)
            done = max(gw.forwarded_times().values(), default=t0 + ack) - t0
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
    print(f"acknowledged in {ack:.2f} s ({args.n / ack:.1f}/s), all forwarded in {done:.2f} s "
          f"({args.n / done:.1f}/s); load {loadavg()}")
    summarize_collapsed(raw, args.top)
    print(f"raw stacks: {raw}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
