#!/usr/bin/env python3
"""Compute reference AWS SigV4 signatures with botocore for requests.json.

Usage:
    python3 botocore_sign.py requests.json > botocore_expected.json

The clock is frozen at the "timestamp" in the input file, so the output is
deterministic: the same input and botocore version give byte-identical output.
See README.md next to this file for the input and output formats.
"""

import base64
import datetime
import hashlib
import json
import sys
from unittest import mock

import botocore
import botocore.auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials


class RecordingSigV4Auth(botocore.auth.SigV4Auth):
    """SigV4Auth that remembers the canonical request and string to sign it used."""

    last_canonical_request = None
    last_string_to_sign = None

    def canonical_request(self, request):
        value = super().canonical_request(request)
        self.last_canonical_request = value
        return value

    def string_to_sign(self, request, canonical_request):
        value = super().string_to_sign(request, canonical_request)
        self.last_string_to_sign = value
        return value


def parse_timestamp(text):
    """'2015-08-30T12:36:00Z' -> naive UTC datetime (what botocore expects)."""
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ")


def frozen_clock(now):
    """Patch botocore's clock.

    botocore >= 1.3x reads the time through botocore.compat.get_current_datetime(),
    imported by name into botocore.auth; patching botocore.auth.datetime (what
    botocore's own test helper FreezeTime does) has NO effect on SigV4Auth.add_auth
    there. Older releases called datetime.datetime.utcnow() inside botocore.auth.
    Patch whichever this botocore uses.
    """
    if hasattr(botocore.auth, "get_current_datetime"):
        return mock.patch.object(
            botocore.auth, "get_current_datetime", lambda remove_tzinfo=True: now
        )
    fake = mock.Mock(wraps=datetime.datetime)
    fake.utcnow.return_value = now
    fake.now.return_value = now
    return mock.patch.object(botocore.auth, "datetime", fake)


def body_bytes(spec):
    if "body_base64" in spec:
        return base64.b64decode(spec["body_base64"])
    return spec.get("body", "").encode("utf-8")


def sign_one(spec, access_key, secret_key, now):
    body = body_bytes(spec)
    request = AWSRequest(method=spec["method"], url=spec["url"], data=body)
    # AWSRequest.headers is case-insensitive; add_header keeps repeated names.
    for name, value in spec.get("headers", []):
        request.headers.add_header(name, value)
    if spec.get("content_sha256_header"):
        request.headers["X-Amz-Content-SHA256"] = hashlib.sha256(body).hexdigest()

    credentials = Credentials(access_key, secret_key, spec.get("session_token"))
    signer = RecordingSigV4Auth(credentials, spec["service"], spec["region"])
    with frozen_clock(now):
        signer.add_auth(request)

    expected_date = now.strftime("%Y%m%dT%H%M%SZ")
    if request.headers.get("X-Amz-Date") != expected_date:
        raise SystemExit(
            f"{spec['name']}: clock was not frozen "
            f"(X-Amz-Date={request.headers.get('X-Amz-Date')!r}, want {expected_date!r})"
        )

    authorization = request.headers["Authorization"]
    signed_headers = authorization.split("SignedHeaders=", 1)[1].split(",", 1)[0]
    signature = authorization.rsplit("Signature=", 1)[1]
    canonical_request = signer.last_canonical_request
    return {
        "name": spec["name"],
        "authorization": authorization,
        "x_amz_date": request.headers.get("X-Amz-Date"),
        "x_amz_security_token": request.headers.get("X-Amz-Security-Token"),
        "x_amz_content_sha256": request.headers.get("X-Amz-Content-SHA256"),
        "signed_headers": signed_headers,
        "signature": signature,
        "payload_hash": canonical_request.rsplit("\n", 1)[1],
        "canonical_request": canonical_request,
        "string_to_sign": signer.last_string_to_sign,
        # Every header on the request after signing, in insertion order
        # (botocore does not add Host or Content-Length here).
        "headers_after_signing": [[k, v] for k, v in request.headers.items()],
    }


def main(argv):
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[1], encoding="utf-8") as fh:
        spec = json.load(fh)
    now = parse_timestamp(spec["timestamp"])
    creds = spec["credentials"]
    results = [
        sign_one(r, creds["access_key_id"], creds["secret_access_key"], now)
        for r in spec["requests"]
    ]
    out = {
        "generator": f"botocore {botocore.__version__} SigV4Auth via botocore_sign.py",
        "timestamp": spec["timestamp"],
        "results": results,
    }
    json.dump(out, sys.stdout, indent=2, ensure_ascii=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
