#!/usr/bin/env python3
"""What Nexus's serving loop (nexus_core::serve: header/body timeouts,
connection cap, shutdown deadline) costs per request, measured alone: the
bare example served by axum::serve and by that loop, side by side, under the
same wrk load in alternating rounds; server CPU per request from /proc.

    cargo build --release -p nexus-gateway --example bare
    python3 bench/http/ab_serve.py [ROUNDS]      # default 5; needs wrk

Loopback only; each wrk run lasts 5 s.
"""
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

BIN = Path(__file__).resolve().parents[2] / "target/release/examples/bare"


def start(mode: str):
    args = [str(BIN), "127.0.0.1:0", "1024"] + (["nexus-serve"] if mode == "nexus" else [])
    p = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    addr = p.stdout.readline().split()[-1]
    return p, addr


def cpu_secs(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().split(") ")[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    procs = {m: start(m) for m in ("axum", "nexus")}
    results = {m: [] for m in procs}
    try:
        for r in range(rounds):
            for mode, (p, addr) in procs.items():
                before = cpu_secs(p.pid)
                out = subprocess.run(
                    ["wrk", "-t1", "-c64", "-d5s", f"http://{addr}/v1/token/x"],
                    capture_output=True, text=True, check=True).stdout
                after = cpu_secs(p.pid)
                n = int(re.search(r"(\d+) requests in", out).group(1))
                rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
                us = (after - before) / n * 1e6
                results[mode].append((rps, us))
                print(f"round {r + 1} {mode:5} {rps:9.0f} req/s  {us:5.2f} µs/req", flush=True)
    finally:
        for p, _ in procs.values():
            p.kill()
    for mode, v in results.items():
        print(f"{mode:5} median {statistics.median(x[0] for x in v):9.0f} req/s  "
              f"{statistics.median(x[1] for x in v):5.2f} µs/req server CPU")


if __name__ == "__main__":
    main()
