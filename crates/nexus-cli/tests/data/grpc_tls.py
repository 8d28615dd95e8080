"""gRPC over TLS with Python's grpcio (Google's C core, not our code): calls
nexus.v1.NexusService/CheckConnection on the gateway, trusting only the
given CA. The request and answer are encoded by hand (two string fields),
so no generated code is needed.

    python3 grpc_tls.py 127.0.0.1:8090 ca.pem AGENT_KEY CONNECTION_ID
Prints the answer's fields as JSON; exits 1 with the gRPC status otherwise.
"""

import json
import sys

import grpc


def field(tag, text):
    data = text.encode()
    return bytes([tag << 3 | 2, len(data)]) + data


def strings(raw):
    out, i = {}, 0
    while i < len(raw):
        tag, size = raw[i] >> 3, raw[i + 1]
        out[tag] = raw[i + 2:i + 2 + size].decode()
        i += 2 + size
    return out


def main():
    target, ca, key, connection = sys.argv[1:5]
    with open(ca, "rb") as f:
        creds = grpc.ssl_channel_credentials(root_certificates=f.read())
    # The development certificate names localhost and 127.0.0.1.
    options = [("grpc.ssl_target_name_override", "localhost")]
    with grpc.secure_channel(target, creds, options=options) as channel:
        call = channel.unary_unary("/nexus.v1.NexusService/CheckConnection")
        try:
            raw = call(field(1, connection), metadata=[("authorization", f"Bearer {key}")], timeout=10)
        except grpc.RpcError as e:
            print(f"grpc error: {e.code()} {e.details()}")
            return 1
    print(json.dumps(strings(raw)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
