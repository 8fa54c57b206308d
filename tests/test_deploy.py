"""deploy/: the example Prometheus alert rules and Grafana dashboard name only metrics the
gateway really exports (gateway/metrics.py), with the suffixes the Prometheus client adds."""

from __future__ import annotations

import json
import re
from pathlib import Path

from gateway.metrics import Metrics

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "deploy" / "prometheus-rules.yml"
DASHBOARD = REPO / "deploy" / "grafana-dashboard.json"
SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",),
            "histogram": ("_bucket", "_sum", "_count", "_created")}


def exported() -> set[str]:
    """Every sample name the gateway's registry can expose."""
    return {f.name + s for f in Metrics().registry.collect() for s in SUFFIXES[f.type]}


def rule_expressions() -> dict[str, str]:
    """alert name -> expr, read from the rule file's simple YAML (block scalars included)."""
    rules: dict[str, str] = {}
    lines = RULES.read_text().splitlines()
    name = None
    for i, line in enumerate(lines):
        if m := re.match(r"^\s*- alert: (\S+)$", line):
            name = m.group(1)
        elif (m := re.match(r"^(\s*)expr: (.*)$", line)) and name is not None:
            indent, text = len(m.group(1)), m.group(2)
            if text.strip() == "|":
                body = []
                for nxt in lines[i + 1:]:
                    if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= indent:
                        break
                    body.append(nxt.strip())
                text = " ".join(body)
            rules[name] = text.strip()
            name = None
    return rules


def dashboard_expressions() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in doc["panels"] for t in p["targets"]]


def _balanced(expr: str) -> bool:
    depth = 0
    for ch in expr:
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth < 0:
            return False
    return depth == 0


def test_every_metric_the_rules_and_dashboard_use_exists() -> None:
    known = exported()
    rules = rule_expressions()
    exprs = [*rules.values(), *dashboard_expressions()]
    assert len(rules) >= 8 and len(exprs) >= 20
    used = {n for e in exprs for n in re.findall(r"\bsentinel_[a-z_]+", e)}
    assert used, exprs
    assert not used - known, f"not exported by gateway/metrics.py: {sorted(used - known)}"
    for expr in exprs:
        assert _balanced(expr), expr


def test_rules_cover_the_issue_alerts() -> None:
    """Quarantine, dead letters and a caller's flag-rate jump (as gateway.alerts does)."""
    rules = rule_expressions()
    text = " ".join(rules.values())
    assert "sentinel_quarantined_total" in text and "sentinel_dead_lettered_total" in text
    flag = rules["SentinelFlagRateHigh"]
    assert "by (caller)" in flag and "sentinel_flagged_total" in flag
    m = Metrics()  # the rule groups by labels the counters really have
    assert "caller" in m._flagged._labelnames and "caller" in m._screened._labelnames


def test_dashboard_is_importable_json() -> None:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["uid"] and doc["panels"]
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    for p in doc["panels"]:
        assert p["datasource"]["uid"] == "${DS_PROMETHEUS}"
        assert {"x", "y", "w", "h"} <= set(p["gridPos"])
