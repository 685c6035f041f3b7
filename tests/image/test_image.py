#!/usr/bin/env python3
"""The container image, built and run for real with podman: the Dockerfile is
linted (hadolint) and built from base images made from Debian packages
(tests/image/base-images.sh); the image then runs as central and as an edge
against a real Keystone, each exactly as the Helm chart's rendered StatefulSet
says (args, env, the ConfigMap's file and the Secrets' files at their mount
paths, user, read-only root, no capabilities). Checked: /healthz and /readyz, the image's HEALTHCHECK,
that the process is not root, that a write made through central reaches the
edge's state, and that SIGTERM stops each container cleanly within its grace
period. Prints `image: N passed, M failed`.

Usage: test_image.py   (SYNCGATE_IMAGE=name skips the build and tests that image)
"""

import os
import secrets
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "tests" / "e2e"))

sys.path.insert(0, str(REPO / "tests" / "helm"))

from chart import Workload, render  # noqa: E402
from harness import VENV_BIN, Keystone, free_port, http, log, wait_until  # noqa: E402

os.environ.setdefault("CONTAINERS_CONF", str(HERE / "containers.conf"))
IMAGE = os.environ.get("SYNCGATE_IMAGE") or "localhost/syncgate:test"
GRACE = 5
results = []


def podman(*args, check=True, capture=True):
    return subprocess.run(["podman", *args], check=check, text=True,
                          stdout=subprocess.PIPE if capture else None,
                          stderr=subprocess.PIPE if capture else None)


def step(name, fn, *args):
    t = time.monotonic()
    try:
        value = fn(*args)
        results.append((name, True))
        log(f"PASS {name} ({time.monotonic() - t:.1f}s)")
        return value
    except Exception:
        results.append((name, False))
        log(f"FAIL {name}")
        traceback.print_exc()
        return None


def lint():
    out = subprocess.run([str(VENV_BIN / "hadolint"), str(REPO / "Dockerfile")], text=True, capture_output=True)
    assert out.returncode == 0, out.stdout + out.stderr


def build():
    if os.environ.get("SYNCGATE_IMAGE"):
        return
    subprocess.run(["bash", str(HERE / "base-images.sh")], check=True)
    home = Path.home()
    out = podman(
        "build", "--format", "docker", "--network", "host",
        "--build-arg", "RUST_IMAGE=localhost/syncgate-build:bookworm",
        "--build-arg", "RUNTIME_IMAGE=localhost/syncgate-runtime:bookworm",
        # The toolchain and the crates already downloaded, where the rust image keeps them.
        "-v", f"{os.environ.get('RUSTUP_HOME', home / '.rustup')}:/usr/local/rustup:ro",
        "-v", f"{os.environ.get('CARGO_HOME', home / '.cargo')}:/usr/local/cargo",
        "-t", IMAGE, str(REPO), check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    health = podman("image", "inspect", IMAGE, "--format", "{{json .Config.Healthcheck}}").stdout
    assert "healthcheck" in health, health
    user = podman("image", "inspect", IMAGE, "--format", "{{.Config.User}}").stdout.strip()
    assert user and not user.startswith("0") and user != "root", user


class Container:
    """A container run exactly as a rendered StatefulSet says: its args, its
    env, its config and Secret files at their mount paths, its user, a read-only
    root filesystem, no capabilities, no privilege escalation."""

    def __init__(self, name, workload, workdir):
        self.name = name
        self.admin = None
        podman("rm", "-f", name, check=False)
        podman("volume", "rm", "-f", f"{name}-state", check=False)
        pod, sec = workload.pod_security, workload.security
        args = ["run", "-d", "--name", name, "--network", "host",
                "--user", f"{pod['runAsUser']}:{pod['runAsGroup']}", "--group-add", str(pod["fsGroup"])]
        if sec.get("readOnlyRootFilesystem"):
            args.append("--read-only")
        if sec.get("capabilities", {}).get("drop") == ["ALL"]:
            args += ["--cap-drop", "ALL"]
        if sec.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        for mount_path, host in workload.write_files(Path(workdir) / name).items():
            args += ["-v", f"{host}:{mount_path}:ro"]
        args += ["-v", f"{name}-state:{workload.mounts['state']['mountPath']}",
                 "--tmpfs", workload.mounts["tmp"]["mountPath"]]
        for k, v in workload.env.items():
            args += ["-e", f"{k}={v}"]
        podman(*args, IMAGE, *workload.args)

    def ready(self):
        wait_until(f"{self.name} ready", lambda: self.running() and http("GET", f"{self.admin}/readyz")[0] == 200,
                   timeout=60)

    def running(self):
        state = podman("inspect", self.name, "--format", "{{.State.Status}}").stdout.strip()
        if state != "running":
            raise AssertionError(f"{self.name} is {state}:\n{self.logs()}")
        return True

    def logs(self):
        out = podman("logs", self.name, check=False)
        return (out.stdout + out.stderr)[-4000:]

    def stop(self):
        """SIGTERM, then the seconds it took and the exit code."""
        t = time.monotonic()
        podman("stop", "-t", str(GRACE * 4), self.name)
        took = time.monotonic() - t
        code = int(podman("inspect", self.name, "--format", "{{.State.ExitCode}}").stdout.strip())
        return took, code

    def remove(self):
        podman("rm", "-f", self.name, check=False)
        podman("volume", "rm", "-f", f"{self.name}-state", check=False)


def run_both(workdir):
    ks = Keystone("image-ks", workdir, "image-admin-pw")
    ks.prepare()
    ks.start()
    key = subprocess.run(["podman", "run", "--rm", IMAGE, "keygen"], check=True, text=True,
                         capture_output=True).stdout.strip()
    token = secrets.token_urlsafe(24)
    store = {"sg-admin": {"token": token}, "sg-sync": {"key": key}, "ks-admin": {"password": "image-admin-pw"}}
    refs = {"adminToken": {"name": "sg-admin", "key": "token"}, "syncKey": {"name": "sg-sync", "key": "key"}}
    proxy, admin, broker, edge_admin = (free_port() for _ in range(4))
    # The releases an operator would install (ports free on this host; the
    # containers share its network).
    central_values = {
        "role": "central", "secrets": refs, "ports": {"proxy": proxy, "broker": broker, "admin": admin},
        "central": {"upstream": ks.url, "edges": ["edge1"]}, "config": {"shutdown_grace": f"{GRACE}s"}}
    edge_values = {
        "role": "edge", "secrets": refs, "ports": {"proxy": 5000, "broker": 4222, "admin": edge_admin},
        "edge": {"id": "edge1", "broker": f"nats://127.0.0.1:{broker}", "upstream": ks.url},
        "credentials": {"username": "admin", "projectName": "admin",
                        "secret": {"name": "ks-admin", "key": "password"}},
        "config": {"shutdown_grace": f"{GRACE}s", "hello_interval": "1s"}}
    central = Container("syncgate-test-central", Workload(render(central_values), store), workdir)
    central.admin = f"http://127.0.0.1:{admin}"
    edge = Container("syncgate-test-edge", Workload(render(edge_values), store), workdir)
    edge.admin = f"http://127.0.0.1:{edge_admin}"
    try:
        step("central from the chart's rendered StatefulSet runs from the image and is ready", central.ready)
        step("the edge from the chart's rendered StatefulSet runs from the image and is ready", edge.ready)

        def probes():
            for c in (central, edge):
                assert http("GET", f"{c.admin}/healthz")[0] == 200, c.name
                # The image's own HEALTHCHECK (the binary, no shell in the
                # image), finding the admin port in the configuration file.
                out = podman("healthcheck", "run", c.name, check=False)
                assert out.returncode == 0, (c.name, out.stdout, out.stderr)
                users = podman("top", c.name, "user", "huser").stdout.split()
                assert "root" not in users and "65532" in users, (c.name, users)
        step("/healthz, the HEALTHCHECK, and a non-root process", probes)

        def replicates():
            status, _, _ = http("POST", f"http://127.0.0.1:{proxy}/v3/groups",
                                {"group": {"name": "from-the-image"}}, ks.token())
            assert status == 201, status
            auth = {"Authorization": f"Bearer {token}"}
            assert http("GET", f"{central.admin}/v1/ops/1")[0] == 401, "the audit API needs the token"
            # One Keystone serves both sites here: the edge finds the group
            # there already and adopts it.
            wait_until("the group at the edge", lambda: (http(
                "GET", f"{central.admin}/v1/ops/1", headers=auth)[2] or {}).get("deliveries", [{}])[0].get(
                    "state") in ("applied", "adopted"), timeout=30)
        step("a write through central is applied by the edge", replicates)

        def sigterm():
            for c in (edge, central):
                took, code = c.stop()
                assert code == 0, (c.name, code, c.logs())
                assert took < GRACE + 3, (c.name, took)
        step(f"SIGTERM stops both within the grace period ({GRACE}s)", sigterm)
    finally:
        for c in (central, edge):
            if any(not ok for _, ok in results):
                print(f"--- {c.name} log\n{c.logs()}", flush=True)
            c.remove()
        ks.stop()


def main():
    workdir = tempfile.mkdtemp(prefix="syncgate-image-")
    step("hadolint passes the Dockerfile", lint)
    step("the image builds (multi-stage, from local Debian base images)", build)
    if results[-1][1]:
        run_both(workdir)
    passed = sum(ok for _, ok in results)
    print(f"image: {passed} passed, {len(results) - passed} failed", flush=True)
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
