#!/usr/bin/env python3
"""The demo: two real Keystones, syncgate central in front of one and an edge in
front of the other, a short scenario through the gateway, the audit view, then
everything left running until Ctrl-C."""

import signal
import sys
import tempfile
import time

from harness import Deployment, log

SCENARIO = [
    ("domain", "create", "demo"),
    ("project", "create", "demo-web", "--domain", "demo", "--description", "created at central"),
    ("user", "create", "dana", "--domain", "demo", "--password", "dana-pw", "--project", "demo-web",
     "--project-domain", "demo"),
    ("role", "add", "--user", "dana", "--user-domain", "demo", "--project", "demo-web", "--project-domain", "demo",
     "member"),
]


def main():
    workdir = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="syncgate-demo-")
    dep = Deployment(workdir, edges=("edge1",), ack_timeout="30s")
    stop = []
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        log("starting two Keystones, syncgate central and syncgate edge ...")
        dep.start()
        for args in SCENARIO:
            log("$ openstack " + " ".join(args))
            dep.cli(*args)
        dep.wait_delivered()
        print("\nAudit view (central admin API): every op and its state at the edge\n")
        print(f"{'seq':>4}  {'method':6}  {'kind':18}  {'edge1':8}  path")
        for op in dep.ops():
            detail = dep.audit(f"/v1/ops/{op['seq']}")
            states = {d["edge"]: d["state"] for d in detail["deliveries"]}
            print(f"{op['seq']:>4}  {op['method']:6}  {op['kind']:18}  {states.get('edge1', '-'):8}  {op['path']}")
        edge = dep.edges["edge1"]
        ks = dep.edge_ks["edge1"]
        print(f"""
Running (logs and data in {workdir}):
  gateway (central Keystone API)  {dep.gateway}/v3   admin / {dep.central_ks.admin_password}
  central Keystone (direct)       {dep.central_ks.url}/v3
  central audit API               {dep.admin}/v1/ops  {dep.admin}/v1/edges  {dep.admin}/v1/out-of-sync
  edge Keystone                   {ks.url}/v3   admin / {ks.admin_password}
  edge status                     {edge.admin}/v1/status
  broker                          {dep.broker_url}

Try it:
  export OS_AUTH_URL={dep.gateway}/v3 OS_USERNAME=admin OS_PASSWORD={dep.central_ks.admin_password} \\
         OS_PROJECT_NAME=admin OS_USER_DOMAIN_NAME=Default OS_PROJECT_DOMAIN_NAME=Default
  .venv/bin/openstack project create hello
  curl -s {dep.admin}/v1/ops | python3 -m json.tool
  OS_AUTH_URL={ks.url}/v3 OS_PASSWORD={ks.admin_password} .venv/bin/openstack project list

Ctrl-C stops everything.""", flush=True)
        while not stop:
            time.sleep(0.5)
    finally:
        log("stopping ...")
        dep.stop()
        log("stopped")


if __name__ == "__main__":
    main()
