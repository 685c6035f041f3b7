#!/usr/bin/env python3
"""Writes monitoring/syncgate-rules.yaml: syncgate's alerts for a Prometheus
without the operator, rendered from the chart's PrometheusRule template
(helm/syncgate/templates/prometheusrule.yaml) with the default values, so
the two never differ (tests/helm/test_chart.py checks it).

Usage: .venv/bin/python scripts/render-rules.py [--check]
  --check  exit 1, saying so, when the file differs from a fresh rendering.
"""

import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "helm"))
from chart import REPO, kind, render  # noqa: E402

RULES = REPO / "monitoring" / "syncgate-rules.yaml"
HEADER = """\
# syncgate's alerts for Prometheus (rule_files), without the Prometheus
# Operator. Rendered from helm/syncgate/templates/prometheusrule.yaml with the
# chart's default thresholds by scripts/render-rules.py: edit the template and
# render again. What each alert means and how to act: docs/runbooks.md.
# Unit tests: monitoring/tests/syncgate-rules.test.yaml (promtool test rules).
"""


def rendered():
    values = {
        "role": "central",
        "central": {"upstream": "http://keystone:5000", "edges": ["site2"]},
        "secrets": {"adminToken": {"name": "a", "key": "t"}, "syncKey": {"name": "s", "key": "k"}},
        "metrics": {"prometheusRule": {"enabled": True}},
    }
    [rule] = kind(render(values), "PrometheusRule")
    return HEADER + yaml.safe_dump(rule["spec"], sort_keys=False, width=200)


def main():
    text = rendered()
    if "--check" in sys.argv[1:]:
        if not RULES.exists() or RULES.read_text() != text:
            print(f"{RULES.relative_to(REPO)} differs from the chart's template: "
                  "run scripts/render-rules.py", file=sys.stderr)
            return 1
        return 0
    RULES.write_text(text)
    print(f"wrote {RULES.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
