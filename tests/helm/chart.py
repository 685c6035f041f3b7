"""The Helm chart rendered with Helm's own engine (helm-python-sdk), and what a
rendered release asks of a container: shared by the chart test and the image
test (which runs the image exactly as a rendered StatefulSet says)."""

from pathlib import Path

import helm_python as helm
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "syncgate"


def render(values, name="sg", namespace="identity"):
    """Every rendered manifest, as parsed documents (comments and empty files dropped)."""
    with helm.Chart.load(str(CHART)) as chart:
        out = chart.render(values, name=name, namespace=namespace)
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                docs.append((path, doc))
    return docs


def notes(values, name="sg", namespace="identity"):
    with helm.Chart.load(str(CHART)) as chart:
        out = chart.render(values, name=name, namespace=namespace)
    return next(text for path, text in out.items() if path.endswith("NOTES.txt"))


def kind(docs, k):
    return [d for _, d in docs if d["kind"] == k]


class Workload:
    """What the rendered StatefulSet's container is given: args, env, and the
    files of its volumes (config from the ConfigMap, secrets from the projected
    Secrets)."""

    def __init__(self, docs, secrets):
        [sts] = kind(docs, "StatefulSet")
        # The configuration's (not the dashboard's, when enabled).
        [cm] = [c for c in kind(docs, "ConfigMap") if not c["metadata"]["name"].endswith("-dashboard")]
        self.statefulset = sts
        pod = sts["spec"]["template"]["spec"]
        [self.container] = pod["containers"]
        self.args = self.container["args"]
        # Values as given; those the pod fills in (downward API) as Kubernetes
        # would for its first pod.
        pod_name = f"{sts['metadata']['name']}-0"
        self.env = {}
        for e in self.container.get("env", []):
            if "value" in e:
                self.env[e["name"]] = e["value"].replace("$(POD_NAME)", pod_name)
            elif e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name":
                self.env[e["name"]] = pod_name
            else:
                raise AssertionError(f"an env var the test cannot fill in: {e}")
        self.mounts = {m["name"]: m for m in self.container["volumeMounts"]}
        self.volumes = {v["name"]: v for v in pod["volumes"]}
        self.pod_security = pod["securityContext"]
        self.security = self.container["securityContext"]
        self.config = cm["data"]
        self.secrets = secrets

    def files(self):
        """(mount path, {file name: content}) of the config and secret volumes."""
        out = []
        for name, mount in self.mounts.items():
            vol = self.volumes.get(name)
            if vol is None:
                continue
            if "configMap" in vol:
                out.append((mount["mountPath"], dict(self.config)))
            elif "projected" in vol:
                files = {}
                for src in vol["projected"]["sources"]:
                    secret = src["secret"]
                    for item in secret["items"]:
                        files[item["path"]] = self.secrets[secret["name"]][item["key"]]
                out.append((mount["mountPath"], files))
        return out

    def write_files(self, root):
        """Writes the volumes' files under root (mount path inside); returns
        {mount path: host directory}."""
        dirs = {}
        for mount_path, files in self.files():
            host = Path(root) / mount_path.strip("/")
            host.mkdir(parents=True, exist_ok=True)
            for fname, content in files.items():
                (host / fname).parent.mkdir(parents=True, exist_ok=True)
                (host / fname).write_text(content)
                (host / fname).chmod(0o644)
            dirs[mount_path] = host
        return dirs
