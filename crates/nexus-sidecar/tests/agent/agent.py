"""A Python agent that knows only the sidecar's URL (no key, no token).

Commands arrive one per line on stdin; each answer is one JSON line:
  loop SECONDS PATH   -> {"statuses": {code: count}, "errors": [bodies of non-200s]}
  once PATH           -> {"status": code, "body": text, "nexus_error": header or null}
  quit
"""
import json
import sys
import time

import requests

SIDECAR = sys.argv[1]
session = requests.Session()


def call(path):
    return session.get(SIDECAR + path, timeout=30)


for line in sys.stdin:
    parts = line.split()
    if not parts:
        continue
    if parts[0] == "quit":
        break
    if parts[0] == "loop":
        until = time.monotonic() + float(parts[1])
        statuses, errors = {}, []
        while time.monotonic() < until:
            r = call(parts[2])
            statuses[str(r.status_code)] = statuses.get(str(r.status_code), 0) + 1
            if r.status_code != 200:
                errors.append(r.text)
            time.sleep(0.1)
        print(json.dumps({"statuses": statuses, "errors": errors[:5]}), flush=True)
    elif parts[0] == "once":
        r = call(parts[1])
        print(json.dumps({"status": r.status_code, "body": r.text, "nexus_error": r.headers.get("x-nexus-error")}), flush=True)
