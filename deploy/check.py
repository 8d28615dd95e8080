#!/usr/bin/env python3
"""Checks the deployment files: the Kubernetes manifests against the
Kubernetes API schemas (kubernetes-validate --strict), the compose file
against the Compose specification (check-jsonschema's vendored schema), and
every environment variable they give a Nexus container against the settings
that part reads (`nexus <part> --help`, plus the keys read from the
environment only). A misspelt variable would otherwise be ignored silently.

    python3 deploy/check.py --nexus target/debug/nexus
"""

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys

try:
    import yaml
except ImportError:  # reported in main()
    yaml = None

HERE = os.path.dirname(os.path.abspath(__file__))

# Read from the environment only, never from flags (so not in --help).
ENV_ONLY = {
    "broker": {"ENCRYPTION_KEY", "ENCRYPTION_KEYS", "STATE_KEY", "API_KEY", "GATEWAY_API_KEY", "WEBHOOK_SECRET"},
    "migrate": {"ENCRYPTION_KEY", "ENCRYPTION_KEYS", "STATE_KEY", "API_KEY", "GATEWAY_API_KEY", "WEBHOOK_SECRET"},
    "gateway": {"BROKER_API_KEY"},
    "sidecar": {"AGENT_KEY"},
}


def settings_of(nexus, part):
    out = subprocess.run([nexus, part, "--help"], capture_output=True, text=True, check=True).stdout
    return set(re.findall(r"\[env: ([A-Z0-9_]+)", out)) | ENV_ONLY[part]


def kubernetes_envs(docs):
    """(file, container, part, names) for each Nexus container."""
    config_maps = {d["metadata"]["name"]: set(d.get("data", {})) for d in docs
                   if d and d.get("kind") == "ConfigMap"}
    for d in docs:
        if not d:
            continue
        spec = d.get("spec", {})
        pod = spec.get("template", {}).get("spec") if "template" in spec else (spec if d.get("kind") == "Pod" else None)
        if pod is None and d.get("kind") == "Job":
            pod = spec["template"]["spec"]
        if not pod:
            continue
        for c in pod.get("containers", []) + pod.get("initContainers", []):
            args = c.get("args") or []
            if not args or args[0] not in ENV_ONLY:
                continue
            names = {e["name"] for e in c.get("env", [])}
            for src in c.get("envFrom", []):
                ref = src.get("configMapRef")
                if ref:
                    names |= config_maps.get(ref["name"], set())
            yield f'{d["kind"]}/{d["metadata"]["name"]}', c["name"], args[0], names


def compose_envs(doc):
    for name, svc in doc.get("services", {}).items():
        cmd = svc.get("command") or []
        if not cmd or cmd[0] not in ENV_ONLY:
            continue
        env = svc.get("environment") or {}
        names = set(env) if isinstance(env, dict) else {e.split("=", 1)[0] for e in env}
        yield "compose", name, cmd[0], names


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nexus", required=True)
    args = ap.parse_args()
    missing = [t for t in ("kubernetes-validate", "check-jsonschema") if not shutil.which(t)]
    if yaml is None:
        missing.append("PyYAML")
    if missing:
        msg = f"deploy: cannot check: missing {', '.join(missing)} (pip install -r deploy/requirements.txt)"
        if os.environ.get("CI") == "true":
            print(msg)
            return 1
        print(msg + " (skipped)")
        return 0
    failures = []
    manifests = sorted(glob.glob(os.path.join(HERE, "kubernetes", "*.yaml")))
    compose = os.path.join(HERE, "compose.yaml")
    for argv in (["kubernetes-validate", "--strict", "--quiet", *manifests],
                 ["check-jsonschema", "--builtin-schema", "vendor.compose-spec", compose]):
        r = subprocess.run(argv, capture_output=True, text=True)
        if r.returncode != 0:
            failures.append(f"{argv[0]}: {r.stdout}{r.stderr}".strip())
    known = {part: settings_of(args.nexus, part) for part in ENV_ONLY}
    found = []
    for path in manifests:
        with open(path) as f:
            found += list(kubernetes_envs(list(yaml.safe_load_all(f))))
    with open(compose) as f:
        found += list(compose_envs(yaml.safe_load(f)))
    for where, container, part, names in found:
        for n in sorted(names - known[part]):
            failures.append(f"{where} {container}: {n} is not a setting of `nexus {part}`")
    parts = sorted({f[2] for f in found})
    if failures:
        print("\n".join(failures))
        return 1
    print(f"deploy: {len(manifests)} manifests and compose.yaml valid; "
          f"{len(found)} Nexus containers ({', '.join(parts)}) use only known settings")
    return 0


if __name__ == "__main__":
    sys.exit(main())
