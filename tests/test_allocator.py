"""gateway.allocator: freed image-sized blocks are reused, not page-faulted in again."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import resource, sys
import numpy as np
if sys.argv[1] == "tuned":
    from gateway.allocator import keep_freed_memory
    assert keep_freed_memory()
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    # a 512x512 frame's working set: its float copies and intermediates, alive together
    arrays = [np.ones((512, 512), dtype=np.float64) for _ in range(6)]
    del arrays
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(max(faults[2:]))
"""


def faults_per_instance(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         check=True, timeout=60)
    return int(out.stdout.strip())


def test_tuned_process_reuses_freed_frames_without_page_faults() -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's mallopt: Linux only")
    default, tuned = faults_per_instance("default"), faults_per_instance("tuned")
    assert default >= 1000, f"the probe no longer shows the cost it guards against ({default})"
    assert tuned < default / 10, (default, tuned)
