"""Metric labels stay bounded whatever senders put in their datasets.

The memory growth the long fuzz run measured (~8-10 KiB per input) was one new Prometheus
series per made-up Modality value; these tests would fail if a sender-controlled value went
into a label again.
"""

from __future__ import annotations

import tracemalloc

from gateway.metrics import MODALITY_TERMS, Metrics, modality_label


def _series(m: Metrics) -> int:
    return sum(len(f.samples) for f in m.registry.collect())


def _feed(m: Metrics, modality: str) -> None:
    m.received(modality, "MODALITY1")
    m.scored(modality, "MODALITY1", True, 0.004)
    m.screen_error(modality, "unreadable")
    m.forwarded("pacs", modality, "MODALITY1", 12.0)
    m.quarantined(modality, "MODALITY1", "flagged")
    m.rejected("MODALITY1", modality, "rule")


def test_defined_terms_keep_their_label_and_others_fold() -> None:
    assert modality_label("CR") == "CR" and modality_label("DX") == "DX"
    assert modality_label("") == ""
    assert modality_label("C2") == modality_label("ZZZZ") == "OTHER"
    assert {"CR", "DX", "MG", "CT", "SR", "PR", "KO", "SEG"} <= MODALITY_TERMS


def test_hostile_modality_values_add_no_series_and_no_memory() -> None:
    m = Metrics()
    _feed(m, "CR")
    _feed(m, "OTHER")
    before = _series(m)
    tracemalloc.start()
    try:
        for i in range(3000):  # the first round warms the interpreter's free lists (~300 KiB)
            _feed(m, f"W{i:05d}")
        base = tracemalloc.get_traced_memory()[0]
        for i in range(3000):  # before the fix: +6 KiB per value, 18 MiB here
            _feed(m, f"X{i:05d}")
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert _series(m) == before
    assert grown < 64 * 1024, f"{grown} bytes for 3,000 made-up modalities"
    text = m.render().decode()
    assert "X00001" not in text and 'modality="OTHER"' in text
