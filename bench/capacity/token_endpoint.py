#!/usr/bin/env python3
"""A loopback OAuth 2.0 token endpoint for the capacity benchmark: it answers
`authorization_code` and `refresh_token` grants after a fixed delay (default
20 ms, a fast real provider's round trip), with a new access token and a
rotated refresh token each time, on kept-alive HTTP/1.1 connections
(asyncio, so one process serves thousands of requests a second and its own
CPU can be counted apart). It checks nothing a real provider would: it is a
load peer, not a provider (the soak uses the real one for correctness).

    python3 token_endpoint.py --port 0 --delay-ms 20    # prints `listening on HOST:PORT`

`GET /count` answers {"authorization_code": n, "refresh_token": n}.
"""

import argparse
import asyncio
import json
import secrets
import sys
import urllib.parse

COUNTS = {"authorization_code": 0, "refresh_token": 0}


def answer(status: str, body: bytes) -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
            f"Cache-Control: no-store\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                return
            lines = head.decode("latin-1").split("\r\n")
            method, target = lines[0].split(" ")[:2]
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            body = await reader.readexactly(length) if length else b""
            if method == "GET" and target == "/count":
                writer.write(answer("200 OK", json.dumps(COUNTS).encode()))
            elif method == "POST" and target == "/token":
                grant = urllib.parse.parse_qs(body.decode()).get("grant_type", [""])[0]
                if grant not in COUNTS:
                    writer.write(answer("400 Bad Request", b'{"error":"unsupported_grant_type"}'))
                else:
                    await asyncio.sleep(delay)
                    COUNTS[grant] += 1
                    writer.write(answer("200 OK", json.dumps({
                        "access_token": "at-" + secrets.token_urlsafe(24),
                        "token_type": "Bearer",
                        "expires_in": 3600,
                        "refresh_token": "rt-" + secrets.token_urlsafe(24),
                        "scope": "read",
                    }).encode()))
            else:
                writer.write(answer("404 Not Found", b'{"error":"not_found"}'))
            await writer.drain()
    except (ConnectionError, ValueError):
        return
    finally:
        writer.close()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--delay-ms", type=float, default=20)
    args = ap.parse_args()
    if not args.host.startswith("127."):
        sys.exit("loopback addresses only")
    delay = args.delay_ms / 1000
    server = await asyncio.start_server(lambda r, w: handle(r, w, delay), args.host, args.port,
                                        backlog=1024)
    host, port = server.sockets[0].getsockname()[:2]
    print(f"listening on {host}:{port}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
