#!/usr/bin/env python3
"""The gateway's cost, measured side by side on this machine (see BENCHMARKS.md).

A fast upstream (nginx, one worker, static Keystone-shaped JSON; a POST answers
201 with a fresh ID; `GET /v3/auth/tokens` answers a token validation with a
catalog, about 40 KiB, from a file) is reached three ways: directly, through nginx as a plain
reverse proxy (one worker, keepalive), and through `syncgate central` (release
build). The server under test and the upstream share core 0; wrk runs on core 1
(`wrk -t1 -c32`). Each figure is the best of three alternating 5-second runs.
Then an edge joins with every captured op (at least 100,000) still to apply (against a fast
edge Keystone: nginx again) and its catch-up rate is measured. Prints figures
only; it never fails on a timing.

With --postgres URL (a database of its own; scripts/bench.sh starts a server),
captured writes and reads are measured again through a central whose op log is
on PostgreSQL, beside the SQLite figures.

Usage: bench.py [--seconds N] [--runs N] [--connections N] [--catch-up-ops N]
                [--postgres postgres://USER@HOST:PORT/DB]
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROJECT = {"id": "$request_id", "name": "bench", "domain_id": "default", "enabled": True,
           "description": "", "is_domain": False, "parent_id": "default", "tags": [], "options": {},
           "links": {"self": "http://127.0.0.1/v3/projects/$request_id"}}
LIST = {"projects": [dict(PROJECT, id=f"{i:032x}", name=f"project-{i}") for i in range(10)],
        "links": {"self": "http://127.0.0.1/v3/projects", "previous": None, "next": None}}


def validated_token(size=40 * 1024):
    """A token validation's answer with a catalog, about `size` bytes: what
    every service asks Keystone for (`GET /v3/auth/tokens` with
    `X-Subject-Token`), the hottest read of a real cloud."""
    catalog, n = [], 0
    token = {"methods": ["password"], "expires_at": "2099-01-01T00:00:00.000000Z",
             "issued_at": "2026-01-01T00:00:00.000000Z", "audit_ids": ["bench"],
             "user": {"id": "u" * 32, "name": "admin", "domain": {"id": "default", "name": "Default"},
                      "password_expires_at": None},
             "project": {"id": "p" * 32, "name": "admin", "domain": {"id": "default", "name": "Default"}},
             "roles": [{"id": f"{i:032x}", "name": f"role-{i}"} for i in range(4)],
             "is_domain": False, "catalog": catalog}
    while len(json.dumps({"token": token})) < size:
        region = f"Region{n // 8}"
        catalog.append({"id": f"{n:032x}", "type": f"service-{n}", "name": f"service-{n}",
                        "endpoints": [{"id": f"{n:016x}{i:016x}", "interface": iface, "region": region,
                                       "region_id": region, "url": f"https://{region.lower()}.example.net:{9000 + n}/v1"}
                                      for i, iface in enumerate(("public", "internal", "admin"))]})
        n += 1
    return json.dumps({"token": token})


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nginx_conf(workdir, port, body):
    conf = Path(workdir) / f"nginx-{port}.conf"
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {workdir}/nginx-{port}.pid;
error_log {workdir}/nginx-{port}.err warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/body-{port};
    proxy_temp_path {workdir}/proxy-{port};
    fastcgi_temp_path {workdir}/fcgi-{port};
    uwsgi_temp_path {workdir}/uwsgi-{port};
    scgi_temp_path {workdir}/scgi-{port};
    keepalive_requests 1000000;
    {body}
}}
""")
    return conf


def upstream_conf(workdir, port):
    created = json.dumps({"project": PROJECT}).replace("'", "")
    listing = json.dumps(LIST).replace("'", "")
    # Read by nginx's workers (another user): a directory of its own, open to
    # them, in the private work directory they may only pass through.
    static = Path(workdir) / "static"
    static.mkdir(exist_ok=True)
    os.chmod(workdir, 0o711)
    os.chmod(static, 0o755)
    token = static / "token.json"
    token.write_text(validated_token())
    os.chmod(token, 0o644)
    return nginx_conf(workdir, port, f"""
    server {{
        listen 127.0.0.1:{port};
        default_type application/json;
        location = /v3/auth/tokens {{
            add_header X-Subject-Token bench-subject always;
            alias {token};
        }}
        location = /v3/projects {{
            if ($request_method = POST) {{ return 201 '{created}'; }}
            return 200 '{listing}';
        }}
        location / {{ return 200 '{{"version": {{"id": "v3.14", "status": "stable"}}}}'; }}
    }}""")


def edge_keystone_conf(workdir, port):
    """A fast edge Keystone: tokens, creates with fresh IDs, empty look-ups."""
    token = json.dumps({"token": {"expires_at": "2099-01-01T00:00:00.000000Z", "methods": ["password"]}})
    created = json.dumps({"project": PROJECT}).replace("'", "")
    return nginx_conf(workdir, port, f"""
    server {{
        listen 127.0.0.1:{port};
        default_type application/json;
        location = /v3/auth/tokens {{
            add_header X-Subject-Token bench-token always;
            return 201 '{token}';
        }}
        location = /v3/projects {{
            if ($request_method = POST) {{ return 201 '{created}'; }}
            return 200 '{{"projects": [], "links": {{}}}}';
        }}
        location / {{ return 200 '{{"version": {{"id": "v3.14", "status": "stable"}}}}'; }}
    }}""")


def proxy_conf(workdir, port, upstream):
    return nginx_conf(workdir, port, f"""
    upstream keystone {{ server 127.0.0.1:{upstream}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://keystone;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}""")


class Server:
    def __init__(self, args, core, env=None, log=None):
        self.proc = subprocess.Popen(["taskset", "-c", str(core), *args], env=env,
                                     stdout=log or subprocess.DEVNULL, stderr=log or subprocess.DEVNULL)

    def peak_rss_mb(self):
        # The process under taskset: its child has the same PID after exec.
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
            kb = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))
            return kb / 1024
        except (OSError, AttributeError):
            return float("nan")

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def wait_http(url, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status < 500:
                    return
        except Exception:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer")


POST_LUA = """
counter = 0
request = function()
    counter = counter + 1
    local body = '{"project": {"name": "bench-' .. counter .. '-' .. math.random(1e9) .. '"}}'
    return wrk.format("POST", "/v3/projects", {["Content-Type"] = "application/json",
                                                ["X-Auth-Token"] = "bench"}, body)
end
"""


TOKEN_LUA = """
wrk.headers["X-Auth-Token"] = "bench"
wrk.headers["X-Subject-Token"] = "bench-subject"
"""


def wrk(url, seconds, connections, script=None):
    args = ["taskset", "-c", "1", "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
    if script:
        args += ["-s", script]
    out = subprocess.run(args + [url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))

    def pct(p):
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not m:
            return float("nan")
        value, unit = float(m.group(1)), m.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rps, "p50": pct(50), "p99": pct(99), "errors": int(errors.group(1)) if errors else 0}


def _last_seq(admin_port):
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics").read().decode()
    m = re.search(r"^syncgate_oplog_last_seq (\d+)", text, re.M)
    return int(m.group(1)) if m else 0


def _edge_cursor(admin_port):
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=2).read().decode()
    except Exception:
        return 0
    m = re.search(r"^syncgate_edge_cursor (\d+)", text, re.M)
    return int(m.group(1)) if m else 0


def paced_writes(port, rate, seconds, threads=8):
    """POSTs at `rate` per second for `seconds`, spread over threads; the count sent."""
    import http.client
    import threading
    sent = [0] * threads
    per = rate / threads
    start = time.monotonic() + 0.1

    def run(t):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        k = 0
        while True:
            at = start + k / per + t / rate
            if at - start > seconds:
                break
            delay = at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            body = json.dumps({"project": {"name": f"lag-{rate}-{t}-{k}"}})
            conn.request("POST", "/v3/projects", body, {"Content-Type": "application/json",
                                                         "X-Auth-Token": "bench"})
            conn.getresponse().read()
            sent[t] += 1
            k += 1

    workers = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(sent)


def log_times(path, message):
    """seq -> time (seconds) of each JSON log line with this message."""
    from datetime import datetime
    out = {}
    for line in Path(path).read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        fields = entry.get("fields", {})
        if fields.get("message") == message and "seq" in fields:
            ts = datetime.fromisoformat(entry["timestamp"].replace("Z", "+00:00"))
            out[int(fields["seq"])] = ts.timestamp()
    return out


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p / 100))] if values else float("nan")


def best(results):
    return max(results, key=lambda r: r["rps"])


def _status(admin_port):
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/v1/status", timeout=2) as r:
        return json.loads(r.read())


def _leader(admins):
    """The index of the replica that says it leads, and its epoch, or None."""
    for i, port in enumerate(admins):
        try:
            s = _status(port)
        except Exception:
            continue
        if s["op_log"].get("leads"):
            return i, s["op_log"]["epoch"]
    return None


def postgres_figures(opts, work, up_port, script):
    """Captured writes and reads through central with its op log on
    PostgreSQL (`--postgres`): one replica, then two (each driven by its own
    wrk with half the connections, the sum reported) on one external
    nats-server; then failover, the time from a kill -9 of the leader to
    another replica leading. Central and the upstream on core 0 as above; the
    PostgreSQL server and nats-server are not pinned."""
    env = dict(os.environ, SYNCGATE_LOG=os.environ.get("SYNCGATE_LOG", "info"))
    nats_bin = REPO / ".venv" / "bin" / "nats-server"
    nats_port = free_port()
    nats = Server([str(nats_bin), "-a", "127.0.0.1", "-p", str(nats_port)], 1) if nats_bin.exists() else None
    upstream = Server(["nginx", "-c", str(upstream_conf(work, up_port))], 0)
    replicas = []

    def replica(n):
        port, admin = free_port(), free_port()
        broker = (["--broker", f"nats://127.0.0.1:{nats_port}"] if nats else
                  ["--broker-listen", f"127.0.0.1:{free_port()}"])
        server = Server([opts.binary, "central", "--upstream", f"http://127.0.0.1:{up_port}",
                         "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}",
                         *broker, "--insecure-plaintext-sync",
                         "--edges", "edge1", "--log-format", "json", "--db", opts.postgres], 0, env=env,
                        log=open(Path(work) / f"central-postgres-{n}.log", "a"))
        wait_http(f"http://127.0.0.1:{admin}/readyz")
        return server, port, admin

    try:
        wait_http(f"http://127.0.0.1:{up_port}/")
        replicas.append(replica(0))
        figures = {"version": os.environ.get("BENCH_POSTGRES_VERSION", "")}
        port = replicas[0][1]
        for method, lua in (("POST", str(script)), ("GET", None)):
            figures[method] = best([wrk(f"http://127.0.0.1:{port}/v3/projects", opts.seconds,
                                        opts.connections, lua) for _ in range(opts.runs)])
        if not nats:
            return figures
        replicas.append(replica(1))
        import concurrent.futures
        pool = concurrent.futures.ThreadPoolExecutor(2)
        for method, lua in (("POST", str(script)), ("GET", None)):
            runs = []
            for _ in range(opts.runs):
                parts = list(pool.map(lambda r: wrk(f"http://127.0.0.1:{r[1]}/v3/projects", opts.seconds,
                                                    max(1, opts.connections // 2), lua), replicas))
                runs.append({"rps": sum(p["rps"] for p in parts), "p50": max(p["p50"] for p in parts),
                             "p99": max(p["p99"] for p in parts), "errors": sum(p["errors"] for p in parts)})
            figures[f"{method} x2"] = best(runs)
        # Failover: the leader killed -9, the time until another leads.
        took = []
        for n in range(opts.runs):
            admins = [r[2] for r in replicas]
            leader = None
            while leader is None:
                leader = _leader(admins)
                time.sleep(0.05)
            i, epoch = leader
            killed = time.monotonic()
            replicas[i][0].proc.kill()
            replicas[i][0].proc.wait()
            others = [a for j, a in enumerate(admins) if j != i]
            deadline = killed + 60
            while time.monotonic() < deadline:
                now = _leader(others)
                if now and now[1] > epoch:
                    took.append(time.monotonic() - killed)
                    break
                time.sleep(0.02)
            replicas[i] = replica(2 + n)
        figures["failover"] = took
        return figures
    finally:
        for r in replicas:
            r[0].stop()
        upstream.stop()
        if nats:
            nats.stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--binary", default=str(REPO / "target" / "release" / "syncgate"))
    ap.add_argument("--lag-seconds", type=int, default=5)
    ap.add_argument("--catch-up-ops", type=int, default=100_000,
                    help="ops the edge has to catch up with (more captured writes are made first)")
    ap.add_argument("--catch-up-limit", type=int, default=120,
                    help="seconds the edge may take to catch up with every captured op")
    ap.add_argument("--postgres", help="also measure with the op log in this PostgreSQL database")
    opts = ap.parse_args()
    if os.cpu_count() < 2:
        print("note: fewer than 2 cores; figures are not comparable", flush=True)
    work = tempfile.mkdtemp(prefix="syncgate-bench-")
    up_port, ng_port, sg_port, sg_admin, sg_broker = (free_port() for _ in range(5))
    servers = []
    try:
        servers.append(Server(["nginx", "-c", str(upstream_conf(work, up_port))], 0))
        servers.append(Server(["nginx", "-c", str(proxy_conf(work, ng_port, up_port))], 0))
        env = dict(os.environ, SYNCGATE_LOG=os.environ.get("SYNCGATE_LOG", "info"))
        log = open(Path(work) / "central.log", "w")
        central = Server([opts.binary, "central", "--upstream", f"http://127.0.0.1:{up_port}",
                          "--listen", f"127.0.0.1:{sg_port}", "--admin-listen", f"127.0.0.1:{sg_admin}",
                          "--broker-listen", f"127.0.0.1:{sg_broker}", "--insecure-plaintext-sync",
                          "--edges", "edge1", "--log-format", "json",
                          "--db", f"sqlite://{work}/central.db"], 0, env=env, log=log)
        servers.append(central)
        for port in (up_port, ng_port):
            wait_http(f"http://127.0.0.1:{port}/")
        wait_http(f"http://127.0.0.1:{sg_admin}/readyz")
        idle_rss = central.peak_rss_mb()
        targets = [("direct", up_port), ("nginx", ng_port), ("syncgate", sg_port)]
        script = Path(work) / "post.lua"
        script.write_text(POST_LUA)
        validate = Path(work) / "validate.lua"
        validate.write_text(TOKEN_LUA)
        size = (Path(work) / "static" / "token.json").stat().st_size
        table = {}
        for label, lua, path in [("GET /v3/projects", None, "/v3/projects"),
                                 (f"GET /v3/auth/tokens (a token validated, {size / 1024:.0f} KiB answer)",
                                  str(validate), "/v3/auth/tokens"),
                                 ("POST /v3/projects (captured)", str(script), "/v3/projects")]:
            runs = {name: [] for name, _ in targets}
            for _ in range(opts.runs):
                for name, port in targets:
                    runs[name].append(wrk(f"http://127.0.0.1:{port}{path}", opts.seconds, opts.connections, lua))
            table[label] = {name: best(r) for name, r in runs.items()}
            table[label]["rss"] = central.peak_rss_mb()
        # Catch-up: an edge that joins with every op above still to apply,
        # topped up with more captured writes to --catch-up-ops.
        while _last_seq(sg_admin) < opts.catch_up_ops:
            wrk(f"http://127.0.0.1:{sg_port}/v3/projects", opts.seconds, opts.connections, str(script))
        last = _last_seq(sg_admin)
        ek_port, edge_admin = free_port(), free_port()
        servers.append(Server(["nginx", "-c", str(edge_keystone_conf(work, ek_port))], 0))
        wait_http(f"http://127.0.0.1:{ek_port}/")
        edge_env = dict(env, OS_USERNAME="admin", OS_PASSWORD="bench", OS_PROJECT_NAME="admin",
                        OS_USER_DOMAIN_NAME="Default", OS_PROJECT_DOMAIN_NAME="Default")
        started = time.monotonic()
        edge = Server([opts.binary, "edge", "--id", "edge1", "--broker", f"nats://127.0.0.1:{sg_broker}",
                       "--upstream", f"http://127.0.0.1:{ek_port}", "--admin-listen", f"127.0.0.1:{edge_admin}",
                       "--insecure-plaintext-sync", "--log-format", "json",
                       "--db", f"sqlite://{work}/edge.db"], 1, env=edge_env,
                      log=open(Path(work) / "edge.log", "w"))
        servers.append(edge)
        deadline = started + opts.catch_up_limit
        applied = 0
        while time.monotonic() < deadline:
            applied = _edge_cursor(edge_admin)
            if applied >= last:
                break
            time.sleep(0.2)
        catch_up = (applied, last, time.monotonic() - started, edge.peak_rss_mb())
        # Replication lag: op logged at central -> op applied at the edge (the
        # edge acknowledges right after), at steady paced rates.
        lags = {}
        for rate in (100, 1000):
            first = _last_seq(sg_admin) + 1
            paced_writes(sg_port, rate, opts.lag_seconds)
            target = _last_seq(sg_admin)
            deadline = time.monotonic() + 60
            while _edge_cursor(edge_admin) < target and time.monotonic() < deadline:
                time.sleep(0.1)
            logged = log_times(Path(work) / "central.log", "op logged")
            applied_at = log_times(Path(work) / "edge.log", "op applied")
            ms = [(applied_at[q] - logged[q]) * 1000 for q in range(first, target + 1)
                  if q in logged and q in applied_at]
            lags[rate] = (len(ms), percentile(ms, 50), percentile(ms, 99))
        for s in servers:
            s.stop()
        servers = []
        on_pg = postgres_figures(opts, work, up_port, script) if opts.postgres else None
    finally:
        for s in servers:
            s.stop()
    print()
    print(f"machine: {os.cpu_count()} cores; wrk -t1 -c{opts.connections}, best of {opts.runs} x {opts.seconds}s; "
          f"SYNCGATE_LOG={env['SYNCGATE_LOG']}")
    print()
    print("| path | direct to upstream | through nginx | through syncgate central | syncgate / nginx |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label, r in table.items():
        d, n, s = r["direct"], r["nginx"], r["syncgate"]
        cell = lambda x: f"{x['rps']:,.0f} req/s, p50 {x['p50']:.2f} ms, p99 {x['p99']:.2f} ms" + (
            f" ({x['errors']} errors)" if x["errors"] else "")
        print(f"| {label} | {cell(d)} | {cell(n)} | {cell(s)} | {s['rps'] / n['rps']:.2f}x |")
    print()
    applied, last, took, edge_rss = catch_up
    print(f"| edge catch-up ({last:,} ops behind, fast edge Keystone) | | | "
          f"{applied:,} ops in {took:.1f} s: {applied / took:,.0f} ops/s | |")
    print()
    print("| replication lag (op logged at central -> applied at the edge) | ops | p50 | p99 |")
    print("| --- | ---: | ---: | ---: |")
    for rate, (n, p50, p99) in lags.items():
        print(f"| {rate} writes/s for {opts.lag_seconds} s | {n:,} | {p50:.1f} ms | {p99:.1f} ms |")
    if on_pg:
        print()
        print("| op log | captured POST /v3/projects | GET /v3/projects |")
        print("| --- | ---: | ---: |")
        cell = lambda x: f"{x['rps']:,.0f} req/s, p50 {x['p50']:.2f} ms, p99 {x['p99']:.2f} ms" + (
            f" ({x['errors']} errors)" if x["errors"] else "")
        sqlite = (table["POST /v3/projects (captured)"]["syncgate"], table["GET /v3/projects"]["syncgate"])
        print(f"| SQLite (the rows above) | {cell(sqlite[0])} | {cell(sqlite[1])} |")
        print(f"| PostgreSQL {on_pg['version']}, same machine, fsync and synchronous_commit on | "
              f"{cell(on_pg['POST'])} | {cell(on_pg['GET'])} |")
        if "POST x2" in on_pg:
            print(f"| PostgreSQL, two central replicas (half the connections each, summed) | "
                  f"{cell(on_pg['POST x2'])} | {cell(on_pg['GET x2'])} |")
        if on_pg.get("failover"):
            times = ", ".join(f"{t:.2f} s" for t in on_pg["failover"])
            print()
            print(f"failover (kill -9 of the leader -> another replica leads): {times}")
    print()
    print(f"edge peak RSS during catch-up: {edge_rss:.1f} MB")
    print(f"syncgate central peak RSS: idle {idle_rss:.1f} MB, after reads "
          f"{table['GET /v3/projects']['rss']:.1f} MB, after captured writes "
          f"{table['POST /v3/projects (captured)']['rss']:.1f} MB")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
