#!/usr/bin/env python3
"""The container image, built and run for real with podman: the Dockerfile is
linted (hadolint) and built from base images made from Debian packages
(tests/image/base-images.sh); the image then runs as central and as an edge
against a real Keystone. Checked: /healthz and /readyz, the image's HEALTHCHECK,
that the process is not root, that a write made through central reaches the
edge's state, and that SIGTERM stops each container cleanly within its grace
period. Prints `image: N passed, M failed`.

Usage: test_image.py   (SYNCGATE_IMAGE=name skips the build and tests that image)
"""

import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "tests" / "e2e"))

from harness import VENV_BIN, Keystone, free_port, http, log, wait_until  # noqa: E402

os.environ.setdefault("CONTAINERS_CONF", str(HERE / "containers.conf"))
IMAGE = os.environ.get("SYNCGATE_IMAGE", "localhost/syncgate:test")
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
    if "SYNCGATE_IMAGE" in os.environ:
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
    def __init__(self, name, role, env, admin_port, files=()):
        self.name = name
        self.admin = f"http://127.0.0.1:{admin_port}"
        podman("rm", "-f", name, check=False)
        podman("volume", "rm", "-f", f"{name}-state", check=False)
        args = ["run", "-d", "--name", name, "--network", "host", "-v", f"{name}-state:/var/lib/syncgate"]
        for host, inside in files:
            args += ["-v", f"{host}:{inside}:ro"]
        for k, v in env.items():
            args += ["-e", f"{k}={v}"]
        podman(*args, IMAGE, role)

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
    key_file = Path(workdir) / "sync.key"
    key_file.write_text(key + "\n")
    key_file.chmod(0o644)  # read by the container's non-root user
    proxy, admin, broker, edge_admin = (free_port() for _ in range(4))
    grace = {"SYNCGATE_SHUTDOWN_GRACE": f"{GRACE}s"}
    central = Container("syncgate-test-central", "central", dict(
        SYNCGATE_UPSTREAM=ks.url, SYNCGATE_LISTEN=f"127.0.0.1:{proxy}", SYNCGATE_ADMIN_LISTEN=f"127.0.0.1:{admin}",
        SYNCGATE_BROKER_LISTEN=f"127.0.0.1:{broker}", SYNCGATE_SYNC_KEY_FILE="/run/secrets/sync.key",
        SYNCGATE_EDGES="edge1", **grace), admin, files=[(key_file, "/run/secrets/sync.key")])
    edge = Container("syncgate-test-edge", "edge", dict(
        SYNCGATE_EDGE_ID="edge1", SYNCGATE_BROKER=f"nats://127.0.0.1:{broker}", SYNCGATE_UPSTREAM=ks.url,
        SYNCGATE_ADMIN_LISTEN=f"127.0.0.1:{edge_admin}", SYNCGATE_SYNC_KEY_FILE="/run/secrets/sync.key",
        **ks.admin_env(), **grace), edge_admin, files=[(key_file, "/run/secrets/sync.key")])
    try:
        step("central runs from the image and is ready", central.ready)
        step("the edge runs from the image and is ready", edge.ready)

        def probes():
            for c in (central, edge):
                assert http("GET", f"{c.admin}/healthz")[0] == 200, c.name
                # The image's own HEALTHCHECK (the binary, no shell in the image).
                out = podman("healthcheck", "run", c.name, check=False)
                assert out.returncode == 0, (c.name, out.stdout, out.stderr)
                users = podman("top", c.name, "user", "huser").stdout.split()
                assert "root" not in users and "65532" in users, (c.name, users)
        step("/healthz, the HEALTHCHECK, and a non-root process", probes)

        def replicates():
            token = ks.token()
            status, _, _ = http("POST", f"http://127.0.0.1:{proxy}/v3/groups",
                                {"group": {"name": "from-the-image"}}, token)
            assert status == 201, status
            # One Keystone serves both sites here: the edge finds the group
            # there already and adopts it.
            wait_until("the group at the edge", lambda: (http(
                "GET", f"http://127.0.0.1:{admin}/v1/ops/1")[2] or {}).get("deliveries", [{}])[0].get(
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
