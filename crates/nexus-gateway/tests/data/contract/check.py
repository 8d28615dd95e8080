"""Validates answers the gateway gave against OpenAPI documents, with
openapi-core (PyPI), not with a checker of our own.

Input (a JSON file, argv[1]):
  {"reference": "<path to the reference's openapi.yaml>",
   "nexus": <the gateway's own OpenAPI document>,
   "exchanges": [{"method", "path", "status", "body", "label"}]}

Every answer must
  - validate against Nexus's own document, whose operation must name its
    status explicitly (not only `default`);
  - validate against the reference contract when the contract documents that
    status for the operation; an error status the contract does not list must
    still carry the contract's ErrorEnvelope (`code`, `message`).
Prints one line per answer; exits 1 listing every failure.
"""

import json
import sys

from openapi_core import OpenAPI
from openapi_core.testing import MockRequest, MockResponse
from openapi_schema_validator import OAS30Validator


def operation(doc: dict, method: str, path: str):
    """The documented path template and operation matching a concrete path."""
    parts = path.strip("/").split("/")
    for template, ops in doc["paths"].items():
        tparts = template.strip("/").split("/")
        if len(tparts) != len(parts):
            continue
        if all(t.startswith("{") or t == p for t, p in zip(tparts, parts)):
            op = ops.get(method.lower())
            if op is not None:
                return template, op
    return None, None


def errors_of(api: OpenAPI, host: str, ex: dict) -> list:
    req = MockRequest(host, ex["method"].lower(), ex["path"])
    resp = MockResponse(ex["body"].encode(), status_code=ex["status"])
    out = []
    for e in api.iter_response_errors(req, resp):
        detail = getattr(e, "schema_errors", None) or getattr(e, "__cause__", None)
        out.append(f"{type(e).__name__}: {e}" + (f" ({detail})" if detail else ""))
    return out


def main() -> int:
    spec = json.load(open(sys.argv[1]))
    reference_path = spec["reference"]
    nexus_doc = spec["nexus"]
    reference = OpenAPI.from_file_path(reference_path)
    nexus = OpenAPI.from_dict(nexus_doc)
    import yaml  # a dependency of openapi-core's stack

    reference_doc = yaml.safe_load(open(reference_path))
    envelope = OAS30Validator(reference_doc["components"]["schemas"]["ErrorEnvelope"])

    failures = []
    for ex in spec["exchanges"]:
        label = f"{ex['label']}: {ex['method']} {ex['path']} -> {ex['status']}"
        status = str(ex["status"])
        problems = []

        _, op = operation(nexus_doc, ex["method"], ex["path"])
        if op is None:
            problems.append("not in Nexus's document")
        elif status not in op["responses"]:
            problems.append(f"status {status} not named in Nexus's document")
        problems += [f"nexus: {e}" for e in errors_of(nexus, "http://gateway.test", ex)]

        _, rop = operation(reference_doc, ex["method"], ex["path"])
        where = "reference"
        if rop is not None and status in rop["responses"]:
            problems += [
                f"reference: {e}" for e in errors_of(reference, "http://localhost:8090", ex)
            ]
        elif rop is not None:
            where = "reference lists no such status"
            if ex["status"] >= 400:
                body = json.loads(ex["body"])
                problems += [
                    f"reference ErrorEnvelope: {e.message}"
                    for e in envelope.iter_errors(body)
                ]
        else:
            where = "not a v1 route"

        if problems:
            failures.append((label, problems))
            print(f"FAIL {label} ({where})")
            for p in problems:
                print(f"     {p}")
        else:
            print(f"ok   {label} ({where})")

    print(f"{len(spec['exchanges'])} answers, {len(failures)} failing")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
