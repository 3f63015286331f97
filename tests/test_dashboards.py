"""The Grafana dashboards agree with the server's metrics: every query names metrics and labels
that cnn-serve exposes, parses as PromQL (promtool, skipped where missing), and reads the
provisioned Prometheus datasource."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry

from server.metrics import ServerMetrics
from tests.test_deploy import ROOT, load_yaml, nodes, run_tool, services

DASHBOARDS = ROOT / "deploy/grafana/dashboards"
TARGET_LABELS = {"instance", "job"}  # added by Prometheus to every scraped series
PROMQL_WORDS = r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)"


def exposed_metrics() -> dict[str, set[str]]:
    """Sample name -> label names, as a server with one loaded model version exposes them."""
    metrics = ServerMetrics(CollectorRegistry())
    metrics.version_loaded("m", "1", "CPUExecutionProvider", "lenet5", "mnist", lambda: 0, lambda: 0)
    metrics.set_server_info("auto", "CPUExecutionProvider")
    out: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


def dashboards() -> list[Any]:
    found = [json.loads(p.read_text()) for p in DASHBOARDS.glob("*.json")]
    assert found, f"no dashboard in {DASHBOARDS}"
    return found


def dashboard_queries() -> list[tuple[str, str]]:
    """(expr, legendFormat) of every query of every provisioned dashboard."""
    return [(n["expr"], n.get("legendFormat", "")) for d in dashboards() for n in nodes(d) if "expr" in n]


def test_dashboard_queries_use_the_server_metrics_and_labels() -> None:
    exposed = exposed_metrics()
    for expr, legend in dashboard_queries():
        e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
        labels = {m for inner in re.findall(r"\{([^}]*)\}", e) for m in re.findall(r"(\w+)\s*[=!]", inner)}
        labels |= {w for inner in re.findall(PROMQL_WORDS, e) for w in re.findall(r"\w+", inner)[1:]}
        labels |= set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
        bare = re.sub(rf"\{{[^}}]*\}}|\[[^\]]*\]|{PROMQL_WORDS}|\$\w+", " ", e)
        names = set(re.findall(r"\b([a-zA-Z_:][\w:]*)\b(?!\s*\()", bare)) - {"bool", "and", "or", "unless"}
        assert names and names <= set(exposed), f"{expr}: {names - set(exposed)} not in server/metrics.py"
        allowed = set().union(*(exposed[n] for n in names)) | TARGET_LABELS
        assert labels <= allowed, f"{expr}: labels {labels - allowed} not on {names}"
    for dash in dashboards():
        for var in dash["templating"]["list"]:
            metric, label = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", var["definition"]).groups()  # type: ignore[union-attr]
            assert label in exposed[metric] | TARGET_LABELS


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    subst = {"$__rate_interval": "1m", "$__range": "1h", "$model": ".*"}
    rules = [
        {
            "record": f"dashboard:q{i}",
            "expr": functools.reduce(lambda e, kv: e.replace(*kv), subst.items(), x),
        }
        for i, (x, _) in enumerate(dashboard_queries())
    ]
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run_tool("promtool", "check", "rules", str(tmp_path / "rules.yml"))


def test_dashboard_datasource_is_the_provisioned_one() -> None:
    (source,) = load_yaml("deploy/grafana/provisioning/datasources/prometheus.yml")["datasources"]
    assert source["url"].split("//")[1].split(":")[0] in services()
    scrape = load_yaml("deploy/prometheus.yml")["global"]["scrape_interval"]
    assert source["jsonData"]["timeInterval"] == scrape, "$__rate_interval must cover >= 4 scrapes"
    for dash in dashboards():
        refs = [n["datasource"] for n in nodes(dash) if "datasource" in n]
        assert all(isinstance(r, dict) for r in refs), "a datasource given by name breaks on a rename"
        assert {r["uid"] for r in refs if r["type"] == "prometheus"} == {source["uid"]}
