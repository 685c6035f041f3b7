"""The Grafana dashboard's queries, as Grafana runs them with every value of
its variables selected: read by the chart's test (promtool parses them) and
the end-to-end suite (a real Prometheus answers them)."""

import json
from pathlib import Path

DASHBOARD = Path(__file__).resolve().parents[2] / "helm" / "syncgate" / "dashboards" / "syncgate.json"
# What Grafana puts in place of the dashboard's variables ("All" selected).
VARIABLES = {"$__rate_interval": "1m", "$edge_job": ".*", "$job": ".*", "$edge": ".*"}


def panel_queries(board=None):
    """Every panel's (title, [PromQL])."""
    board = board or json.loads(DASHBOARD.read_text())
    out = []
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        exprs = []
        for t in panel["targets"]:
            e = t["expr"]
            for k in sorted(VARIABLES, key=len, reverse=True):
                e = e.replace(k, VARIABLES[k])
            assert "$" not in e, f"panel {panel['title']!r}: a variable the tests do not know in {e}"
            exprs.append(e)
        out.append((panel["title"], exprs))
    return out
