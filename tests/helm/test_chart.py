#!/usr/bin/env python3
"""The Helm chart (helm/syncgate), checked with Helm's own engine (the
helm-python-sdk package embeds Helm's Go SDK; no helm binary) and the
Kubernetes schemas (kubernetes-validate, strict: unknown fields are errors):

- `helm lint --strict` for central and edge values;
- every manifest of several releases (central embedded broker, central with an
  external broker and every option on, edge, no persistence) validated against
  Kubernetes 1.37's schemas; PodMonitor and ServiceMonitor are CRDs that those
  schemas do not hold, and are checked for their required fields only;
- values.schema.json rejects bad values, and missing required values fail with
  a line naming them;
- the pod's security context, probes, Secret files, and the config checksum;
- the rendered configuration file is accepted by the binary itself
  (`syncgate config check`) with the rendered environment and Secret files.
Prints `helm: N passed, M failed`.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
import tomllib
import traceback
from copy import deepcopy
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chart import CHART, REPO, Workload, kind, notes, render  # noqa: E402
from dashboard import DASHBOARD, panel_queries  # noqa: E402

K8S = "1.37.0"
BIN = os.environ.get("SYNCGATE_BIN") or str(REPO / "target" / "debug" / "syncgate")
results = []

SECRETS = {
    "sg-admin": {"token": "admin-token-value-1"},
    "sg-sync": {"key": "c2VjcmV0LXN5bmMta2V5LTMyLWJ5dGVzLWxvbmctISE="},
    "sg-broker": {"token": "broker-token-value-2"},
    "sg-oplog": {"key": "b3Bsb2ctc2VhbGluZy1rZXktMzItYnl0ZXMtbG9uZyE="},
    "sg-db": {"password": "db-password-value-4"},
    "sg-nats": {"password": "nats-password-value-5"},
    "edge-creds": {"password": "edge-password-3"},
    "sg-tls": {"tls.crt": "-----BEGIN CERTIFICATE-----\n", "tls.key": "-----BEGIN PRIVATE KEY-----\nkey-6\n"},
    "sg-broker-tls": {"tls.crt": "-----BEGIN CERTIFICATE-----\n", "tls.key": "-----BEGIN PRIVATE KEY-----\nkey-7\n"},
    "sg-ca": {"ca.crt": "-----BEGIN CERTIFICATE-----\n"},
}

CENTRAL = {
    "role": "central",
    "central": {"upstream": "http://keystone.identity:5000", "edges": ["site2", "site3"]},
    "secrets": {"adminToken": {"name": "sg-admin", "key": "token"}, "syncKey": {"name": "sg-sync", "key": "key"}},
}
CENTRAL_FULL = deepcopy(CENTRAL)
CENTRAL_FULL.update({
    "central": {"upstream": "https://keystone.identity:5000", "edges": ["site2"], "publicUrl": "https://id.example",
                "externalBroker": "nats://nats.identity:4222", "ackTimeout": "45s", "allowNewEdges": True,
                "edgeScopes": {"site3": {"domains": ["Default", "acme"], "replicate": ["identity", "resource"]},
                               "site4": {"domains": ["acme"]}}},
    "config": {"upstream_timeout": "10s", "max_connections": 2048},
    "credentials": {"username": "syncgate", "secret": {"name": "edge-creds", "key": "password"}},
    "metrics": {"podMonitor": {"enabled": True}, "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
                "prometheusRule": {"enabled": True, "labels": {"release": "prom"}},
                "grafanaDashboard": {"enabled": True}},
    "networkPolicy": {"enabled": True, "adminFrom": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}],
                      "proxyFrom": [{"namespaceSelector": {}}]},
    "otel": {"endpoint": "http://otel-collector.observability:4317", "protocol": "grpc",
             "resourceAttributes": "site=central"},
    "podAnnotations": {"example.com/team": "identity"},
})
CENTRAL_FULL["secrets"] = dict(CENTRAL["secrets"], brokerToken={"name": "sg-broker", "key": "token"},
                               oplogKey={"name": "sg-oplog", "key": "key"})
EDGE = {
    "role": "edge",
    "edge": {"id": "site2", "broker": "nats://sg-syncgate-broker.identity:4222", "upstream": "http://keystone:5000"},
    "credentials": {"username": "syncgate", "projectName": "service",
                    "secret": {"name": "edge-creds", "key": "password"}},
    "secrets": {"adminToken": {"name": "sg-admin", "key": "token"}, "syncKey": {"name": "sg-sync", "key": "key"},
                "brokerToken": {"name": "sg-broker", "key": "token"}},
    "networkPolicy": {"enabled": True},
}
EDGE_EPHEMERAL = dict(deepcopy(EDGE), persistence={"enabled": False})
CENTRAL_POSTGRES = deepcopy(CENTRAL)
CENTRAL_POSTGRES["central"]["database"] = {"url": "postgres://syncgate@db.identity:5432/syncgate?sslmode=verify-full"}
CENTRAL_POSTGRES["secrets"]["databasePassword"] = {"name": "sg-db", "key": "password"}
CENTRAL_HA = deepcopy(CENTRAL_POSTGRES)
CENTRAL_HA["central"].update(replicas=3, externalBroker="nats://nats.identity:4222")
CENTRAL_HA["networkPolicy"] = {"enabled": True, "adminFrom": [{"namespaceSelector": {"matchLabels": {"name": "mon"}}}],
                              "proxyFrom": [{"namespaceSelector": {}}]}
CENTRAL_HA["brokerUser"] = "central"
CENTRAL_HA["secrets"]["brokerPassword"] = {"name": "sg-nats", "key": "password"}
TLS = {"secretName": "sg-tls", "upstreamCa": {"name": "sg-ca"},
       "broker": {"secretName": "sg-broker-tls", "ca": {"name": "sg-ca"}, "clientCa": {"name": "sg-ca"},
                  "centralClientSecretName": "sg-broker-tls"}}
CENTRAL_TLS = deepcopy(CENTRAL)
CENTRAL_TLS["central"]["upstream"] = "https://keystone.identity:5000"
CENTRAL_TLS["tls"] = TLS
EDGE_TLS = deepcopy(EDGE)
EDGE_TLS["edge"] = dict(EDGE["edge"], upstream="https://keystone:5000", broker="tls://sg-syncgate-broker.identity:4222")
EDGE_TLS["tls"] = {"secretName": "sg-tls", "upstreamCa": {"name": "sg-ca"},
                   "broker": {"secretName": "sg-broker-tls", "ca": {"name": "sg-ca"}}}
CENTRAL_HA_TLS = deepcopy(CENTRAL_HA)
CENTRAL_HA_TLS["tls"] = {"secretName": "sg-tls", "adminCa": {"name": "sg-ca"},
                         "broker": {"ca": {"name": "sg-ca"}, "centralClientSecretName": "sg-broker-tls"}}
EDGE_USER = deepcopy(EDGE)
EDGE_USER["brokerUser"] = "site2"
EDGE_USER["secrets"] = dict(EDGE["secrets"], brokerPassword={"name": "sg-nats", "key": "password"})
del EDGE_USER["secrets"]["brokerToken"]
RELEASES = {"central": CENTRAL, "central, every option": CENTRAL_FULL, "central, op log on PostgreSQL": CENTRAL_POSTGRES,
            "central, three replicas on PostgreSQL": CENTRAL_HA, "edge": EDGE, "edge, no volume": EDGE_EPHEMERAL,
            "edge, its own broker user": EDGE_USER, "central, TLS on every listener": CENTRAL_TLS,
            "edge, TLS on every listener": EDGE_TLS, "central, three replicas with TLS": CENTRAL_HA_TLS}


def check(name):
    def wrap(fn):
        def run():
            t = time.monotonic()
            try:
                fn()
                results.append((name, True))
                print(f"PASS {name} ({time.monotonic() - t:.1f}s)", flush=True)
            except Exception:
                results.append((name, False))
                print(f"FAIL {name}", flush=True)
                traceback.print_exc()
        return run
    return wrap


@check("helm lint --strict passes for central and edge")
def lint():
    for label, values in RELEASES.items():
        report = helm.lint(str(CHART), values, strict=True, kube_version=f"v{K8S}")
        bad = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2] + report.get("errors", [])
        assert not bad, (label, bad)


@check(f"every rendered manifest is valid for Kubernetes {K8S} (strict schemas)")
def validate():
    seen = set()
    for label, values in RELEASES.items():
        for path, doc in render(values):
            seen.add(doc["kind"])
            if doc["kind"] == "PrometheusRule":
                # A CRD of the Prometheus operator: checked by promtool below.
                assert doc["spec"]["groups"][0]["rules"], (label, path)
                continue
            if doc["apiVersion"].startswith("monitoring.coreos.com/"):
                # CRDs of the Prometheus operator: not in Kubernetes' schemas.
                assert doc["spec"]["selector"]["matchLabels"], (label, path)
                endpoints = doc["spec"].get("podMetricsEndpoints") or doc["spec"].get("endpoints")
                assert endpoints and endpoints[0]["port"] == "admin" and endpoints[0]["path"] == "/metrics"
                continue
            try:
                kubernetes_validate.validate(doc, K8S, strict=True)
            except Exception as e:
                raise AssertionError(f"{label}: {path} {doc['kind']}: {e}") from e
    expected = {"ConfigMap", "StatefulSet", "Service", "ServiceAccount", "PodDisruptionBudget", "NetworkPolicy",
                "PodMonitor", "ServiceMonitor"}
    assert expected <= seen, expected - seen


@check("central: StatefulSet of one with a volume, Services for proxy, broker and admin, probes, non-root")
def central_shape():
    docs = render(CENTRAL)
    [sts] = kind(docs, "StatefulSet")
    assert sts["spec"]["replicas"] == 1
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "2Gi"
    services = {s["metadata"]["name"]: s for s in kind(docs, "Service")}
    assert {"sg-syncgate", "sg-syncgate-broker", "sg-syncgate-admin", "sg-syncgate-headless"} <= set(services)
    w = Workload(docs, SECRETS)
    assert w.args == ["central"]
    assert w.container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert w.container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert w.pod_security["runAsNonRoot"] and w.pod_security["runAsUser"] != 0
    s = w.security
    assert s["readOnlyRootFilesystem"] and not s["allowPrivilegeEscalation"] and s["capabilities"]["drop"] == ["ALL"]
    files = dict(w.files())
    assert files["/run/secrets/syncgate"] == {"admin-token": "admin-token-value-1",
                                              "sync-key": SECRETS["sg-sync"]["key"]}
    toml = files["/etc/syncgate"]["config.toml"]
    for line in ['upstream = "http://keystone.identity:5000"', 'edges = ["site2","site3"]',
                 'admin_token_file = "/run/secrets/syncgate/admin-token"', 'broker_listen = "0.0.0.0:4222"']:
        assert line in toml, (line, toml)
    assert "edge_scope" not in toml, toml
    # Per-site scopes: one --edge-scope value (the binary reads it back in binary_agrees).
    scoped = dict(Workload(render(CENTRAL_FULL), SECRETS).files())["/etc/syncgate"]["config.toml"]
    line = 'edge_scope = "site3=domains:Default,acme;replicate:identity,resource site4=domains:acme"'
    assert line in scoped, scoped
    # No secret value is in the ConfigMap or the StatefulSet.
    rendered = repr(docs)
    for secret in SECRETS.values():
        for value in secret.values():
            assert value not in rendered


@check("an external broker drops the embedded one; options land in the config file; edge mounts its credentials; "
       "a broker user with its password file")
def variants():
    docs = render(CENTRAL_FULL)
    names = {s["metadata"]["name"] for s in kind(docs, "Service")}
    assert "sg-syncgate-broker" not in names, names
    w = Workload(docs, SECRETS)
    toml = w.config["config.toml"]
    for line in ['broker = "nats://nats.identity:4222"', 'upstream_timeout = "10s"', "max_connections = 2048",
                 'oplog_key_file = "/run/secrets/syncgate/oplog-key"', "allow_new_edges = true"]:
        assert line in toml, (line, toml)
    assert "broker_listen" not in toml
    assert w.env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "grpc" and w.env["OTEL_SERVICE_NAME"] == "syncgate-central"
    edge = Workload(render(EDGE), SECRETS)
    assert edge.args == ["edge"]
    assert edge.env["OS_PASSWORD_FILE"] == "/run/secrets/syncgate/credential"
    assert dict(edge.files())["/run/secrets/syncgate"]["credential"] == "edge-password-3"
    assert 'id = "site2"' in edge.config["config.toml"]
    ports = [p["name"] for p in edge.container["ports"]]
    assert ports == ["admin"], ports
    [np] = kind(render(EDGE), "NetworkPolicy")
    assert np["spec"]["ingress"] == [], "nothing listed: nobody admitted"
    pg = Workload(render(CENTRAL_POSTGRES), SECRETS)
    toml = pg.config["config.toml"]
    for line in ['db = "postgres://syncgate@db.identity:5432/syncgate?sslmode=verify-full"',
                 'db_password_file = "/run/secrets/syncgate/db-password"']:
        assert line in toml, (line, toml)
    assert dict(pg.files())["/run/secrets/syncgate"]["db-password"] == "db-password-value-4"
    assert "db-password" not in dict(Workload(render(CENTRAL), SECRETS).files())["/run/secrets/syncgate"]
    for values, user in ((EDGE_USER, "site2"), (CENTRAL_HA, "central")):
        w = Workload(render(values), SECRETS)
        toml = w.config["config.toml"]
        for line in [f'broker_user = "{user}"', 'broker_password_file = "/run/secrets/syncgate/broker-password"']:
            assert line in toml, (line, toml)
        assert "broker_token_file" not in toml, toml
        assert dict(w.files())["/run/secrets/syncgate"]["broker-password"] == "nats-password-value-5"
    assert "broker-password" not in dict(Workload(render(EDGE), SECRETS).files())["/run/secrets/syncgate"]
    eph = Workload(render(EDGE_EPHEMERAL), SECRETS)
    assert "emptyDir" in eph.volumes["state"]
    assert "volumeClaimTemplates" not in eph.statefulset["spec"]
    assert "lost with the pod" in notes(EDGE_EPHEMERAL)


@check("central replicas on PostgreSQL: no volume of their own, each advertises its admin API, one kept up")
def replicas():
    docs = render(CENTRAL_HA)
    w = Workload(docs, SECRETS)
    spec = w.statefulset["spec"]
    assert spec["replicas"] == 3 and spec["podManagementPolicy"] == "Parallel"
    assert "volumeClaimTemplates" not in spec and "emptyDir" in w.volumes["state"]
    assert w.env["SYNCGATE_ADVERTISE_ADMIN_URL"] == "http://sg-syncgate-0.sg-syncgate-headless.identity.svc:9090"
    headless = next(s for s in kind(docs, "Service") if s["metadata"]["name"] == "sg-syncgate-headless")
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"]
    assert "sg-syncgate-broker" not in {s["metadata"]["name"] for s in kind(docs, "Service")}
    [pdb] = kind(docs, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1, "of three, two stay up"
    [np] = kind(docs, "NetworkPolicy")
    admin = next(r for r in np["spec"]["ingress"] if r["ports"][0]["port"] == "admin")
    assert {"podSelector": {"matchLabels": w.statefulset["spec"]["selector"]["matchLabels"]}} in admin["from"]
    assert "3 central replicas" in notes(CENTRAL_HA) and "WARNING" not in notes(CENTRAL_HA)
    # A PostgreSQL op log needs no volume with one replica either; SQLite keeps its own.
    assert "volumeClaimTemplates" not in Workload(render(CENTRAL_POSTGRES), SECRETS).statefulset["spec"]
    assert Workload(render(CENTRAL), SECRETS).statefulset["spec"]["replicas"] == 1
    assert "volumeClaimTemplates" in Workload(render(CENTRAL), SECRETS).statefulset["spec"]


@check("the NetworkPolicy admits on each port only the peers listed; an empty list admits nobody")
def network_policy():
    def rules(values):
        [np] = kind(render(values), "NetworkPolicy")
        return {r["ports"][0]["port"]: r.get("from") for r in np["spec"]["ingress"]}
    clients = [{"namespaceSelector": {"matchLabels": {"name": "openstack"}}}]
    sites = [{"ipBlock": {"cidr": "10.20.0.0/16"}}]
    every = dict(deepcopy(CENTRAL), networkPolicy={"enabled": True, "proxyFrom": clients, "brokerFrom": sites,
                                                   "adminFrom": clients})
    assert rules(every) == {"proxy": clients, "broker": sites, "admin": clients}, rules(every)
    # An empty adminFrom admits nobody to the admin port.
    no_admin = dict(deepcopy(CENTRAL), networkPolicy={"enabled": True, "proxyFrom": clients, "brokerFrom": sites})
    assert rules(no_admin) == {"proxy": clients, "broker": sites}, rules(no_admin)
    # An external broker: no broker port, no rule for it whatever brokerFrom says.
    external = deepcopy(CENTRAL_FULL)
    external["networkPolicy"] = {"enabled": True, "proxyFrom": clients, "brokerFrom": sites}
    assert rules(external) == {"proxy": clients}, rules(external)
    assert rules(dict(deepcopy(EDGE), networkPolicy={"enabled": True, "adminFrom": clients})) == {"admin": clients}
    # A central nobody could use is refused, with the reason.
    for np, why in [({"enabled": True}, "proxyFrom"), ({"enabled": True, "proxyFrom": clients}, "brokerFrom")]:
        try:
            render(dict(deepcopy(CENTRAL), networkPolicy=np))
        except helm.HelmError as e:
            assert why in str(e) and "admit no" in str(e), str(e)
            continue
        raise AssertionError(f"accepted: {np}")
    # Replicas with no adminFrom: the admin port admits the other replicas alone.
    ha = dict(deepcopy(CENTRAL_HA), networkPolicy={"enabled": True, "proxyFrom": clients})
    w = Workload(render(ha), SECRETS)
    mine = {"podSelector": {"matchLabels": w.statefulset["spec"]["selector"]["matchLabels"]}}
    assert rules(ha) == {"proxy": clients, "admin": [mine]}, rules(ha)
    # No rendered rule, in any release, lacks its peers (such a rule admits all).
    for name, values in RELEASES.items():
        for np in kind(render(values), "NetworkPolicy"):
            for rule in np["spec"]["ingress"]:
                assert rule.get("from"), (name, rule)


def promtool(*args, rules=None):
    """Runs promtool (Debian's prometheus package) on `rules` (a rule
    file's content) or on files named in `args`; its output."""
    with tempfile.TemporaryDirectory() as d:
        if rules is not None:
            path = Path(d) / "rules.yaml"
            path.write_text(yaml.safe_dump(rules))
            args = (*args, str(path))
        r = subprocess.run(["promtool", *args], capture_output=True, text=True)
    assert r.returncode == 0, f"promtool {' '.join(args)}: {r.stdout}{r.stderr}"
    return r.stdout


@check("the alerts: the PrometheusRule and monitoring/syncgate-rules.yaml are the same rules, "
       "promtool checks them and their unit tests pass, values set thresholds and leave rules out")
def alerts():
    on = dict(deepcopy(CENTRAL), metrics={"prometheusRule": {"enabled": True}})
    [rule] = kind(render(on), "PrometheusRule")
    names = [r["alert"] for r in rule["spec"]["groups"][0]["rules"]]
    assert len(names) == 15 and len(set(names)) == 15, names
    for r in rule["spec"]["groups"][0]["rules"]:
        a = r["annotations"]
        assert r["labels"]["severity"] in ("warning", "critical"), r
        assert a["runbook_url"] == f"docs/runbooks.md#{r['alert'].lower()}", r
        assert f"## {r['alert']}\n" in (REPO / "docs" / "runbooks.md").read_text(), f"no runbook for {r['alert']}"
        assert "edge" not in r["expr"] or "{{ $labels.edge }}" in a["summary"], r
    # The plain rules file is the template's rendering with the defaults.
    plain = yaml.safe_load((REPO / "monitoring" / "syncgate-rules.yaml").read_text())
    assert plain == rule["spec"], "monitoring/syncgate-rules.yaml differs: run scripts/render-rules.py"
    assert "SUCCESS: 15 rules found" in promtool("check", "rules", rules=rule["spec"])
    assert "SUCCESS" in promtool("test", "rules", str(REPO / "monitoring" / "tests" / "syncgate-rules.test.yaml"))
    # Thresholds and excluded rules come from the values; what they make is valid.
    tuned = deepcopy(on)
    tuned["metrics"]["prometheusRule"].update(
        excludeRules=["SyncgateEdgeBehind", "SyncgateNoLeader"],
        thresholds=dict(yaml.safe_load((CHART / "values.yaml").read_text())["metrics"]["prometheusRule"]["thresholds"],
                        lagSecondsWarning=42.5, offlineFor="90s", retentionSeconds=604800))
    [rule] = kind(render(tuned), "PrometheusRule")
    by_name = {r["alert"]: r for r in rule["spec"]["groups"][0]["rules"]}
    assert "SyncgateEdgeBehind" not in by_name and "SyncgateNoLeader" not in by_name, list(by_name)
    assert "SyncgateEdgeBehindCritical" in by_name
    lagging = by_name["SyncgateEdgeLagging"]["expr"]
    assert lagging == "max by (namespace, job, edge) (syncgate_edge_lag_seconds) > 42.5", lagging
    assert by_name["SyncgateEdgeOffline"]["for"] == "90s"
    pins = by_name["SyncgateEdgePinsRetention"]["expr"]
    assert pins == "max by (namespace, job, edge) (syncgate_edge_lag_seconds) > 604800", pins
    assert "SUCCESS: 13 rules found" in promtool("check", "rules", rules=rule["spec"])
    # An unknown rule name is refused; an edge release ships no rules (its
    # metrics are its own; central's carry every edge's).
    bad = deepcopy(on)
    bad["metrics"]["prometheusRule"]["excludeRules"] = ["SyncgateNoSuchAlert"]
    try:
        render(bad)
    except helm.HelmError as e:
        assert "excludeRules" in str(e), str(e)
    else:
        raise AssertionError("an unknown rule name in excludeRules was accepted")
    assert not kind(render(dict(deepcopy(EDGE), metrics={"prometheusRule": {"enabled": True}})), "PrometheusRule")


@check("a change of configuration changes the pod's checksum (the pod rolls)")
def checksum():
    def annotation(values):
        [sts] = kind(render(values), "StatefulSet")
        return sts["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    changed = deepcopy(CENTRAL)
    changed["central"]["ackTimeout"] = "60s"
    assert annotation(CENTRAL) == annotation(deepcopy(CENTRAL))
    assert annotation(CENTRAL) != annotation(changed)


@check("values.schema.json rejects bad values; missing required values are named")
def bad_values():
    cases = [
        ({**CENTRAL, "role": "hub"}, "role"),
        ({**CENTRAL, "logFormat": "xml"}, "logFormat"),
        ({**CENTRAL, "ports": {"proxy": 5000, "broker": 4222, "admin": 70000}}, "admin"),
        ({**CENTRAL, "central": {"upstream": "keystone:5000"}}, "upstream"),
        ({**CENTRAL, "central": {"upstream": "http://k:5000", "ackTimeout": "soon"}}, "ackTimeout"),
        ({**CENTRAL, "central": {"upstream": "http://k:5000", "edges": ["a.b"]}}, "edges"),
        ({**CENTRAL, "central": {"upstream": "http://k:5000", "edgeScopes": {"a.b": {"domains": ["x"]}}}},
         "invalid propertyName 'a.b'"),
        ({**CENTRAL, "central": {"upstream": "http://k:5000", "edgeScopes": {"a": {"domains": ["x y"]}}}},
         "edgeScopes"),
        ({**CENTRAL, "central": {"upstream": "http://k:5000", "edgeScopes": {"a": {"projects": ["x"]}}}},
         "edgeScopes"),
        ({**CENTRAL, "replicas": 3}, "replicas"),
        ({**CENTRAL, "central": {"upstream": "http://k:5000", "replicas": 0}}, "replicas"),
        ({**CENTRAL, "central": {"upstream": "http://k:5000", "replicas": 2}},
         "several central replicas share one op log, on PostgreSQL"),
        ({**CENTRAL_POSTGRES, "central": {**CENTRAL_POSTGRES["central"], "replicas": 2}},
         "cannot share the embedded broker"),
        ({**CENTRAL, "central": {"upstream": "http://k:5000", "database": {"url": "mysql://db/x"}}}, "url"),
        ({**CENTRAL, "central": {"upstream": "http://k:5000",
                                 "database": {"url": "postgres://sg:hunter2@db:5432/x"}}}, "url"),
        ({**CENTRAL, "secrets": {**CENTRAL["secrets"], "databasePassword": {"name": "sg-db"}}},
         "central.database.url"),
        ({**CENTRAL, "otel": {"protocol": "http/json"}}, "protocol"),
        ({**CENTRAL, "brokerUser": "central"}, "secrets.brokerPassword.name"),
        ({**CENTRAL, "secrets": {**CENTRAL["secrets"], "brokerPassword": {"name": "sg-nats", "key": "password"}}},
         "brokerUser"),
        ({**EDGE, "brokerUser": "site2", "secrets": {**EDGE["secrets"], "brokerPassword": {"name": "sg-nats", "key": "password"}}},
         "not both"),
        ({**EDGE, "brokerUser": "site2:pw"}, "brokerUser"),
        ({**CENTRAL, "config": {"Upstream-Timeout": "1s"}}, "Upstream-Timeout"),
        ({**CENTRAL, "metrics": {"grafanaDashboard": {"enabled": True, "labels": {"grafana_dashboard": 1}}}},
         "grafana_dashboard"),
        ({**EDGE, "edge": {"broker": "nats://c:4222", "upstream": "http://k:5000"}}, "id"),
        ({**EDGE, "edge": {**EDGE["edge"], "onFailure": "retry"}}, "onFailure"),
        ({**EDGE, "credentials": {"username": "x"}}, "credentials"),
        ({k: v for k, v in CENTRAL.items() if k != "secrets"}, "secrets"),
        ({**CENTRAL, "secrets": {**CENTRAL["secrets"], "syncKey": {"name": "", "key": "key"}}}, "syncKey"),
        # Central's client certificate with the embedded broker needs its TLS;
        # the embedded broker requiring client certificates needs central's own.
        ({**CENTRAL_TLS, "tls": {**TLS, "broker": {**TLS["broker"], "secretName": ""}}}, "tls.broker.secretName"),
        ({**CENTRAL_TLS, "tls": {**TLS, "broker": {**TLS["broker"], "centralClientSecretName": ""}}},
         "centralClientSecretName"),
    ]
    for values, named in cases:
        try:
            render(values)
        except helm.HelmError as e:
            assert named in str(e), (named, str(e))
            continue
        raise AssertionError(f"accepted: {values}")


@check("the binary accepts the rendered configuration (syncgate config check, rendered env and files)")
def binary_agrees():
    for label, values in RELEASES.items():
        w = Workload(render(values), SECRETS)
        with tempfile.TemporaryDirectory() as root:
            dirs = w.write_files(root)
            config = Path(dirs["/etc/syncgate"]) / "config.toml"
            # The only change: where the volumes are mounted on this host.
            text = config.read_text()
            for mount, host in dirs.items():
                text = text.replace(f"{mount}/", f"{host}/")
            text = text.replace("/var/lib/syncgate/", f"{root}/state/")
            config.write_text(text)
            env = {k: v for k, v in os.environ.items() if not k.startswith(("SYNCGATE_", "OS_", "OTEL_"))}
            for k, v in w.env.items():
                for mount, host in dirs.items():
                    v = v.replace(f"{mount}/", f"{host}/")
                env[k] = v
            env["SYNCGATE_CONFIG"] = str(config)
            out = subprocess.run([BIN, "config", "check", *w.args], env=env, capture_output=True, text=True)
            assert out.returncode == 0, (label, out.stdout, out.stderr)
            assert "# file" in out.stdout and "# ok" in out.stdout, out.stdout
            for secret in SECRETS.values():
                for value in secret.values():
                    assert value not in out.stdout, (label, "a secret was printed")


@check("TLS: listeners, upstream CA, broker server and client certificates from Secrets, mounted so that "
       "rotations reach the pod; the probes use HTTPS")
def tls():
    for values, want in [
        (CENTRAL_TLS, {"tls_cert": "tls/tls.crt", "tls_key": "tls/tls.key", "upstream_ca": "upstream-ca.pem",
                       "broker_tls_cert": "broker-tls/tls.crt",
                       "broker_tls_key": "broker-tls/tls.key", "broker_tls_client_ca": "broker-client-ca.pem",
                       "broker_client_cert": "broker-client/tls.crt", "broker_client_key": "broker-client/tls.key"}),
        (EDGE_TLS, {"tls_cert": "tls/tls.crt", "tls_key": "tls/tls.key", "upstream_ca": "upstream-ca.pem",
                    "broker_ca": "broker-ca.pem", "broker_tls_cert": "broker-tls/tls.crt",
                    "broker_tls_key": "broker-tls/tls.key"}),
    ]:
        w = Workload(render(values), SECRETS)
        config = tomllib.loads(w.config["config.toml"])[values["role"]]
        for key, path in want.items():
            assert config[key] == f"/run/secrets/syncgate/{path}", (key, config.get(key))
        files = dict(w.files())["/run/secrets/syncgate"]
        for path in want.values():
            assert path in files, (path, sorted(files))
        # Mounted whole (no subPath): a rotated Secret reaches the files.
        assert "subPath" not in w.mounts["secrets"], w.mounts["secrets"]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert w.container[probe]["httpGet"]["scheme"] == "HTTPS", (probe, w.container[probe])
    # Replicas advertise their HTTPS admin URL and trust the admin CA.
    w = Workload(render(CENTRAL_HA_TLS), SECRETS)
    assert w.env["SYNCGATE_ADVERTISE_ADMIN_URL"].startswith("https://"), w.env
    config = tomllib.loads(w.config["config.toml"])["central"]
    assert config["admin_ca"] == "/run/secrets/syncgate/admin-ca.pem", config
    assert config["broker_ca"] == "/run/secrets/syncgate/broker-ca.pem", config
    # Central trusts its embedded broker's own certificate: no --broker-ca.
    assert "broker_ca" not in tomllib.loads(Workload(render(CENTRAL_TLS), SECRETS).config["config.toml"])["central"]
    # Prometheus scrapes the HTTPS admin port with the given tlsConfig.
    scraped = deepcopy(CENTRAL_TLS)
    scraped["metrics"] = {
        "podMonitor": {"enabled": True}, "serviceMonitor": {"enabled": True},
        "tlsConfig": {"ca": {"secret": {"name": "sg-ca", "key": "ca.crt"}}, "serverName": "sg-syncgate-admin"}}
    docs = render(scraped)
    [pm] = kind(docs, "PodMonitor")
    [sm] = kind(docs, "ServiceMonitor")
    for ep in (pm["spec"]["podMetricsEndpoints"][0], sm["spec"]["endpoints"][0]):
        assert ep["scheme"] == "https" and ep["tlsConfig"]["serverName"] == "sg-syncgate-admin", ep
    plain = dict(deepcopy(CENTRAL), metrics={"podMonitor": {"enabled": True}})
    [pm] = kind(render(plain), "PodMonitor")
    assert "scheme" not in pm["spec"]["podMetricsEndpoints"][0], pm
    assert "https://127.0.0.1" in notes(CENTRAL_TLS) and "https://127.0.0.1" not in notes(CENTRAL)
    # Without TLS: none of it, and the probes stay HTTP.
    w = Workload(render(CENTRAL), SECRETS)
    assert not any(k.startswith(("tls_", "upstream_ca", "broker_ca", "broker_tls", "broker_client"))
                   for k in tomllib.loads(w.config["config.toml"])["central"])
    assert "scheme" not in w.container["readinessProbe"]["httpGet"]
    # An external broker: central has no broker listener, only its client's.
    ext = deepcopy(CENTRAL_TLS)
    ext["central"]["externalBroker"] = "tls://nats.identity:4222"
    config = tomllib.loads(Workload(render(ext), SECRETS).config["config.toml"])["central"]
    assert "broker_tls_cert" not in config and "broker_tls_client_ca" not in config, config
    assert config["broker_client_cert"].endswith("broker-client/tls.crt"), config


@check("the dashboard: a ConfigMap Grafana's sidecar loads (central only, when enabled), its labels and "
       "namespace from the values, every panel's query valid PromQL (promtool)")
def dashboard():
    board = json.loads(DASHBOARD.read_text())
    assert not [d for d in kind(render(CENTRAL), "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")], \
        "no dashboard unless enabled"
    on = dict(deepcopy(CENTRAL), metrics={"grafanaDashboard": {"enabled": True}})
    [cm] = [d for d in kind(render(on), "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1", cm["metadata"]
    assert "namespace" not in cm["metadata"], cm["metadata"]
    assert json.loads(cm["data"]["syncgate.json"]) == board
    tuned = dict(deepcopy(CENTRAL), metrics={"grafanaDashboard": {
        "enabled": True, "labels": {"dashboards": "openstack"}, "annotations": {"grafana_folder": "OpenStack"},
        "namespace": "monitoring"}})
    [cm] = [d for d in kind(render(tuned), "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]
    assert cm["metadata"]["namespace"] == "monitoring" and cm["metadata"]["labels"]["dashboards"] == "openstack"
    # Labels merge with the default (`grafana_dashboard: null` drops it).
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1", cm["metadata"]
    assert cm["metadata"]["annotations"] == {"grafana_folder": "OpenStack"}
    # An edge release carries none: one dashboard per cloud, on central's.
    edge = dict(deepcopy(EDGE), metrics={"grafanaDashboard": {"enabled": True}})
    assert not [d for d in kind(render(edge), "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]
    # Every query parses: promtool checks them as recording rules.
    queries = panel_queries(board)
    assert len(queries) >= 20, len(queries)
    rules = [{"record": f"syncgate:dashboard:{i}", "expr": e}
             for i, e in enumerate(e for _, exprs in queries for e in exprs)]
    assert "SUCCESS" in promtool("check", "rules", rules={"groups": [{"name": "dashboard", "rules": rules}]})
    uids = {t["datasource"]["uid"] for p in board["panels"] if p["type"] != "row" for t in p["targets"]}
    assert uids == {"${datasource}"}, uids


def main():
    for test in (lint, validate, central_shape, variants, replicas, network_policy, alerts, dashboard, tls, checksum,
                 bad_values, binary_agrees):
        test()
    passed = sum(ok for _, ok in results)
    print(f"helm: {passed} passed, {len(results) - passed} failed", flush=True)
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
