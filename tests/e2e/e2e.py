#!/usr/bin/env python3
"""End-to-end suite: two real Keystones (central and two edges), syncgate central
and edges, driven by the openstack CLI through the gateway; then faults; then the
same through a real nats-server. Prints `e2e: N passed, M failed`.

Usage: e2e.py [workdir]   (syncgate binary: $SYNCGATE_BIN or target/debug/syncgate;
release 0.1.0's for the mixed-release case: $SYNCGATE_BIN_0_1_0, built by
scripts/old-release.sh 0.1.0)
"""

import http.client as httpclient
import hashlib
import json
import secrets
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from otlp_receiver import Receiver
import os

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helm"))
from dashboard import panel_queries  # noqa: E402
from harness import (OLDER_KEYSTONE, VENV_BIN, Deployment, HAProxy, HoldingProxy, Pki, Postgres, Prometheus, diff,
                     free_port, get_json, http, log, release_binary, snapshot, wait_until)

results = []


def check(name):
    def wrap(fn):
        def run(*args):
            t = time.monotonic()
            try:
                fn(*args)
                results.append((name, True))
                log(f"PASS {name} ({time.monotonic() - t:.1f}s)")
            except Exception:
                results.append((name, False))
                log(f"FAIL {name}")
                traceback.print_exc()
        return run
    return wrap


def assert_in_sync(dep, what, states=("applied", "adopted")):
    dep.wait_delivered(states=states)
    central = snapshot(dep.central_ks)
    for name, ks in dep.edge_ks.items():
        missing, extra = diff(central, snapshot(ks))
        assert not missing and not extra, f"{name} after {what}: missing {missing}, extra {extra}"
    oos = dep.audit("/v1/out-of-sync")["out_of_sync"]
    assert oos == [], f"out of sync after {what}: {oos}"


def can_log_in(ks, user, password, domain="acme", project="web"):
    return ks.token(user, password, domain, project, domain) is not None


@check("scenario through the gateway with the openstack CLI")
def scenario(dep):
    cli = dep.cli
    cli("domain", "create", "acme", "--description", "tenant")
    cli("project", "create", "web", "--domain", "acme", "--description", "front")
    cli("project", "create", "child", "--domain", "acme", "--parent", "web", "--property", "colour=red")
    cli("user", "create", "alice", "--domain", "acme", "--password", "first-pw", "--email", "alice@acme",
        "--project", "web", "--project-domain", "acme", "--ignore-lockout-failure-attempts")
    cli("group", "create", "ops", "--domain", "acme")
    cli("group", "add", "user", "--group-domain", "acme", "--user-domain", "acme", "ops", "alice")
    cli("role", "create", "operator")
    cli("implied", "role", "create", "operator", "--implied-role", "reader")
    cli("role", "add", "--user", "alice", "--user-domain", "acme", "--project", "web", "--project-domain", "acme", "operator")
    cli("role", "add", "--group", "ops", "--group-domain", "acme", "--domain", "acme", "member")
    cli("role", "add", "--group", "ops", "--group-domain", "acme", "--domain", "acme", "--inherited", "reader")
    assert_in_sync(dep, "creates")
    for name, ks in dep.edge_ks.items():
        assert can_log_in(ks, "alice", "first-pw"), f"alice cannot log in at {name}"

    cli("user", "set", "--domain", "acme", "--description", "on call", "--disable", "alice")
    assert_in_sync(dep, "disable")
    cli("user", "set", "--domain", "acme", "--enable", "alice")
    cli("project", "set", "--domain", "acme", "--tag", "blue", "--tag", "green", "web")
    # Self-service, as alice herself: replayed as sent (the new password is as
    # usable at the edges as at central).
    alice = {"OS_USERNAME": "alice", "OS_PASSWORD": "first-pw", "OS_USER_DOMAIN_NAME": "acme",
             "OS_PROJECT_NAME": "web", "OS_PROJECT_DOMAIN_NAME": "acme"}
    cli("user", "password", "set", "--password", "second-pw", "--original-password", "first-pw", env_extra=alice)
    # Site-local by Keystone's design: never an op.
    seqs_before = len(dep.ops())
    alice["OS_PASSWORD"] = "second-pw"
    cli("application", "credential", "create", "alice-cred", env_extra=alice)
    assert len(dep.ops()) == seqs_before, "an application credential became an op"
    assert_in_sync(dep, "updates")
    for name, ks in dep.edge_ks.items():
        assert can_log_in(ks, "alice", "second-pw"), f"{name}: new password refused"
        assert not can_log_in(ks, "alice", "first-pw"), f"{name}: old password still works"

    # An EC2 key of alice's is the same key at every edge (Keystone's
    # credential ID is its access key's SHA-256), and revoking it at central
    # revokes it there.
    made = json.loads(cli("ec2", "credentials", "create", "-f", "json", "--user", "alice", "--user-domain", "acme",
                          "--project", "web", "--project-domain", "acme"))
    access = made["access"]
    key_id = hashlib.sha256(access.encode()).hexdigest()
    assert_in_sync(dep, "an EC2 key")
    for name, ks in dep.edge_ks.items():
        cred = get_json(f"{ks.url}/v3/credentials/{key_id}", ks.token())["credential"]
        assert json.loads(cred["blob"])["access"] == access, f"{name}: {cred}"
    cli("ec2", "credentials", "delete", "--user", "alice", "--user-domain", "acme", access)
    assert_in_sync(dep, "an EC2 key revoked")
    for name, ks in dep.edge_ks.items():
        status, _, _ = http("GET", f"{ks.url}/v3/credentials/{key_id}", None, ks.token())
        assert status == 404, f"{name}: the revoked key lives on ({status})"

    # What Keystone makes on its own is the same at every edge: a project
    # acting as a domain keeps central's ID (logins name a domain by ID), and
    # an identity provider created without a domain gets the same domain
    # Keystone made for it at central, where a group is then made.
    token = dep.central_ks.token()
    status, _, made = http("POST", f"{dep.gateway}/v3/projects",
                           {"project": {"name": "acting", "is_domain": True, "description": "made as a project",
                                        "colour": "blue"}}, token)
    assert status == 201, made
    acting = made["project"]["id"]
    cli("user", "create", "dora", "--domain", "acting", "--password", "dora-pw-1")
    idp = json.loads(cli("identity", "provider", "create", "-f", "json", "--remote-id", "https://idp.example/",
                         "idp-auto"))
    fed_domain = idp["domain_id"]
    cli("group", "create", "--domain", fed_domain, "fed-users")
    assert_in_sync(dep, "what Keystone made on its own")
    for name, ks in dep.edge_ks.items():
        login = {"auth": {"identity": {"methods": ["password"], "password": {"user": {
            "name": "dora", "domain": {"id": acting}, "password": "dora-pw-1"}}}}}
        status, _, _ = http("POST", f"{ks.url}/v3/auth/tokens", login)
        assert status == 201, f"{name}: a login naming the domain by central's ID: {status}"
        there = get_json(f"{ks.url}/v3/OS-FEDERATION/identity_providers/idp-auto", ks.token())
        assert there["identity_provider"]["domain_id"] == fed_domain, f"{name}: {there}"
    cli("group", "delete", "--domain", fed_domain, "fed-users")
    cli("identity", "provider", "delete", "idp-auto")
    cli("domain", "set", "--disable", fed_domain)
    cli("domain", "delete", fed_domain)
    cli("user", "delete", "--domain", "acting", "dora")
    cli("domain", "set", "--disable", "acting")
    cli("domain", "delete", "acting")
    assert_in_sync(dep, "what Keystone made on its own, deleted")

    cli("role", "remove", "--group", "ops", "--group-domain", "acme", "--domain", "acme", "--inherited", "reader")
    cli("role", "remove", "--group", "ops", "--group-domain", "acme", "--domain", "acme", "member")
    cli("role", "remove", "--user", "alice", "--user-domain", "acme", "--project", "web", "--project-domain", "acme", "operator")
    cli("implied", "role", "delete", "operator", "--implied-role", "reader")
    cli("role", "delete", "operator")
    cli("group", "remove", "user", "--group-domain", "acme", "--user-domain", "acme", "ops", "alice")
    cli("group", "delete", "--domain", "acme", "ops")
    cli("user", "delete", "--domain", "acme", "alice")
    cli("project", "delete", "--domain", "acme", "child")
    cli("project", "delete", "--domain", "acme", "web")
    cli("domain", "set", "--disable", "acme")
    cli("domain", "delete", "acme")
    assert_in_sync(dep, "deletes")
    edges = dep.audit("/v1/edges")["edges"]
    last = dep.ops()[-1]["seq"]
    assert all(e["cursor"] == last and e["online"] for e in edges), edges


@check("edge Keystone down: pending, timed out (alerted by a real Prometheus), then healed in order and the alert gone")
def edge_keystone_down(dep):
    # A real Prometheus scrapes central with syncgate's alert rules (the
    # out-of-sync alert's `for:` shortened from 10 minutes to 3 seconds).
    prom = Prometheus(dep.workdir, [f"127.0.0.1:{dep.admin_port}"], hold={"SyncgateEdgeOutOfSync": "3s"}).start()
    dep.cleanups.append(prom.stop)
    wait_until("prometheus has central's gauges",
               lambda: len(prom.query('syncgate_edge_out_of_sync')) == len(dep.edge_ks))
    seen = time.time()
    wait_until("the rules evaluated on them", lambda: prom.evaluated_after(seen + 1))
    assert prom.alerts("SyncgateEdgeOutOfSync") == [], "an edge in sync is alerted on"
    ks = dep.edge_ks["edge1"]
    ks.stop()
    before = dep.ops()[-1]["seq"]
    for i in range(3):
        dep.cli("project", "create", f"while-down-{i}")
    dep.wait_delivered(states=("pending", "timed_out"), edges=["edge1"], after=before)
    dep.wait_delivered(states=("timed_out",), edges=["edge1"], timeout=60, after=before)
    oos = dep.audit("/v1/out-of-sync?edge=edge1")["out_of_sync"]
    assert len(oos) == 3 and all(r["state"] == "timed_out" for r in oos), oos
    wait_until("the out-of-sync alert firing for edge1",
               lambda: [(s, lab.get("edge")) for s, lab in prom.alerts("SyncgateEdgeOutOfSync")] == [("firing", "edge1")],
               timeout=60)
    [(_, labels)] = prom.alerts("SyncgateEdgeOutOfSync")
    assert labels["severity"] == "warning", labels
    ks.start()
    assert_in_sync(dep, "edge Keystone back")
    wait_until("the out-of-sync alert gone once edge1 is back in sync",
               lambda: prom.alerts("SyncgateEdgeOutOfSync") == [], timeout=60)
    prom.stop()
    token = ks.token()
    names = [p["name"] for p in get_json(f"{ks.url}/v3/projects", token)["projects"]]
    assert sorted(n for n in names if n.startswith("while-down")) == [f"while-down-{i}" for i in range(3)], names


def raw_request(dep, method, path, body, token):
    """A request whose method and target go on the wire exactly as given."""
    conn = httpclient.HTTPConnection("127.0.0.1", dep.proxy_port, timeout=60)
    data = json.dumps(body).encode() if body is not None else None
    headers = {"X-Auth-Token": token, "Content-Type": "application/json"}
    conn.request(method, path, body=data, headers=headers)
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    return resp.status, (json.loads(raw) if raw else None)


@check("disguised writes are captured or refused, never applied silently")
def disguised_writes(dep):
    token = dep.central_ks.token()
    for i, path in enumerate(["/v3/%70rojects", "/%76%33/projects", "/v3//projects", "/v3/x/../projects"]):
        status, body = raw_request(dep, "POST", path, {"project": {"name": f"disguised-{i}"}}, token)
        assert status == 201, (path, status, body)
    status, _, body = http("POST", f"{dep.gateway}/v3/projects", {"project": {"name": "kept"}}, token)
    assert status == 201, status
    kept = body["project"]["id"]
    for method, path in [("DELETE", f"/v3/projects%2F{kept}"), ("DELETE", f"/v3/projects%2f{kept}"),
                         ("delete", f"/v3/projects/{kept}")]:
        status, body = raw_request(dep, method, path, None, token)
        assert status == 400 and "refused" in body["error"]["message"], (method, path, status, body)
    names = {p["name"] for p in get_json(f"{dep.central_ks.url}/v3/projects", token)["projects"]}
    assert "kept" in names, names
    assert_in_sync(dep, "disguised writes")


def assert_one_trace(dep, receiver, edges):
    """A write with a client traceparent through the gateway: one trace, from
    the client's span through central to each edge's apply, its Keystone call
    and its ack, as the collector received it."""
    trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
    token = dep.central_ks.token()
    status, _, _ = http("POST", f"{dep.gateway}/v3/projects", {"project": {"name": f"traced-{trace_id[:6]}"}}, token,
                        headers={"traceparent": f"00-{trace_id}-{client_span}-01"})
    assert status == 201, status
    dep.wait_delivered()

    def complete():
        spans = receiver.trace(trace_id)
        sites = {s.resource.get("site") for s in spans if s.name == "ack"}
        return set(edges) <= sites and any(s.name == "ack received" for s in spans)

    wait_until("the trace at the collector", complete, timeout=30)
    spans = receiver.trace(trace_id)
    by_id = {s.span_id: s for s in spans}
    [request] = [s for s in spans if s.name == "request" and s.service == "syncgate-central"]
    assert request.parent_id == client_span, request
    [capture] = [s for s in spans if s.name == "capture"]
    assert capture.parent_id == request.span_id
    [publish] = [s for s in spans if s.name == "publish"]
    assert publish.parent_id == capture.span_id, (publish, capture)
    for edge in edges:
        applies = [s for s in spans if s.name == "apply" and s.resource.get("site") == edge]
        assert len(applies) == 1, (edge, spans)
        apply = applies[0]
        assert apply.service == "syncgate-edge-site", apply.service
        assert by_id[apply.parent_id].name in ("publish", "capture"), apply
        assert apply.attributes.get("edge") == edge and apply.attributes.get("outcome") == "applied", apply.attributes
        calls = [s for s in spans if s.name == "keystone" and s.parent_id == apply.span_id]
        assert any(c.attributes.get("http.request.method") == "POST" for c in calls), calls
        assert any(s.name == "ack" and s.parent_id == apply.span_id for s in spans), spans
    for s in receiver.spans:
        text = repr(s.attributes)
        assert token not in text and "central-admin-pw" not in text, s


@check("traces: one trace from the client through central to every edge (OTLP/HTTP protobuf)")
def traces_http(dep, receiver):
    assert_one_trace(dep, receiver, list(dep.edge_ks))


@check("edge gateway killed -9 mid-stream resumes from its cursor")
def edge_killed(dep):
    token = dep.central_ks.token()
    # Writes straight through the gateway, fast, while the edge is killed.
    for i in range(10):
        status, _, _ = http("POST", f"{dep.gateway}/v3/projects", {"project": {"name": f"burst-{i}"}}, token)
        assert status == 201, status
        if i == 3:
            dep.edges["edge1"].kill9()
    # The restarted edge waits --upstream-settle (after central grants it the
    # ID) before applying what the killed one may have sent: short here. It is
    # ready meanwhile, and says what it waits for.
    dep.edge_args["edge1"] = ["--upstream-settle", "5s"]
    dep.start_edge("edge1")
    assert_in_sync(dep, "edge restart")
    dep.edge_args.pop("edge1")
    ks = dep.edge_ks["edge1"]
    names = [p["name"] for p in get_json(f"{ks.url}/v3/projects", ks.token())["projects"]]
    assert sorted(n for n in names if n.startswith("burst-")) == sorted(f"burst-{i}" for i in range(10)), names


@check("central gateway killed -9 between writes loses nothing")
def central_killed(dep):
    dep.cli("project", "create", "before-crash")
    dep.central.kill9()
    dep.start_central()
    dep.cli("project", "create", "after-crash")
    assert_in_sync(dep, "central restart")
    for name, ks in dep.edge_ks.items():
        names = {p["name"] for p in get_json(f"{ks.url}/v3/projects", ks.token())["projects"]}
        assert {"before-crash", "after-crash"} <= names, (name, names)


@check("headers an upstream could route by are refused before Keystone sees them")
def routing_headers(dep):
    token = dep.central_ks.token()
    for name, value in [("SCRIPT_NAME", "/x"), ("X-HTTP-Method-Override", "POST"), ("X-Original-URL", "/v3/users")]:
        status, _, body = http("POST", f"{dep.gateway}/x/v3/users", {"user": {"name": "routed-around"}}, token,
                               headers={name: value})
        assert status == 400 and "refused" in body["error"]["message"], (name, status, body)
    users = {u["name"] for u in get_json(f"{dep.central_ks.url}/v3/users", token)["users"]}
    assert "routed-around" not in users, "a request with a routing header reached Keystone"


@check("a full disk under central's op log: writes refused, nothing answered lost, capture resumes")
def oplog_disk_full(dep):
    if os.geteuid() != 0:
        log("SKIP a full disk needs a tmpfs (root)")
        return
    small = f"{dep.workdir}/oplog-fs"
    os.makedirs(small, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0700", "tmpfs", small], check=True)
    dep.cleanups.append(lambda: subprocess.run(["umount", "-l", small]))
    dep.central.stop()
    for suffix in ("", "-wal", "-shm"):
        src = f"{dep.workdir}/central.db{suffix}"
        if os.path.exists(src):
            subprocess.run(["cp", "-p", src, f"{small}/central.db{suffix}"], check=True)
    dep.central_db = f"sqlite://{small}/central.db"
    dep.start_central()
    token = dep.central_ks.token()
    filler = f"{small}/filler"
    # Unbuffered: nothing is left to write (and fail) when the file is closed.
    try:
        with open(filler, "wb", buffering=0) as f:
            while True:
                f.write(b"\0" * 65536)
    except OSError:
        pass
    assert os.path.exists(filler), "the filler could not be made"
    # Large writes, until the op log has no room left even in its write-ahead log.
    answered, refused, i = [], 0, 0
    big = "x" * 60000
    while refused < 3 and i < 150:
        status, _, body = http("POST", f"{dep.gateway}/v3/projects",
                               {"project": {"name": f"full-{i}", "description": big}}, token)
        if status == 201:
            answered.append(f"full-{i}")
        else:
            assert status == 503, (status, body)
            refused += 1
        i += 1
    assert refused > 0, "the full disk refused nothing"
    os.remove(filler)
    for i in range(i, i + 3):
        status, _, body = http("POST", f"{dep.gateway}/v3/projects", {"project": {"name": f"full-{i}"}}, token)
        assert status == 201, (status, body)
        answered.append(f"full-{i}")
    logged = {op["body"]["project"]["name"] for op in dep.ops()
              if op["kind"] == "project" and op["method"] == "POST" and op["state"] == "committed"}
    assert set(answered) <= logged, (answered, logged)
    # Central's Keystone holds exactly what the op log (once resolved) says.
    def resolved():
        if dep.audit("/v1/out-of-sync").get("unlogged_writes", 0):
            return False
        return all(op.get("resolution") != "pending" for op in dep.ops())
    wait_until("unknown outcomes resolved", resolved, timeout=300)
    assert_in_sync(dep, "a full disk under the op log")


@check("an answer held past the edge's timeout never lands after the ops behind it")
def late_answer(dep):
    ks = dep.edge_ks["edge1"]
    proxy = HoldingProxy(ks.port)
    dep.cleanups.append(proxy.stop)
    dep.edges["edge1"].stop()
    dep.edge_upstream["edge1"] = proxy.url
    dep.edge_args["edge1"] = ["--upstream-timeout", "2s", "--upstream-settle", "8s"]
    dep.start_edge("edge1")
    dep.cli("project", "create", "held")
    assert_in_sync(dep, "a project to update")
    proxy.hold_next("PATCH", "/v3/projects/", 4)
    dep.cli("project", "set", "--description", "desc-v1", "held")
    dep.cli("project", "set", "--description", "desc-v2", "held")
    assert_in_sync(dep, "two updates, the first held")
    wait_until("the held update landed", lambda: proxy.held_done == 1, timeout=60)
    token = ks.token()
    [project] = [p for p in get_json(f"{ks.url}/v3/projects?name=held", token)["projects"]]
    assert project["description"] == "desc-v2", project
    # A held create: looked for once it may have landed, never made twice.
    central = dep.central_ks
    ctoken = central.token()
    admin = get_json(f"{central.url}/v3/users?name=admin", ctoken)["users"][0]["id"]
    proxy.hold_next("POST", "/v3/credentials", 4)
    status, _, _ = http("POST", f"{dep.gateway}/v3/credentials", {"credential": {
        "type": "totp", "user_id": admin, "blob": "held-secret-1"}}, ctoken)
    assert status == 201, status
    assert_in_sync(dep, "a held create")
    wait_until("the held create landed", lambda: proxy.held_done == 2, timeout=60)
    creds = get_json(f"{ks.url}/v3/credentials?type=totp", token)["credentials"]
    assert len(creds) == 1, creds
    dep.edges["edge1"].stop()
    dep.edge_upstream.pop("edge1")
    dep.edge_args.pop("edge1")
    dep.start_edge("edge1")


@check("the same through a real nats-server as external broker, traces over OTLP/gRPC; TLS everywhere: the CLI "
       "through an HTTPS gateway with --os-cacert, nats-server verifying central's and the edge's client certificates")
def external_broker(workdir):
    # TLS everywhere: central's proxy and admin listeners and the edge's admin
    # listener serve HTTPS; nats-server requires TLS and verifies every
    # client's certificate (central's and the edge's), all from one private CA.
    pki = Pki(f"{workdir}/external")
    pki.trust()
    port = free_port()
    crt, key = pki.issue("nats")
    nats = subprocess.Popen([str(VENV_BIN / "nats-server"), "-a", "127.0.0.1", "-p", str(port), "--tls",
                             "--tlscert", crt, "--tlskey", key, "--tlsverify", "--tlscacert", str(pki.ca)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    receiver = Receiver()
    dep = Deployment(f"{workdir}/external", edges=("edge1",), external_broker=f"tls://localhost:{port}",
                     otlp=(receiver.grpc_endpoint, "grpc"), pki=pki)
    try:
        dep.start()
        # The CLI through the HTTPS gateway, trusting the CA with --os-cacert
        # (dep.cli); without it, refused.
        dep.cli("project", "list")
        env = dict(os.environ, **dep.central_ks.admin_env(dep.gateway))
        r = subprocess.run([str(VENV_BIN / "openstack"), "project", "list"], env=env, capture_output=True,
                           text=True)
        assert r.returncode != 0 and "CERTIFICATE_VERIFY_FAILED" in r.stderr, (r.returncode, r.stderr[-400:])
        # The audit CLI over HTTPS with --admin-ca.
        r = subprocess.run([str(dep.bin), "audit", "--admin-url", dep.admin, "--admin-ca", str(pki.ca), "edges"],
                           capture_output=True, text=True)
        assert r.returncode == 0 and "edge1" in r.stdout, (r.returncode, r.stdout, r.stderr)
        # Traces over OTLP/gRPC, the op's traceparent through a real nats-server's headers.
        assert_one_trace(dep, receiver, ["edge1"])
        dep.cli("domain", "create", "ext")
        dep.cli("project", "create", "ext-web", "--domain", "ext")
        dep.cli("user", "create", "bob", "--domain", "ext", "--password", "bob-pw", "--project", "ext-web",
                "--project-domain", "ext")
        dep.cli("role", "add", "--user", "bob", "--user-domain", "ext", "--project", "ext-web",
                "--project-domain", "ext", "member")
        assert_in_sync(dep, "external broker pass")
        assert dep.edge_ks["edge1"].token("bob", "bob-pw", "ext", "ext-web", "ext"), "bob cannot log in at the edge"
    finally:
        dep.stop()
        nats.terminate()
        nats.wait(timeout=30)
        receiver.stop()


@check("two central replicas on PostgreSQL behind HAProxy: the CLI, one project updated through both, "
       "the leader killed -9 mid-stream and restarted, the edge equal to central")
def replicas_behind_haproxy(workdir):
    import threading

    pg = Postgres().start()
    subprocess.run([str(pg.bin / "createdb"), "-h", "127.0.0.1", "-p", str(pg.port), "-U", "syncgate", "oplog"],
                   check=True, capture_output=True)
    nats_port = free_port()
    nats = subprocess.Popen([str(VENV_BIN / "nats-server"), "-a", "127.0.0.1", "-p", str(nats_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    dep = Deployment(f"{workdir}/replicas", edges=("edge1",), external_broker=f"nats://127.0.0.1:{nats_port}")
    dep.central_db = f"{pg.url}/oplog"
    # A write the killed leader had forwarded, if it never lands, is found
    # not applied once it can no longer land: sooner than the default here
    # (gunicorn answers or drops a request within seconds). Until then, a
    # create of the same name is refused 503 through either replica.
    dep.central_args = ["--upstream-settle", "5s"]
    # The load balancer listens where the deployment's gateway is.
    ports = [(free_port(), free_port()) for _ in range(2)]
    procs = {}
    balancer = HAProxy(dep.workdir, dep.proxy_port, ports)

    def start_replica(i):
        proxy, admin = ports[i]
        p = dep.central_process(f"central{i}", proxy, admin)
        p.start()
        procs[i] = p
        wait_until(f"replica {i}", lambda: http("GET", f"http://127.0.0.1:{admin}/readyz")[0] == 200)

    def leader():
        for i in list(procs):
            s = get_json(f"http://127.0.0.1:{ports[i][1]}/v1/status")
            if s["op_log"]["leads"]:
                return i, s["op_log"]["epoch"]
        return None

    try:
        dep.prepare_keystones()
        for i in range(len(ports)):
            start_replica(i)
        balancer.start()
        wait_until("the load balancer", lambda: http("GET", f"{dep.gateway}/v3")[0] == 200)
        dep.admin = f"http://127.0.0.1:{ports[0][1]}"
        for name in dep.edge_ks:
            dep.start_edge(name)
        first, epoch = wait_until("a leader", leader)

        dep.cli("domain", "create", "ha")
        dep.cli("project", "create", "ha-web", "--domain", "ha")
        dep.cli("user", "create", "carol", "--domain", "ha", "--password", "carol-pw", "--project", "ha-web",
                "--project-domain", "ha")
        dep.cli("role", "add", "--user", "carol", "--user-domain", "ha", "--project", "ha-web",
                "--project-domain", "ha", "member")
        token = dep.central_ks.token()
        web = get_json(f"{dep.central_ks.url}/v3/projects?name=ha-web", token)["projects"][0]["id"]
        failures = []

        def updates(i):
            for n in range(10):
                status, _, body = http("PATCH", f"http://127.0.0.1:{ports[i][0]}/v3/projects/{web}",
                                       {"project": {"description": f"replica {i}, update {n}"}}, token)
                if status != 200:
                    failures.append((i, n, status, body))
        writers = [threading.Thread(target=updates, args=(i,)) for i in range(len(ports))]
        for w in writers:
            w.start()
        for w in writers:
            w.join()
        assert not failures, failures
        assert_in_sync(dep, "one project updated through both replicas at once")

        # Creates through the load balancer while the leader is killed -9. A
        # write cut by the kill is answered 502 by the balancer (and logged by
        # the leader as an unknown outcome): the client tries again, and a 409
        # says the first try made it.
        made = []

        def creates():
            for n in range(30):
                # Tried again while refused: 502/503 from the balancer while
                # the killed replica is taken out, 503 while a write of the
                # same name is in doubt (up to the settle period and its
                # resolution).
                for _ in range(300):
                    status, _, _ = http("POST", f"{dep.gateway}/v3/projects", {"project": {"name": f"ha-{n}"}},
                                        token)
                    if status in (201, 409):
                        made.append(f"ha-{n}")
                        break
                    time.sleep(0.1)
                else:
                    failures.append(("create", n, status))
        writer = threading.Thread(target=creates)
        writer.start()
        wait_until("creates under way", lambda: len(made) >= 5)
        killed = time.monotonic()
        procs.pop(first).kill9()
        second, later = wait_until("another replica leading", lambda: (l := leader()) and l[1] > epoch and l,
                                   timeout=60)
        log(f"failover: replica {second} leads at epoch {later}, {time.monotonic() - killed:.1f}s after "
            f"replica {first} was killed")
        dep.admin = f"http://127.0.0.1:{ports[second][1]}"
        writer.join()
        assert not failures, failures
        start_replica(first)
        # A write the leader had taken when it was killed is settled as an
        # unknown outcome: applied, or skipped at the edge if it never landed.
        assert_in_sync(dep, "the leader killed -9 mid-stream and restarted",
                       states=("applied", "adopted", "skipped"))
        eks = dep.edge_ks["edge1"]
        names = {p["name"] for p in get_json(f"{eks.url}/v3/projects", eks.token())["projects"]}
        assert set(made) <= names, set(made) - names
        assert dep.edge_ks["edge1"].token("carol", "carol-pw", "ha", "ha-web", "ha"), "carol cannot log in at the edge"
        replicas = get_json(f"{dep.admin}/v1/status")["replicas"]
        assert len(replicas) == 2, replicas
    finally:
        for p in procs.values():
            p.stop()
        dep.stop()
        balancer.stop()
        nats.terminate()
        nats.wait(timeout=30)
        pg.stop()


def made(ks, path, kind, body, token):
    status, _, answer = http("POST", f"{ks.url}{path}", {kind: body}, token)
    assert status == 201, (path, status, answer)
    return answer[kind]["id"]


def put(ks, path, token):
    status, _, answer = http("PUT", f"{ks.url}{path}", None, token)
    assert status in (200, 201, 204), (path, status, answer)


def wait_resync(dep, edge):
    def done():
        row = dep.audit(f"/v1/edges/{edge}")
        phase = (row.get("resync") or {}).get("phase")
        assert phase != "failed", row
        return row if phase == "done" else None
    return wait_until(f"resync of {edge}", done, timeout=180, every=0.5)


def drift_found(dep, edge):
    status, _, body = http("POST", f"{dep.admin}/v1/drift/run?edge={edge}")
    assert status == 202, (status, body)

    def done():
        d = dep.audit(f"/v1/drift?edge={edge}")
        state = d["runs"][0]["state"]
        assert state != "failed", d
        return d if state == "done" else None
    d = wait_until(f"drift audit of {edge}", done, timeout=180, every=0.5)
    return sorted((x["category"], x["kind"], x["key"], tuple(x.get("fields", []))) for x in d["differences"])


@check("the Grafana dashboard: every panel's queries evaluate on a real Prometheus scraping central and an "
       "edge, and every panel shows data")
def dashboard_on_prometheus(prom):
    queries = panel_queries()
    # Two scrapes after the writes so far: rates have two samples.
    seen = time.time()
    wait_until("two scrapes of central and the edge", lambda: prom.scraped_since(seen + 1, ("syncgate", "syncgate-edge")))
    empty = []
    for title, exprs in queries:
        # Each query evaluates without error (`query` asserts it); the panel
        # shows something.
        if not any(prom.query(e) for e in exprs):
            empty.append(title)
    assert not empty, f"panels with no data: {empty}"


@check("an edge that joins an existing cloud is resynced; the drift audit finds and repairs direct writes")
def late_join(workdir):
    dep = Deployment(f"{workdir}/late", edges=("late1",), initial_sync=True)
    try:
        dep.prepare_keystones()
        dep.start_central()
        # Made on the central Keystone directly, before the edge exists.
        ks = dep.central_ks
        token = ks.token()
        legacy = made(ks, "/v3/domains", "domain", {"name": "legacy", "description": "before syncgate"}, token)
        web = made(ks, "/v3/projects", "project", {"name": "old-web", "domain_id": legacy, "tags": ["prod"]}, token)
        made(ks, "/v3/projects", "project", {"name": "old-db", "domain_id": legacy, "parent_id": web}, token)
        olduser = made(ks, "/v3/users", "user", {"name": "olduser", "domain_id": legacy, "email": "old@legacy",
                                                 "default_project_id": web, "password": "old-pw-1"}, token)
        group = made(ks, "/v3/groups", "group", {"name": "oldgroup", "domain_id": legacy}, token)
        role = made(ks, "/v3/roles", "role", {"name": "oldrole"}, token)
        droles = made(ks, "/v3/roles", "role", {"name": "legacy-admin", "domain_id": legacy}, token)
        reader = [r for r in get_json(f"{ks.url}/v3/roles?name=reader", token)["roles"]][0]["id"]
        put(ks, f"/v3/groups/{group}/users/{olduser}", token)
        put(ks, f"/v3/roles/{role}/implies/{reader}", token)
        put(ks, f"/v3/projects/{web}/users/{olduser}/roles/{role}", token)
        put(ks, f"/v3/OS-INHERIT/domains/{legacy}/groups/{group}/roles/{droles}/inherited_to_projects", token)
        put(ks, f"/v3/system/users/{olduser}/roles/{reader}", token)
        # The other kinds replicated: a policy, an EC2 credential, a registered
        # limit and a limit (for the identity service both sites have),
        # federation objects.
        made(ks, "/v3/policies", "policy", {"type": "application/json", "blob": '{"old": true}'}, token)
        cred = made(ks, "/v3/credentials", "credential", {"user_id": olduser, "project_id": web, "type": "ec2",
                                                          "blob": '{"access": "old-ak", "secret": "old-sk"}'}, token)
        identity = get_json(f"{ks.url}/v3/services?type=identity", token)["services"][0]["id"]
        status, _, answer = http("POST", f"{ks.url}/v3/registered_limits", {"registered_limits": [
            {"service_id": identity, "region_id": "RegionOne", "resource_name": "widgets", "default_limit": 10}]},
            token)
        assert status == 201, answer
        status, _, answer = http("POST", f"{ks.url}/v3/limits", {"limits": [
            {"service_id": identity, "project_id": web, "region_id": "RegionOne", "resource_name": "widgets",
             "resource_limit": 5}]}, token)
        assert status == 201, answer
        fed = "/v3/OS-FEDERATION"
        for path, kind, body in [
            (f"{fed}/identity_providers/oldidp", "identity_provider",
             {"enabled": True, "remote_ids": ["https://idp.example/"], "description": "legacy idp"}),
            (f"{fed}/mappings/oldmap", "mapping",
             {"rules": [{"local": [{"user": {"name": "{0}"}}], "remote": [{"type": "REMOTE_USER"}]}]}),
            (f"{fed}/identity_providers/oldidp/protocols/saml2", "protocol", {"mapping_id": "oldmap"}),
            (f"{fed}/service_providers/oldsp", "service_provider",
             {"auth_url": "https://sp.example/v3/OS-FEDERATION/identity_providers/x/protocols/saml2/auth",
              "sp_url": "https://sp.example/Shibboleth.sso/SAML2/ECP"}),
        ]:
            status, _, answer = http("PUT", f"{ks.url}{path}", {kind: body}, token)
            assert status == 201, (path, status, answer)
        dep.start_edge("late1")
        # A real Prometheus scrapes central and the edge from here on (the
        # dashboard's queries are run on it below).
        prom = Prometheus(dep.workdir, [f"127.0.0.1:{dep.admin_port}"],
                          edges=[dep.edges["late1"].admin.removeprefix("http://")]).start()
        dep.cleanups.append(prom.stop)
        row = wait_resync(dep, "late1")
        result = row["resync"]["result"]
        assert result["failed"] == 0, result
        assert_in_sync(dep, "the initial sync")
        users = [u["user_key"] for u in row["needs_password"]["users"]]
        assert users == ["legacy/olduser"], row["needs_password"]
        assert "old-pw-1" not in json.dumps(row) and "old-sk" not in json.dumps(row)
        eks = dep.edge_ks["late1"]
        etoken = eks.token()
        for path in [f"/v3/credentials/{cred}", f"{fed}/identity_providers/oldidp", f"{fed}/mappings/oldmap",
                     f"{fed}/identity_providers/oldidp/protocols/saml2", f"{fed}/service_providers/oldsp"]:
            get_json(f"{eks.url}{path}", etoken)
        limits = get_json(f"{eks.url}/v3/limits", etoken)["limits"]
        assert [(x["resource_name"], x["resource_limit"]) for x in limits] == [("widgets", 5)], limits
        rlimits = get_json(f"{eks.url}/v3/registered_limits", etoken)["registered_limits"]
        assert [(x["resource_name"], x["default_limit"]) for x in rlimits] == [("widgets", 10)], rlimits
        blobs = [p["blob"] for p in get_json(f"{eks.url}/v3/policies", etoken)["policies"]]
        assert blobs == ['{"old": true}'], blobs
        assert drift_found(dep, "late1") == [], "nothing differs after the resync"
        # After the fence, the op stream goes on through the gateway.
        dep.cli("project", "create", "new-web", "--domain", "legacy")
        # A password set through the gateway reaches the edge and clears the need.
        dep.cli("user", "set", "--password", "new-pw-2", "--domain", "legacy", "olduser")
        assert_in_sync(dep, "writes after the resync")
        assert can_log_in(dep.edge_ks["late1"], "olduser", "new-pw-2", "legacy", "old-web")
        wait_until("olduser no longer needs a password",
                   lambda: dep.audit("/v1/edges/late1")["needs_password"]["count"] == 0)

        # Written on the edge's Keystone directly: drift, then repaired.
        made(eks, "/v3/users", "user", {"name": "rogue", "password": "rogue-pw"}, etoken)
        eweb = get_json(f"{eks.url}/v3/projects?name=old-web", etoken)["projects"][0]["id"]
        status, _, _ = http("PATCH", f"{eks.url}/v3/projects/{eweb}", {"project": {"description": "edited"}}, etoken)
        assert status == 200, status
        found = drift_found(dep, "late1")
        assert found == [("differs", "project", "legacy/old-web", ("description",)),
                         ("only_at_edge", "user", "Default/rogue", ())], found
        status, _, body = http("POST", f"{dep.admin}/v1/drift/repair?edge=late1&prune=true")
        assert status == 202, (status, body)
        wait_resync(dep, "late1")
        assert drift_found(dep, "late1") == []
        assert_in_sync(dep, "the repair")
        dashboard_on_prometheus(prom)
        prom.stop()

        # Ops the edge has not applied (its Keystone down): a delete, a rename
        # and a membership removal; a resync asked for as it comes back races
        # the replay. Neither brings the deleted project back, makes a second
        # project for the renamed one, or keeps the removed membership.
        ctoken = ks.token()
        new_web = get_json(f"{ks.url}/v3/projects?name=new-web", ctoken)["projects"][0]["id"]
        old_db = get_json(f"{ks.url}/v3/projects?name=old-db", ctoken)["projects"][0]["id"]
        eks.stop()
        before = dep.ops()[-1]["seq"]
        for method, path, body in [
            ("DELETE", f"/v3/projects/{new_web}", None),
            ("PATCH", f"/v3/projects/{old_db}", {"project": {"name": "renamed-db"}}),
            ("DELETE", f"/v3/groups/{group}/users/{olduser}", None),
        ]:
            status, _, answer = http(method, f"{dep.gateway}{path}", body, ctoken)
            assert status in (200, 204), (method, path, status, answer)
        dep.wait_delivered(states=("pending", "timed_out"), edges=["late1"], after=before)
        eks.start()
        status, _, body = http("POST", f"{dep.admin}/v1/edges/late1/resync")
        assert status == 202, (status, body)
        wait_resync(dep, "late1")
        assert_in_sync(dep, "a resync racing the replay of a delete, a rename and a membership removal")
        etoken = eks.token()
        names = sorted(p["name"] for p in get_json(f"{eks.url}/v3/projects", etoken)["projects"])
        assert "new-web" not in names and "old-db" not in names and names.count("renamed-db") == 1, names
        egroup = get_json(f"{eks.url}/v3/groups?name=oldgroup", etoken)["groups"][0]["id"]
        members = [u["name"] for u in get_json(f"{eks.url}/v3/groups/{egroup}/users", etoken)["users"]]
        assert "olduser" not in members, members
        assert drift_found(dep, "late1") == [], "nothing differs after the resync"

        # A drift audit run while writes go through the gateway reports no
        # difference for what those writes change (they are in flight, not drift).
        status, _, body = http("POST", f"{dep.admin}/v1/drift/run?edge=late1")
        assert status == 202, (status, body)
        for i in range(5):
            dep.cli("project", "create", f"during-drift-{i}", "--domain", "legacy")

        def audited():
            d = dep.audit("/v1/drift?edge=late1")
            state = d["runs"][0]["state"]
            assert state != "failed", d
            return d if state == "done" else None
        d = wait_until("the drift audit during writes", audited, timeout=180, every=0.5)
        assert d["differences"] == [], d["differences"]
        assert_in_sync(dep, "writes during a drift audit")
        assert drift_found(dep, "late1") == []
    finally:
        dep.stop()


@check("releases mixed: an edge newer than its central applies nothing and says why; central, then an edge of "
       "0.1.0 upgraded in place one at a time, nothing lost, the audit clean")
def mixed_releases(workdir):
    old = release_binary("0.1.0")
    dep = Deployment(f"{workdir}/mixed", edges=("edge1", "edge2"))
    dep.central_bin = old
    dep.edge_bin["edge1"] = old
    try:
        dep.prepare_keystones()
        dep.start_central()
        dep.start_edge("edge1")
        dep.start_edge("edge2", ready=False)
        dep.cli("project", "create", "made-under-0.1.0")
        dep.wait_delivered(edges=["edge1"])
        status = dep.edges["edge2"].admin + "/v1/status"
        wait_until("the newer edge says central is older",
                   lambda: "upgrade central first" in json.dumps(get_json(status)))
        assert http("GET", dep.edges["edge2"].admin + "/readyz")[0] == 503, "an edge applying nothing is not ready"
        ks = dep.edge_ks["edge2"]
        names = [p["name"] for p in get_json(f"{ks.url}/v3/projects", token=ks.token())["projects"]]
        assert "made-under-0.1.0" not in names, "an edge newer than its central applied an op"
        # Central upgraded in place: same op log, same ports.
        dep.central.stop()
        dep.central_bin = None
        dep.start_central()
        dep.cli("project", "create", "made-under-new-central")
        assert_in_sync(dep, "central upgraded, edge1 still 0.1.0")
        # Then the old edge, with its own database.
        dep.edges["edge1"].stop()
        del dep.edge_bin["edge1"]
        dep.start_edge("edge1")
        dep.cli("project", "create", "made-after-every-upgrade")
        assert_in_sync(dep, "every process upgraded")
    finally:
        dep.stop()


def main():
    workdir = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="syncgate-e2e-")
    log(f"e2e workdir: {workdir}")
    receiver = Receiver()
    # Mixed Keystone releases: edge2's site runs an older one than central's
    # and edge1's, through every check of this deployment.
    dep = Deployment(f"{workdir}/embedded", edges=("edge1", "edge2"), otlp=(receiver.http_endpoint, "http/protobuf"),
                     keystone_releases={"edge2": OLDER_KEYSTONE})
    try:
        t = time.monotonic()
        dep.start()
        log(f"deployment up in {time.monotonic() - t:.1f}s")
        scenario(dep)
        traces_http(dep, receiver)
        edge_keystone_down(dep)
        disguised_writes(dep)
        routing_headers(dep)
        edge_killed(dep)
        central_killed(dep)
        late_answer(dep)
        oplog_disk_full(dep)
    except Exception:
        results.append(("deployment", False))
        traceback.print_exc()
    finally:
        dep.stop()
        receiver.stop()
    external_broker(workdir)
    mixed_releases(workdir)
    late_join(workdir)
    replicas_behind_haproxy(workdir)
    passed = sum(ok for _, ok in results)
    failed = len(results) - passed
    print(f"e2e: {passed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
