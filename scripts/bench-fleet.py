#!/usr/bin/env python3
"""A fleet on one machine (see BENCHMARKS.md, "A fleet"): one `syncgate central`
(release build, embedded broker, SQLite op log) and N real `syncgate edge`
processes (1,000 by default), each with its own database, against fast fake
Keystones (nginx, one worker: tokens, creates with fresh IDs, empty look-ups).

Measures: the time for the fleet to register; central's CPU and memory with
every edge connected and idle, then while W captured creates are made at R per
second; the broker's traffic (hellos, acks, ops); the audit API's latency
(`/v1/edges`, `/v1/out-of-sync`, `/v1/ops/{seq}`) while the fleet applies; the
lag from central's commit (`op logged`) to each edge's apply (`op applied`);
the time until every edge acknowledged every op; each edge's memory; and the
time for one more edge to register and catch up with every op. Prints figures;
never fails on a timing.

Usage: bench-fleet.py [--edges N] [--writes W] [--rate R] [--binary PATH]
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the gateway benchmark's helpers)

TICK = os.sysconf("SC_CLK_TCK")
# An edge process's own memory (private pages: its resident set is mostly
# the binary's pages, shared by every edge), measured at about 2 MiB idle
# (BENCHMARKS.md), with a margin for applies and the kernel's share.
EDGE_MIB = 6


def proc_status(pid, field):
    """A /proc/PID/status field in MiB (VmRSS, VmHWM), NaN when gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
        return int(re.search(rf"{field}:\s+(\d+) kB", text).group(1)) / 1024
    except (OSError, AttributeError):
        return float("nan")


def own_memory(pid):
    """A process's private and proportional memory in MiB (smaps_rollup:
    Private_Clean + Private_Dirty, Pss), NaNs when gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        kb = {k: int(v) for k, v in re.findall(r"^(\w+):\s+(\d+) kB", text, re.M)}
        return (kb["Private_Clean"] + kb["Private_Dirty"]) / 1024, kb["Pss"] / 1024
    except (OSError, KeyError):
        return float("nan"), float("nan")


def cpu_seconds(pid):
    """User and system CPU time of a process so far, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def metrics(admin):
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


def edges_rows(admin):
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/v1/edges", timeout=30) as r:
        return json.loads(r.read())["edges"]


def wait(what, check, timeout, every=0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(every)
    print(f"note: gave up waiting for {what} after {timeout} s", flush=True)
    return False


class AuditSampler(threading.Thread):
    """GETs the audit API's pages in turn until stopped; keeps each latency."""

    def __init__(self, admin, last_seq):
        super().__init__(daemon=True)
        self.admin, self.last_seq = admin, last_seq
        self.samples = {"/v1/edges": [], "/v1/out-of-sync": [], "/v1/ops/{seq}": []}
        self.errors = 0
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            pages = [("/v1/edges", "/v1/edges"), ("/v1/out-of-sync", "/v1/out-of-sync")]
            seq = self.last_seq()
            if seq:
                pages.append(("/v1/ops/{seq}", f"/v1/ops/{seq}"))
            for key, path in pages:
                t = time.monotonic()
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}{path}", timeout=30) as r:
                        r.read()
                    self.samples[key].append((time.monotonic() - t) * 1000)
                except Exception:
                    self.errors += 1
            self.stop.wait(0.05)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--edges", type=int, default=1000)
    ap.add_argument("--writes", type=int, default=300)
    ap.add_argument("--rate", type=int, default=100, help="captured creates per second")
    ap.add_argument("--idle-seconds", type=int, default=20,
                    help="how long the connected fleet is watched idle (hellos only)")
    ap.add_argument("--edges-first", action="store_true",
                    help="run the edges at normal priority (by default they run under "
                         "SCHED_IDLE: at a real site each edge has its own machine, here they "
                         "share central's cores and would otherwise starve it)")
    ap.add_argument("--binary", default=str(bench.REPO / "target" / "release" / "syncgate"))
    opts = ap.parse_args()
    # Refuse a fleet the machine cannot hold rather than let the kernel pick
    # processes to kill.
    available = int(re.search(r"MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text()).group(1)) / 1024
    needed = (opts.edges + 1) * EDGE_MIB + 512
    if available < needed:
        print(f"error: {opts.edges:,} edges need about {needed / 1024:.1f} GiB of memory; "
              f"{available / 1024:.1f} GiB is available (--edges N for fewer)", file=sys.stderr)
        return 1
    edge_sched = [] if opts.edges_first else ["chrt", "--idle", "0"]
    work = Path(tempfile.mkdtemp(prefix="syncgate-fleet-"))
    (work / "edges").mkdir()
    env = dict(os.environ, SYNCGATE_LOG="info")
    up_port, ek_port, port, admin, broker = (bench.free_port() for _ in range(5))
    names = [f"site{i:04d}" for i in range(opts.edges)]
    late = "site-late"
    servers, edges = [], []
    try:
        servers.append(bench.Server(["nginx", "-c", str(bench.upstream_conf(work, up_port))], 0))
        servers.append(bench.Server(["nginx", "-c", str(bench.edge_keystone_conf(work, ek_port))], 0))
        for p in (up_port, ek_port):
            bench.wait_http(f"http://127.0.0.1:{p}/")
        central_log = open(work / "central.log", "w")
        central = subprocess.Popen(
            [opts.binary, "central", "--upstream", f"http://127.0.0.1:{up_port}",
             "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}",
             "--broker-listen", f"127.0.0.1:{broker}", "--insecure-plaintext-sync",
             "--edges", ",".join([*names, late]), "--log-format", "json",
             "--db", f"sqlite://{work}/central.db"],
            env=env, stdout=central_log, stderr=central_log)
        bench.wait_http(f"http://127.0.0.1:{admin}/readyz")
        base_rss = proc_status(central.pid, "VmRSS")
        edge_env = dict(env, OS_USERNAME="admin", OS_PASSWORD="bench", OS_PROJECT_NAME="admin",
                        OS_USER_DOMAIN_NAME="Default", OS_PROJECT_DOMAIN_NAME="Default")

        def start_edge(name):
            log = open(work / "edges" / f"{name}.log", "w")
            p = subprocess.Popen(
                [*edge_sched, opts.binary, "edge", "--id", name, "--broker", f"nats://127.0.0.1:{broker}",
                 "--upstream", f"http://127.0.0.1:{ek_port}",
                 "--admin-listen", "127.0.0.1:0", "--insecure-plaintext-sync",
                 "--log-format", "json", "--db", f"sqlite://{work}/edges/{name}.db"],
                env=edge_env, stdout=log, stderr=log)
            log.close()
            return p

        # The fleet registers.
        started = time.monotonic()
        for name in names:
            edges.append(start_edge(name))
        spawned = time.monotonic() - started

        def online():
            return sum(1 for r in edges_rows(admin) if r.get("online")) >= opts.edges

        if not wait("every edge online", online, timeout=600, every=1):
            gone = [(name, p.returncode) for name, p in zip(names, edges) if p.poll() is not None]
            print(f"{len(gone)} edge processes exited: {gone[:10]}", flush=True)
            for name, _ in gone[:3]:
                print((work / "edges" / f"{name}.log").read_text()[-2000:], flush=True)
            raise SystemExit("the fleet did not come online")
        registered = time.monotonic() - started
        # Connected and idle: hellos only.
        m0, c0, t0 = metrics(admin), cpu_seconds(central.pid), time.monotonic()
        time.sleep(opts.idle_seconds)
        m1, c1, t1 = metrics(admin), cpu_seconds(central.pid), time.monotonic()
        # Then the audit API, still idle (its own CPU is not counted above).
        idle_sampler = AuditSampler(admin, lambda: bench._last_seq(admin))
        idle_sampler.start()
        time.sleep(10)
        idle_sampler.stop.set()
        idle_sampler.join()
        idle = {"cpu": (c1 - c0) / (t1 - t0) * 100, "rss": proc_status(central.pid, "VmRSS"),
                "msgs_in": (m1["syncgate_broker_msgs_in_total"] - m0["syncgate_broker_msgs_in_total"]) / (t1 - t0),
                "msgs_out": (m1["syncgate_broker_msgs_out_total"] - m0["syncgate_broker_msgs_out_total"]) / (t1 - t0),
                "bytes_in": (m1["syncgate_broker_bytes_in_total"] - m0["syncgate_broker_bytes_in_total"]) / (t1 - t0)}
        # Captured creates at a steady rate while the audit API is read.
        first = bench._last_seq(admin) + 1
        sampler = AuditSampler(admin, lambda: bench._last_seq(admin))
        sampler.start()
        c2, t2, m2 = cpu_seconds(central.pid), time.monotonic(), metrics(admin)
        sent = bench.paced_writes(port, opts.rate, opts.writes / opts.rate)
        last = bench._last_seq(admin)

        def converged():
            return all((r.get("acked_through") or 0) >= last for r in edges_rows(admin) if r["id"] != late)

        wait("every edge acknowledged every op", converged, timeout=900, every=0.5)
        t3, c3, m3 = time.monotonic(), cpu_seconds(central.pid), metrics(admin)
        sampler.stop.set()
        sampler.join()
        busy = {"cpu": (c3 - c2) / (t3 - t2) * 100, "converged": t3 - t2,
                "msgs_in": (m3["syncgate_broker_msgs_in_total"] - m2["syncgate_broker_msgs_in_total"]) / (t3 - t2),
                "msgs_out": (m3["syncgate_broker_msgs_out_total"] - m2["syncgate_broker_msgs_out_total"]) / (t3 - t2),
                # Ops an edge missed on the stream (its client's buffer full,
                # or closed as a slow consumer) come again by replay.
                "replayed": m3.get("syncgate_ops_replayed_total", 0) - m2.get("syncgate_ops_replayed_total", 0),
                "slow": m3.get("syncgate_broker_slow_consumers_total", 0)
                - m2.get("syncgate_broker_slow_consumers_total", 0)}
        # Why edges asked for replays: reconnects, lapsed leases, gaps.
        causes = {"reconnects": 0, "lapses": 0, "gaps": 0}
        for name in names:
            text = (work / "edges" / f"{name}.log").read_text(errors="replace")
            causes["reconnects"] += max(0, text.count("connected to the broker; catching up") - 1)
            causes["lapses"] += text.count("after its lease lapsed")
            causes["gaps"] += text.count("ops missed on the stream")
        edge_rss = [proc_status(p.pid, "VmRSS") for p in edges]
        edge_rss = [r for r in edge_rss if r == r]
        edge_own = [own_memory(p.pid) for p in edges]
        edge_own = [m for m in edge_own if m[0] == m[0]]
        # One more edge registers and catches up with every op.
        late_admin = bench.free_port()
        log = open(work / "edges" / f"{late}.log", "w")
        joined = time.monotonic()
        edges.append(subprocess.Popen(
            [*edge_sched, opts.binary, "edge", "--id", late, "--broker", f"nats://127.0.0.1:{broker}",
             "--upstream", f"http://127.0.0.1:{ek_port}", "--admin-listen", f"127.0.0.1:{late_admin}",
             "--insecure-plaintext-sync", "--log-format", "json", "--db", f"sqlite://{work}/edges/{late}.db"],
            env=edge_env, stdout=log, stderr=log))
        log.close()
        wait("the late edge caught up", lambda: bench._edge_cursor(late_admin) >= last, timeout=300, every=0.1)
        late_took = time.monotonic() - joined
        peak = proc_status(central.pid, "VmHWM")
        # Lag: central's commit to each edge's apply.
        logged = bench.log_times(work / "central.log", "op logged")
        lags = []
        for name in names:
            applied = bench.log_times(work / "edges" / f"{name}.log", "op applied")
            lags += [(applied[q] - logged[q]) * 1000 for q in range(first, last + 1)
                     if q in logged and q in applied]
    finally:
        for p in edges:
            p.send_signal(signal.SIGTERM)
        for p in edges:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        if "central" in locals():
            central.send_signal(signal.SIGTERM)
            central.wait(timeout=60)
        for s in servers:
            s.stop()
    n = opts.edges
    pct = bench.percentile
    print()
    sched = "normal priority" if opts.edges_first else "SCHED_IDLE"
    print(f"fleet: {n:,} edge processes ({sched}) and one central on {os.cpu_count()} cores; "
          f"{sent} captured creates at {opts.rate}/s")
    print()
    print("| figure | value |")
    print("| --- | ---: |")
    print(f"| edges started (processes spawned) | {spawned:.1f} s |")
    print(f"| every edge online at central | {registered:.1f} s after the first start |")
    print(f"| central RSS before any edge | {base_rss:.1f} MiB |")
    print(f"| central RSS, {n:,} edges connected and idle | {idle['rss']:.1f} MiB "
          f"({(idle['rss'] - base_rss) * 1024 / n:.0f} KiB per edge) |")
    print(f"| central peak RSS (VmHWM, whole run) | {peak:.1f} MiB |")
    print(f"| central CPU, idle fleet ({opts.idle_seconds} s) | {idle['cpu']:.1f}% of one core |")
    print(f"| central CPU, writes until every edge acknowledged | {busy['cpu']:.1f}% of one core |")
    print(f"| broker traffic, idle fleet (hellos and answers) | {idle['msgs_in']:,.0f} msgs/s in, "
          f"{idle['msgs_out']:,.0f} msgs/s out, {idle['bytes_in'] / 1024:,.0f} KiB/s in |")
    print(f"| broker traffic, writes until every edge acknowledged | {busy['msgs_in']:,.0f} msgs/s in, "
          f"{busy['msgs_out']:,.0f} msgs/s out |")
    print(f"| ops replayed, edges closed as slow consumers, during the writes | "
          f"{busy['replayed']:,.0f}, {busy['slow']:,.0f} |")
    print(f"| edges' broker reconnects, lease lapses, stream gaps (whole run, all edges) | "
          f"{causes['reconnects']:,}, {causes['lapses']:,}, {causes['gaps']:,} |")
    print(f"| every edge acknowledged every op | {busy['converged']:.1f} s after the first write "
          f"(the writes take {opts.writes / opts.rate:.0f} s) |")
    print(f"| lag, central's commit to an edge's apply ({len(lags):,} applies) | "
          f"p50 {pct(lags, 50):.0f} ms, p99 {pct(lags, 99):.0f} ms |")
    for when, s in (("the fleet connected and idle", idle_sampler), ("during the writes", sampler)):
        for key, values in s.samples.items():
            if values:
                print(f"| audit API GET {key}, {when} ({len(values)} requests) | "
                      f"p50 {pct(values, 50):.1f} ms, p95 {pct(values, 95):.1f} ms |")
        if s.errors:
            print(f"| audit API errors, {when} | {s.errors} |")
    if edge_rss:
        print(f"| an edge's RSS (mean, max; mostly the binary's pages, shared) | "
              f"{sum(edge_rss) / len(edge_rss):.1f} MiB, {max(edge_rss):.1f} MiB |")
    if edge_own:
        private = [m[0] for m in edge_own]
        pss = [m[1] for m in edge_own]
        print(f"| an edge's own memory (private pages, mean, max) | {sum(private) / len(private):.1f} MiB, "
              f"{max(private):.1f} MiB |")
        print(f"| the fleet's memory (sum of PSS) | {sum(pss) / 1024:.2f} GiB |")
    print(f"| one more edge registers and applies all {last:,} ops | {late_took:.1f} s |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
