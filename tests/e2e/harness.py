"""A local syncgate deployment for the end-to-end suite and the demo.

Real Keystones (PyPI `keystone`, SQLite, served by gunicorn with one worker and
one thread), `syncgate central` in front of the central one, one `syncgate edge`
in front of each edge Keystone, all on free loopback ports. Readiness is waited
for by polling, never by fixed sleeps.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"
# The older Keystone release an edge site runs in the mixed-release checks
# (scripts/venv.sh's ensure_keystone_venv prepares it).
OLDER_KEYSTONE = "28.1.0"


def keystone_bin(release=None):
    """Where Keystone's commands (keystone-manage, gunicorn) are: the suite's
    own release (.venv), or an older one (.venv-keystone-<release>)."""
    if release is None:
        return VENV_BIN
    path = REPO / f".venv-keystone-{release}" / "bin"
    if not (path / "keystone-manage").exists():
        raise RuntimeError(f"Keystone {release} not found in {path.parent}: "
                           f"run `source scripts/venv.sh && ensure_keystone_venv {release}`")
    return path


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(what, check, timeout=60.0, every=0.1):
    """Polls `check` until it returns a truthy value; fails after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        # A server not up yet answers with connection errors, a non-2xx or a
        # partial body; an assertion or a bug in `check` is not waited out.
        except (OSError, RuntimeError, ValueError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


def rfc3339_seconds(ts):
    """Unix seconds of an RFC 3339 time as Prometheus writes it (nanoseconds,
    `Z` or an offset)."""
    import re

    m = re.fullmatch(r"(.{19})(?:\.\d+)?(Z|[+-]\d\d:\d\d)", ts)
    assert m, f"not an RFC 3339 time: {ts!r}"
    zone = "+00:00" if m.group(2) == "Z" else m.group(2)
    return datetime.fromisoformat(m.group(1) + zone).timestamp()


class Pki:
    """A private CA and the certificates it issues (for localhost and
    127.0.0.1, server and client use), as PEM files in `workdir`: what
    cert-manager would put in a Secret."""

    def __init__(self, workdir):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self._x509, self._hashes, self._ser, self._ec, self._oid = x509, hashes, serialization, ec, NameOID
        self.dir = Path(workdir) / "pki"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "syncgate e2e CA")])
        self.cert = self._build(name, name, self.key.public_key(), self.key, ca=True)
        self.ca = self.dir / "ca.pem"
        self.ca.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def _build(self, subject, issuer, public, signer, ca=False):
        import datetime
        import ipaddress

        x509 = self._x509
        now = datetime.datetime.now(datetime.timezone.utc)
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public)
             .serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if ca:
            b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                              content_commitment=False, key_encipherment=False,
                                              data_encipherment=False, key_agreement=False, encipher_only=False,
                                              decipher_only=False), critical=True)
        else:
            b = b.add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            b = b.add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH,
                                                       x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        return b.sign(signer, self._hashes.SHA256())

    def issue(self, name):
        """(certificate path, key path) for `name`."""
        key = self._ec.generate_private_key(self._ec.SECP256R1())
        subject = self._x509.Name([self._x509.NameAttribute(self._oid.COMMON_NAME, name)])
        cert = self._build(subject, self.cert.subject, key.public_key(), self.key)
        crt, pem = self.dir / f"{name}.crt", self.dir / f"{name}.key"
        crt.write_bytes(cert.public_bytes(self._ser.Encoding.PEM))
        pem.write_bytes(key.private_bytes(self._ser.Encoding.PEM, self._ser.PrivateFormat.PKCS8,
                                          self._ser.NoEncryption()))
        pem.chmod(0o600)
        return str(crt), str(pem)

    def trust(self):
        """This process's HTTPS requests (urllib) trust the CA."""
        import ssl

        ctx = ssl.create_default_context(cafile=str(self.ca))
        urllib.request.install_opener(urllib.request.build_opener(urllib.request.HTTPSHandler(context=ctx)))


def http(method, url, body=None, token=None, headers=None):
    """One HTTP request; returns (status, headers, parsed JSON or None)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("X-Auth-Token", token)
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            raw = resp.read()
            return resp.status, resp.headers, (json.loads(raw) if raw else None)
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = None
        return e.code, e.headers, parsed


def get_json(url, token=None):
    status, _, body = http("GET", url, token=token)
    if status != 200:
        raise RuntimeError(f"GET {url}: HTTP {status}: {body}")
    return body


class Keystone:
    """A real Keystone on SQLite, bootstrapped with its own admin."""

    def __init__(self, name, workdir, admin_password, public_url=None, release=None, database=None):
        self.name = name
        # None: the suite's own release; else an older one (its own venv).
        self.release = release
        self.bin = keystone_bin(release)
        # An SQLAlchemy URL; None: SQLite in its directory.
        self.database = database
        self.dir = Path(workdir) / name
        self.admin_password = admin_password
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.public_url = public_url or self.url
        self.proc = None

    def prepare(self):
        """Writes config and runs db_sync, key setup and bootstrap (slow: seconds)."""
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        d = self.dir
        (d / "keystone.conf").write_text(
            f"""[DEFAULT]
debug = false
[database]
connection = {self.database or f"sqlite:///{d}/keystone.db"}
[fernet_tokens]
key_repository = {d}/fernet-keys
[fernet_receipts]
key_repository = {d}/fernet-receipts
[credential]
key_repository = {d}/credential-keys
"""
        )
        (d / "gunicorn.conf.py").write_text(
            f"""wsgi_app = "keystone.wsgi.api:application"
bind = "127.0.0.1:{self.port}"
workers = 1
threads = 1
raw_env = ["OS_KEYSTONE_CONFIG_FILES={d}/keystone.conf"]
"""
        )
        manage = [str(self.bin / "keystone-manage"), "--config-file", str(d / "keystone.conf")]
        env = dict(os.environ, OS_KEYSTONE_CONFIG_FILES=str(d / "keystone.conf"))
        user = ["--keystone-user", _user(), "--keystone-group", _group()]
        steps = [
            ["db_sync"],
            ["fernet_setup", *user],
            ["credential_setup", *user],
            [
                "bootstrap",
                "--bootstrap-password", self.admin_password,
                "--bootstrap-public-url", f"{self.public_url}/v3/",
                "--bootstrap-region-id", "RegionOne",
            ],
        ]
        with open(d / "manage.log", "w") as log:
            for step in steps:
                subprocess.run(manage + step, check=True, env=env, stdout=log, stderr=log)

    def start(self):
        log = open(self.dir / "gunicorn.log", "a")
        self.proc = subprocess.Popen(
            [str(self.bin / "gunicorn")], cwd=self.dir, stdout=log, stderr=log, start_new_session=True
        )
        wait_until(f"{self.name} keystone", lambda: http("GET", f"{self.url}/v3")[0] == 200)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        self.proc = None

    def admin_env(self, auth_url=None):
        return {
            "OS_AUTH_URL": (auth_url or self.url) + "/v3",
            "OS_IDENTITY_API_VERSION": "3",
            "OS_USERNAME": "admin",
            "OS_PASSWORD": self.admin_password,
            "OS_PROJECT_NAME": "admin",
            "OS_USER_DOMAIN_NAME": "Default",
            "OS_PROJECT_DOMAIN_NAME": "Default",
        }

    def token(self, user="admin", password=None, domain="Default", project="admin", project_domain="Default"):
        """A token for a user, or None when Keystone refuses."""
        body = {"auth": {"identity": {"methods": ["password"], "password": {"user": {
            "name": user, "domain": {"name": domain}, "password": password or self.admin_password}}}}}
        if project:
            body["auth"]["scope"] = {"project": {"name": project, "domain": {"name": project_domain}}}
        status, headers, _ = http("POST", f"{self.url}/v3/auth/tokens", body)
        return headers.get("X-Subject-Token") if status == 201 else None


def _user():
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def _group():
    import grp

    return grp.getgrgid(os.getgid()).gr_name


class Process:
    """A syncgate process with its log file."""

    def __init__(self, name, args, env, logdir):
        self.name = name
        self.args = args
        self.env = env
        self.log_path = Path(logdir) / f"{name}.log"
        self.proc = None

    def start(self):
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(self.args, env=self.env, stdout=log, stderr=log, start_new_session=True)

    def kill9(self):
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill9()


class HoldingProxy:
    """A TCP proxy in front of a Keystone that, when armed, holds the next
    request of a method for a while and then forwards it anyway: what a load
    balancer that answered 504, or a database lock wait, does while Keystone
    carries on. One request per connection (the upstream is asked to close)."""

    def __init__(self, upstream_port):
        import threading

        self.upstream_port = upstream_port
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.lock = threading.Lock()
        self.armed = None  # (method, seconds)
        self.held_done = 0
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", self.port))
        self.sock.listen(64)
        threading.Thread(target=self._accept, daemon=True).start()

    def hold_next(self, method, path, seconds):
        """Holds the next `method` request whose path starts with `path`."""
        with self.lock:
            self.armed = (method, path, seconds)

    def _accept(self):
        import threading

        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        try:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            length = 0
            kept = [lines[0]]
            for line in lines[1:]:
                name = line.split(b":", 1)[0].strip().lower()
                if name == b"content-length":
                    length = int(line.split(b":", 1)[1])
                if name not in (b"connection", b"keep-alive"):
                    kept.append(line)
            while len(body) < length:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                body += chunk
            kept.append(b"Connection: close")
            request = b"\r\n".join(kept) + b"\r\n\r\n" + body
            method, target = lines[0].split(b" ")[:2]
            held = False
            with self.lock:
                if self.armed and self.armed[0] == method.decode() and target.decode().startswith(self.armed[1]):
                    held, seconds = True, self.armed[2]
                    self.armed = None
            if held:
                time.sleep(seconds)
            up = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=60)
            up.sendall(request)
            answer = b""
            while True:
                chunk = up.recv(65536)
                if not chunk:
                    break
                answer += chunk
            up.close()
            if held:
                with self.lock:
                    self.held_done += 1
            try:
                conn.sendall(answer)
            except OSError:
                pass  # the client gave up on it long ago
        finally:
            conn.close()

    def stop(self):
        self.sock.close()


def release_binary(release):
    """syncgate as an earlier release built it (scripts/old-release.sh)."""
    var = "SYNCGATE_BIN_" + release.replace(".", "_")
    path = os.environ.get(var)
    if not path or not Path(path).exists():
        raise RuntimeError(f"release {release}'s binary not found (${var}): "
                           f"scripts/old-release.sh {release} builds it and prints its path")
    return path


def syncgate_binary():
    path = os.environ.get("SYNCGATE_BIN") or str(REPO / "target" / "debug" / "syncgate")
    if not Path(path).exists():
        raise RuntimeError(f"{path} not found: build it first (cargo build)")
    return path


class Deployment:
    """Central Keystone + gateway, and N edge Keystones + edge gateways."""

    def __init__(self, workdir, edges=("edge1",), ack_timeout="5s", external_broker=None, otlp=None,
                 initial_sync=False, keystone_releases=None, pki=None):
        # pki: a Pki: central's and the edges' listeners serve HTTPS with its
        # certificates, and they connect to the (external) broker over TLS
        # with client certificates it issued.
        self.pki = pki
        # keystone_releases: {edge: release} for edges whose Keystone is an
        # older release than central's.
        # otlp: (endpoint, protocol) to export traces to, or None.
        self.otlp = otlp
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.bin = syncgate_binary()
        self.key = subprocess.run([self.bin, "keygen"], check=True, capture_output=True, text=True).stdout.strip()
        # The key goes to the gateways in a file (0600), never on a command line.
        self.key_file = str(self.workdir / "sync.key")
        fd = os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.key + "\n")
        self.scheme = "https" if pki else "http"
        self.proxy_port = free_port()
        self.gateway = f"{self.scheme}://127.0.0.1:{self.proxy_port}"
        self.admin_port = free_port()
        self.admin = f"{self.scheme}://127.0.0.1:{self.admin_port}"
        self.broker_port = free_port()
        self.external_broker = external_broker
        self.broker_url = external_broker or f"nats://127.0.0.1:{self.broker_port}"
        self.ack_timeout = ack_timeout
        self.initial_sync = initial_sync
        # The catalog's public endpoint is the gateway, so the CLI stays on it.
        self.central_ks = Keystone("central", self.workdir, "central-admin-pw", public_url=self.gateway)
        releases = keystone_releases or {}
        # An older release runs on PostgreSQL: on SQLite, 28.1.0 answers 500
        # "database is locked" to role and group creates, whoever sends them.
        self.keystone_pg = Postgres().start() if releases else None
        self.edge_ks = {}
        for e in edges:
            database = None
            if releases.get(e):
                database = self.keystone_pg.database(f"keystone_{e}", driver="postgresql+psycopg2")
            self.edge_ks[e] = Keystone(e, self.workdir, f"{e}-admin-pw", release=releases.get(e), database=database)
        self.edges = {}
        self.central = None
        # Where the op log lives (a test may move it to a small filesystem).
        self.central_db = f"sqlite://{self.workdir}/central.db"
        # Extra arguments for central (a test may shorten a bound).
        self.central_args = []
        # Extra arguments and upstream per edge (a test may put a proxy in front).
        self.edge_args = {}
        self.edge_upstream = {}
        # Another build of syncgate for central or an edge (an earlier
        # release, for the mixed-release case).
        self.central_bin = None
        self.edge_bin = {}
        self.cleanups = []

    def prepare_keystones(self):
        """Bootstraps every Keystone in parallel, then starts them."""
        import concurrent.futures

        all_ks = [self.central_ks, *self.edge_ks.values()]
        with concurrent.futures.ThreadPoolExecutor(len(all_ks)) as pool:
            list(pool.map(lambda k: k.prepare(), all_ks))
        for k in all_ks:
            k.start()

    def central_process(self, name="central", proxy_port=None, admin_port=None):
        """Central, on its ports (a replica among several: on ports of its own)."""
        args = [
            self.central_bin or self.bin, "central",
            "--upstream", self.central_ks.url,
            "--listen", f"127.0.0.1:{proxy_port or self.proxy_port}",
            "--admin-listen", f"127.0.0.1:{admin_port or self.admin_port}",
            "--db", self.central_db,
            "--sync-key-file", self.key_file,
            "--edges", ",".join(self.edge_ks),
            "--ack-timeout", self.ack_timeout,
        ]
        if self.pki:
            crt, key = self.pki.issue("central")
            client_crt, client_key = self.pki.issue("central-client")
            args += ["--tls-cert", crt, "--tls-key", key, "--broker-ca", str(self.pki.ca),
                     "--broker-client-cert", client_crt, "--broker-client-key", client_key]
        args += self.central_args
        if self.external_broker:
            args += ["--broker", self.external_broker]
        else:
            args += ["--broker-listen", f"127.0.0.1:{self.broker_port}"]
        env = dict(os.environ, **self.central_ks.admin_env(), **self.otlp_env())
        return Process(name, args, env, self.workdir)

    def otlp_env(self, **extra):
        """The standard OpenTelemetry variables, when traces are exported."""
        if not self.otlp:
            return {}
        endpoint, protocol = self.otlp
        # Export within a fraction of a second (the batch default is 5 s).
        return dict(OTEL_EXPORTER_OTLP_ENDPOINT=endpoint, OTEL_EXPORTER_OTLP_PROTOCOL=protocol,
                    OTEL_BSP_SCHEDULE_DELAY="100", **extra)

    def edge_process(self, name):
        ks = self.edge_ks[name]
        admin_port = free_port()
        args = [
            self.edge_bin.get(name, self.bin), "edge",
            "--id", name,
            "--broker", self.broker_url,
            "--upstream", self.edge_upstream.get(name, ks.url),
            "--db", f"sqlite://{self.workdir}/{name}.db",
            "--admin-listen", f"127.0.0.1:{admin_port}",
            "--sync-key-file", self.key_file,
            "--hello-interval", "1s",
        ]
        if self.initial_sync:
            args.append("--initial-sync")
        if self.pki:
            crt, key = self.pki.issue(name)
            client_crt, client_key = self.pki.issue(f"{name}-client")
            args += ["--tls-cert", crt, "--tls-key", key, "--broker-ca", str(self.pki.ca),
                     "--broker-tls-cert", client_crt, "--broker-tls-key", client_key]
        args += self.edge_args.get(name, [])
        # The edges name their service themselves, and their site as a resource attribute.
        env = dict(os.environ, **ks.admin_env(),
                   **self.otlp_env(OTEL_SERVICE_NAME="syncgate-edge-site", OTEL_RESOURCE_ATTRIBUTES=f"site={name}"))
        p = Process(name, args, env, self.workdir)
        p.admin = f"{self.scheme}://127.0.0.1:{admin_port}"
        return p

    def start_central(self):
        self.central = self.central_process()
        self.central.start()
        wait_until("central gateway", lambda: http("GET", f"{self.admin}/readyz")[0] == 200)

    def start_edge(self, name, ready=True):
        """Starts an edge; waits until it is ready, or (`ready` false: one
        that is not to be, such as an edge newer than its central) alive."""
        p = self.edge_process(name)
        p.start()
        probe = "readyz" if ready else "healthz"
        wait_until(f"edge {name}", lambda: http("GET", f"{p.admin}/{probe}")[0] == 200)
        self.edges[name] = p

    def start(self):
        self.prepare_keystones()
        self.start_central()
        for name in self.edge_ks:
            self.start_edge(name)

    def stop(self):
        for p in self.edges.values():
            p.stop()
        if self.central:
            self.central.stop()
        for k in [self.central_ks, *self.edge_ks.values()]:
            k.stop()
        if self.keystone_pg:
            self.keystone_pg.stop()
        for cleanup in reversed(self.cleanups):
            cleanup()

    # --- driving and observing -------------------------------------------------

    def cli(self, *args, env_extra=None, check=True):
        """Runs the openstack CLI against the gateway as the central admin
        (with the CA as --os-cacert when the gateway serves HTTPS)."""
        env = dict(os.environ, **self.central_ks.admin_env(self.gateway))
        env.update(env_extra or {})
        tls = ["--os-cacert", str(self.pki.ca)] if self.pki else []
        r = subprocess.run([str(VENV_BIN / "openstack"), *tls, *args], env=env, capture_output=True, text=True)
        if check and r.returncode != 0:
            raise RuntimeError(f"openstack {' '.join(args)}: {r.stderr.strip()}")
        return r.stdout.strip()

    def audit(self, path):
        return get_json(f"{self.admin}{path}")

    def ops(self):
        ops, after = [], 0
        while True:
            page = self.audit(f"/v1/ops?after={after}&limit=1000")
            ops += page["ops"]
            if page["next"] is None:
                return ops
            after = page["next"]

    def delivery_states(self):
        """{(seq, edge): state} for every op."""
        states = {}
        for op in self.ops():
            detail = self.audit(f"/v1/ops/{op['seq']}")
            for d in detail["deliveries"]:
                states[(op["seq"], d["edge"])] = d["state"]
        return states

    def wait_delivered(self, states=("applied", "adopted"), edges=None, timeout=120, after=0):
        """Waits until every op after seq `after` is in one of `states` at `edges`."""
        edges = list(edges or self.edge_ks)

        def done():
            ops = [op for op in self.ops() if op["seq"] > after]
            got = self.delivery_states()
            # A write the op log could not record yet is not an op yet.
            if self.audit("/v1/out-of-sync").get("unlogged_writes", 0):
                return False
            return all(got.get((op["seq"], e)) in states for op in ops for e in edges)

        wait_until(f"every op {'/'.join(states)} at {', '.join(edges)}", done, timeout=timeout, every=0.5)


# Fields that may differ between two sites holding the same entity, and why.
# Everything else every replicated entity has is compared, with references
# named (README, "What an edge holds"; the drift audit leaves out the same).
MAY_DIFFER = {
    "id": "Keystone makes most IDs itself at each site (the edge maps central's to its own); "
          "references are compared by what they name",
    "links": "each site's own URLs",
    "password_expires_at": "derived from when the password was set at that site",
    "is_domain": "the projects API lists no project acting as a domain; the domain API shows it",
    "federated": "a federated user's links are made at each site by its logins there",
}


def snapshot(ks):
    """A Keystone's identity data, whole entity by whole entity: every field
    but MAY_DIFFER's, references named, one line per entity, comparable
    across sites."""
    token = ks.token()
    base = f"{ks.url}/v3"

    def items(path, key):
        return get_json(f"{base}{path}", token)[key]

    domains = {d["id"]: d for d in items("/domains", "domains")}
    projects = {p["id"]: p for p in items("/projects", "projects")}
    users = {u["id"]: u for u in items("/users", "users")}
    groups = {g["id"]: g for g in items("/groups", "groups")}
    roles = {r["id"]: r for r in items("/roles", "roles")}
    for d in domains:
        roles.update({r["id"]: r for r in items(f"/roles?domain_id={d}", "roles")})
    services = {s["id"]: f"{s['type']}/{s['name']}" for s in items("/services", "services")}

    def named(table, id_, key):
        return key(table[id_]) if id_ in table else f"?{id_}"

    def dn(i):
        return named(domains, i, lambda d: d["name"])

    def pn(i):
        return named(projects, i, lambda p: f"{dn(p['domain_id'])}/{p['name']}")

    def un(i):
        return named(users, i, lambda u: f"{dn(u['domain_id'])}/{u['name']}")

    def gn(i):
        return named(groups, i, lambda g: f"{dn(g['domain_id'])}/{g['name']}")

    def rn(i):
        return named(roles, i, lambda r: f"{dn(r['domain_id'])}/{r['name']}" if r.get("domain_id") else r["name"])

    def sn(i):
        return services.get(i, f"?{i}")

    out = set()

    def add(kind, key, raw, refs=None, drop=()):
        fields = {}
        for k, v in raw.items():
            if k in MAY_DIFFER or k in drop or v is None:
                continue
            if refs and k in refs:
                v = refs[k](v)
            elif k in ("tags", "remote_ids") and isinstance(v, list):
                v = sorted(v)
            fields[k] = v
        out.add(f"{kind} {key} {json.dumps(fields, sort_keys=True)}")

    for i, d in domains.items():
        add("domain", d["name"], d)
        status, _, config = http("GET", f"{base}/domains/{i}/config", token=token)
        if status == 200:
            add("domain_config", d["name"], config["config"])
    for i, p in projects.items():
        drop = ("parent_id",) if p.get("parent_id") == p.get("domain_id") else ()
        add("project", pn(i), p, {"domain_id": dn, "parent_id": pn}, drop)
    for i, u in users.items():
        add("user", un(i), u, {"domain_id": dn, "default_project_id": pn})
    for i, g in groups.items():
        add("group", gn(i), g, {"domain_id": dn})
        for u in items(f"/groups/{i}/users", "users"):
            out.add(f"membership {un(u['id'])} in {gn(i)}")
    for i, r in roles.items():
        add("role", rn(i), r, {"domain_id": dn})
    for inf in items("/role_inferences", "role_inferences"):
        for implied in inf["implies"]:
            out.add(f"implied_role {rn(inf['prior_role']['id'])} -> {rn(implied['id'])}")
    for a in items("/role_assignments", "role_assignments"):
        actor = f"user {un(a['user']['id'])}" if "user" in a else f"group {gn(a['group']['id'])}"
        scope = a["scope"]
        if "project" in scope:
            target = f"project {pn(scope['project']['id'])}"
        elif "domain" in scope:
            target = f"domain {dn(scope['domain']['id'])}"
        else:
            target = "system"
        inherited = " inherited" if "OS-INHERIT:inherited_to" in scope else ""
        out.add(f"assignment {rn(a['role']['id'])} to {actor} on {target}{inherited}")
    for p in items("/policies", "policies"):
        add("policy", f"{p['type']} {p['blob']}", p)
    for c in items("/credentials", "credentials"):
        add("credential", f"{un(c['user_id'])} {c['type']} {c['blob']}", c,
            {"user_id": un, "project_id": pn})
    for r in items("/registered_limits", "registered_limits"):
        add("registered_limit", f"{sn(r['service_id'])} {r.get('region_id')} {r['resource_name']}", r,
            {"service_id": sn})
    for x in items("/limits", "limits"):
        owner = f"project {pn(x['project_id'])}" if x.get("project_id") else f"domain {dn(x.get('domain_id'))}"
        add("limit", f"{sn(x['service_id'])} {x.get('region_id')} {x['resource_name']} {owner}", x,
            {"service_id": sn, "project_id": pn, "domain_id": dn})
    fed = "/OS-FEDERATION"
    for i in items(f"{fed}/identity_providers", "identity_providers"):
        add("identity_provider", i["id"], i, {"domain_id": dn})
        for p in items(f"{fed}/identity_providers/{i['id']}/protocols", "protocols"):
            add("protocol", f"{i['id']}/{p['id']}", p)
    for m in items(f"{fed}/mappings", "mappings"):
        add("mapping", m["id"], m)
    for sp in items(f"{fed}/service_providers", "service_providers"):
        add("service_provider", sp["id"], sp)
    return out


def diff(central, edge):
    missing = sorted(central - edge)
    extra = sorted(edge - central)
    return missing, extra


def log(msg):
    print(msg, flush=True, file=sys.stderr)


class Postgres:
    """A private PostgreSQL server (Debian's postgresql): in a temporary
    directory, on a free loopback port, as nobody when run as root (PostgreSQL
    refuses root)."""

    def __init__(self):
        import tempfile

        # Its own directory under the system's temporary one, which the
        # server's user can reach (a test's working directory may be private).
        self.dir = Path(tempfile.mkdtemp(prefix="syncgate-pg-"))
        versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
        if not versions:
            raise RuntimeError("PostgreSQL's server programs not found (apt-get install postgresql)")
        self.bin = versions[-1].parent
        self.as_nobody = os.geteuid() == 0
        if self.as_nobody:
            subprocess.run(["chown", "-R", "nobody", str(self.dir)], check=True)
        self.port = free_port()
        self.url = f"postgres://syncgate@127.0.0.1:{self.port}"

    def _run(self, program, *args):
        cmd = [str(self.bin / program), *args]
        if self.as_nobody:
            cmd = ["runuser", "-u", "nobody", "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True)

    def start(self):
        data = str(self.dir / "data")
        self._run("initdb", "-D", data, "-U", "syncgate", "--auth=trust", "--no-sync", "--locale=C", "-E", "UTF8")
        self._run("pg_ctl", "-D", data, "-l", str(self.dir / "server.log"), "-w", "-o",
                  f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1", "start")
        return self

    def database(self, name, driver="postgresql"):
        """Makes database `name`; its URL with `driver` as the scheme."""
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "syncgate", name)
        return f"{driver}://syncgate@127.0.0.1:{self.port}/{name}"

    def stop(self):
        subprocess.run((["runuser", "-u", "nobody", "--"] if self.as_nobody else [])
                       + [str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


class Prometheus:
    """Debian's Prometheus scraping central's admin listener (job `syncgate`)
    and any edges' (`edges`, job `syncgate-edge`) every second and evaluating
    syncgate's alert rules (monitoring/syncgate-rules.yaml) every second, the
    `for:` of the alerts named in `hold` set as given (the defaults are
    minutes)."""

    def __init__(self, workdir, targets, hold=None, edges=()):
        import yaml

        self.dir = Path(workdir) / "prometheus"
        self.dir.mkdir(parents=True, exist_ok=True)
        rules = yaml.safe_load((REPO / "monitoring" / "syncgate-rules.yaml").read_text())
        for rule in rules["groups"][0]["rules"]:
            if rule["alert"] in (hold or {}):
                rule["for"] = hold[rule["alert"]]
        (self.dir / "rules.yaml").write_text(yaml.safe_dump(rules))
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(self.dir / "rules.yaml")],
            "scrape_configs": [{"job_name": "syncgate", "static_configs": [{"targets": targets}]}]
            + ([{"job_name": "syncgate-edge", "static_configs": [{"targets": list(edges)}]}] if edges else []),
        }))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self):
        binary = shutil.which("prometheus")
        if not binary:
            raise RuntimeError("prometheus not found (apt-get install prometheus)")
        log = open(self.dir / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={self.dir / 'prometheus.yml'}", f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=log, stderr=log, start_new_session=True)
        # /-/ready answers plain text: its status is what tells.
        wait_until("prometheus ready", lambda: urllib.request.urlopen(f"{self.url}/-/ready", timeout=5).status == 200)
        return self

    def alerts(self, name):
        """The alerts called `name` Prometheus has now: [(state, labels)]."""
        body = get_json(f"{self.url}/api/v1/alerts")
        return [(a["state"], a["labels"]) for a in body["data"]["alerts"] if a["labels"]["alertname"] == name]

    def evaluated_after(self, t):
        """Whether the rules were evaluated after `t` (Unix seconds)."""
        groups = get_json(f"{self.url}/api/v1/rules")["data"]["groups"]
        last = groups[0]["lastEvaluation"] if groups else ""
        if not last or last.startswith("0001"):
            return False
        # RFC 3339 with nanoseconds: seconds are enough here.
        return rfc3339_seconds(last) > t

    def query(self, q):
        import urllib.parse

        body = get_json(f"{self.url}/api/v1/query?query={urllib.parse.quote(q)}")
        assert body["status"] == "success", body
        assert not body.get("warnings"), (q, body["warnings"])
        return body["data"]["result"]

    def scraped_since(self, t, jobs):
        """Whether every target of `jobs` was scraped (and up) after `t`
        (Unix seconds, compared as Prometheus' own sample timestamps)."""
        targets = get_json(f"{self.url}/api/v1/targets")["data"]["activeTargets"]
        want = sum(1 for x in targets if x["labels"]["job"] in jobs)
        selector = "|".join(jobs)
        ups = self.query(f'timestamp(up{{job=~"{selector}"}} == 1)')
        return want > 0 and len(ups) == want and all(float(r["value"][1]) > t for r in ups)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        self.proc = None


class HAProxy:
    """Debian's HAProxy in front of central's replicas: round robin, each
    replica health-checked on its admin port's /readyz."""

    def __init__(self, workdir, port, replicas):
        # replicas: [(proxy port, admin port)]
        self.config = Path(workdir) / "haproxy.cfg"
        servers = "\n".join(
            f"    server r{i} 127.0.0.1:{proxy} check port {admin} inter 500ms fall 2 rise 1"
            for i, (proxy, admin) in enumerate(replicas))
        self.config.write_text(f"""global
    maxconn 256
defaults
    mode http
    timeout connect 2s
    timeout client 60s
    timeout server 60s
frontend keystone
    bind 127.0.0.1:{port}
    default_backend central
backend central
    balance roundrobin
    option httpchk GET /readyz
{servers}
""")
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(["haproxy", "-db", "-f", str(self.config)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self):
        if self.proc:
            self.proc.terminate()
            self.proc.wait(timeout=30)
