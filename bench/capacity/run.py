#!/usr/bin/env python3
"""Capacity figures for several replicas on one PostgreSQL database.

Starts PostgreSQL-backed `nexus broker` processes behind nginx (HTTP load
balancer, keep-alive upstream pool), two `nexus gateway` processes that
reach the brokers through it, and a loopback token endpoint answering after
20 ms (token_endpoint.py, its own process). Then, in alternating rounds:

  fetch      warm token fetches through both gateways (one wrk per gateway),
             with 1 broker and with 3; the gateways' token cache off, so
             every fetch reaches a broker (the cache's effect is measured
             once on its own: `fetch-cached`);
  refresh    forced refreshes (POST /connections/{id}/refresh through nginx),
             each a real refresh_token grant at the 20 ms endpoint, rotated
             token sealed and committed, with 1 broker and with 3.

Reported per run: requests/s, p50/p99, CPU per request of every Nexus
process (and nginx's apart), and the database load per 1,000 requests
(transactions and rows, from pg_stat_database of the run's own database,
read after PostgreSQL has flushed its statistics).

    python3 bench/capacity/run.py                   # build, 3 rounds
    python3 bench/capacity/run.py --no-build --rounds 5 --duration 8

Needs PostgreSQL (--database-url, may CREATE DATABASE), nginx and wrk (both
installed from Debian if missing), Python 3.11. Loopback only; every process
it starts is stopped at the end.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The HTTP benchmark's helpers (processes, /proc CPU, wrk script and parsing).
_spec = importlib.util.spec_from_file_location("httpbench", HERE.parent / "http" / "run.py")
hb = importlib.util.module_from_spec(_spec)
sys.modules["httpbench"] = hb  # dataclasses look their module up there
_spec.loader.exec_module(hb)
log = hb.log

NGINX_CONF = """
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/nginx-body;
  proxy_temp_path {tmp}/nginx-proxy;
  fastcgi_temp_path {tmp}/nginx-fastcgi;
  uwsgi_temp_path {tmp}/nginx-uwsgi;
  scgi_temp_path {tmp}/nginx-scgi;
  upstream brokers {{
{servers}
    keepalive 128;
  }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://brokers;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $http_host;
      # The gateways' change stream is a long-lived streamed answer.
      proxy_buffering off;
      proxy_read_timeout 120s;
    }}
  }}
}}
"""


def ensure_nginx() -> str:
    found = shutil.which("nginx") or (os.path.exists("/usr/sbin/nginx") and "/usr/sbin/nginx")
    if found:
        return found
    log("nginx is missing: installing it from the distribution (apt-get install -y nginx)")
    sudo = [] if os.geteuid() == 0 else (["sudo", "-n"] if shutil.which("sudo") else [])
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if subprocess.run(sudo + ["apt-get", "install", "-y", "nginx"], env=env).returncode != 0:
        subprocess.run(sudo + ["apt-get", "update"], env=env, check=True)
        subprocess.run(sudo + ["apt-get", "install", "-y", "nginx"], env=env, check=True)
    return shutil.which("nginx") or "/usr/sbin/nginx"


def psql(url: str, sql: str) -> str:
    r = subprocess.run(["psql", url, "-v", "ON_ERROR_STOP=1", "-Atc", sql],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"psql: {r.stderr.strip()}")
    return r.stdout.strip()


DB_FIELDS = ["xact_commit", "xact_rollback", "tup_returned", "tup_fetched", "tup_inserted",
             "tup_updated", "tup_deleted"]


def db_stats(admin_url: str, db: str) -> dict[str, int]:
    row = psql(admin_url, f"SELECT {', '.join(DB_FIELDS)} FROM pg_stat_database "
                          f"WHERE datname = '{db}'")
    return dict(zip(DB_FIELDS, (int(x) for x in row.split("|"))))


class Fleet:
    """The brokers, nginx in front of them, and the gateways."""

    def __init__(self, args, bins, tmp: Path, db_url: str, keys: dict, token_url: str):
        self.args, self.bins, self.tmp, self.db_url, self.keys = args, bins, tmp, db_url, keys
        self.token_url = token_url
        self.procs = hb.Procs()
        self.nginx_bin = ensure_nginx()
        self.lb_port = hb.free_port("127.0.0.1")
        self.lb = f"http://127.0.0.1:{self.lb_port}"
        self.gateway_key = "gw_" + uuid.uuid4().hex + uuid.uuid4().hex
        self.brokers: list[tuple[int, object]] = []   # (port, Popen)
        self.nginx = None
        self.gateways: list[tuple[int, object]] = []
        self.gateway_cache = None
        self.n = 0

    def broker_env(self, port: int) -> dict:
        return hb.clean_env(
            DATABASE_URL=self.db_url, ENCRYPTION_KEY=self.keys["ENCRYPTION_KEY"],
            STATE_KEY=self.keys["STATE_KEY"], API_KEY=self.keys["API_KEY"],
            GATEWAY_API_KEY=self.gateway_key, BROKER_ADDR=f"127.0.0.1:{port}",
            BASE_URL=self.lb, EGRESS_ALLOWED_CIDRS="127.0.0.0/8",
            HANDSHAKE_STARTS_PER_MINUTE="1000000", MAX_PENDING_PER_WORKSPACE="1000000",
            # Admin calls come from loopback in bursts; nothing else differs
            # from the defaults.
        )

    def set_brokers(self, n: int) -> None:
        """Exactly n brokers running, nginx balancing over them."""
        while len(self.brokers) > n:
            port, p = self.brokers.pop()
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=30)
        while len(self.brokers) < n:
            port = hb.free_port("127.0.0.1")
            logf = self.tmp / f"broker-{len(self.brokers)}.log"
            p = self.procs.start(f"broker-{len(self.brokers)}", [str(self.bins["nexus"]), "broker"],
                                 self.broker_env(port), self.tmp, logf)
            hb.wait_ready(f"http://127.0.0.1:{port}/health", p, logf)
            self.brokers.append((port, p))
        if self.nginx is not None:
            # Fast shutdown: a graceful one would wait for the gateways'
            # change streams, which never end (the gateways reconnect).
            self.nginx.send_signal(signal.SIGTERM)
            self.nginx.wait(timeout=30)
        conf = self.tmp / "nginx.conf"
        conf.write_text(NGINX_CONF.format(
            tmp=self.tmp, port=self.lb_port,
            servers="\n".join(f"    server 127.0.0.1:{port};" for port, _ in self.brokers)))
        self.nginx = self.procs.start("nginx", [self.nginx_bin, "-c", str(conf), "-p",
                                                str(self.tmp)],
                                      hb.clean_env(), self.tmp, self.tmp / "nginx.log")
        hb.wait_ready(self.lb + "/health", self.nginx, self.tmp / "nginx-error.log")
        self.n = n

    def set_gateways(self, cache: bool) -> None:
        if self.gateway_cache == cache and self.gateways:
            return
        for _, p in self.gateways:
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=30)
        self.gateways = []
        for i in range(2):
            port = hb.free_port("127.0.0.1")
            logf = self.tmp / f"gateway-{i}.log"
            env = hb.clean_env(BROKER_URL=self.lb, BROKER_API_KEY=self.gateway_key,
                               GATEWAY_ADDR=f"127.0.0.1:{port}",
                               GATEWAY_CACHE_CAPACITY="10000" if cache else "0")
            p = self.procs.start(f"gateway-{i}", [str(self.bins["nexus"]), "gateway"], env,
                                 self.tmp, logf)
            hb.wait_ready(f"http://127.0.0.1:{port}/health", p, logf)
            self.gateways.append((port, p))
        self.gateway_cache = cache

    def pids(self) -> dict[str, int]:
        out = {f"broker-{i}": p.pid for i, (_, p) in enumerate(self.brokers)}
        out.update({f"gateway-{i}": p.pid for i, (_, p) in enumerate(self.gateways)})
        return out

    def nginx_pids(self) -> list[int]:
        """nginx's master and its worker."""
        pids = [self.nginx.pid]
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    stat = (d / "stat").read_text()
                except OSError:
                    continue
                if int(stat[stat.rindex(")") + 2:].split()[1]) == self.nginx.pid:
                    pids.append(int(d.name))
        return pids


def seed(fleet: Fleet, count: int) -> tuple[list[str], list[str], str]:
    """`count` static connections (header strategy) and `count` OAuth 2.0
    connections at the token endpoint, each through its handshake; an agent
    key. Returns (static ids, oauth ids, agent key)."""
    h = hb.Http(fleet.lb)
    admin = {"X-API-Key": fleet.keys["API_KEY"]}
    h.json("POST", "/providers", admin, {"profile": {
        "name": "weather", "auth_type": "api_key",
        "params": {"credential_schema": {"type": "object", "required": ["api_key"],
                                         "properties": {"api_key": {"type": "string"}}},
                   "strategy": {"type": "header", "config": {"header_name": "X-Api-Key",
                                                             "credential_field": "api_key"}}}}},
           expect=(201,))
    base = fleet.token_url.rsplit("/", 1)[0]
    h.json("POST", "/providers", admin, {"profile": {
        "name": "fast-oauth", "auth_type": "oauth2", "client_id": "nexus",
        "client_secret": "capacity-secret", "auth_url": base + "/authorize",
        "token_url": fleet.token_url, "scopes": ["read"]}}, expect=(201,))
    static, oauth = [], []
    for i in range(count):
        spec = h.json("POST", "/auth/consent-spec", admin, {
            "workspace_id": "capacity", "provider_name": "weather",
            "return_url": "http://localhost/done"})
        h.json("POST", "/auth/capture-credential", {}, {
            "state": spec["state"], "credentials": {"api_key": f"weather-key-{i:05}"}},
            expect=tuple(range(200, 300)))
        static.append(spec["connection_id"])
        spec = h.json("POST", "/auth/consent-spec", admin, {
            "workspace_id": "capacity", "provider_name": "fast-oauth",
            "return_url": "http://localhost/done"})
        state = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(spec["authUrl"]).query))["state"]
        status, raw, headers = h.call(
            "GET", "/auth/callback?" + urllib.parse.urlencode({"code": f"c{i}", "state": state}))
        where = headers.get("location", "")
        if status not in (302, 303) or "status=success" not in where:
            raise RuntimeError(f"OAuth handshake {i}: {status} {where} {raw[:200]!r}")
        oauth.append(spec["connection_id"])
    agent = h.json("POST", "/agent-keys", admin, {"name": "capacity", "workspaces": ["capacity"]},
                   expect=(201,))["key"]
    h.close()
    return static, oauth, agent


def write_lua(tmp: Path, name: str, method: str, paths: list[str], header: tuple[str, str]) -> Path:
    lua = hb.LUA % {"paths": ", ".join(json.dumps(p) for p in paths),
                    "hname": json.dumps(header[0]), "hvalue": json.dumps(header[1])}
    if method != "GET":
        lua = lua.replace('wrk.format("GET", p,', f'wrk.format("{method}", p,')
        assert f'wrk.format("{method}", p,' in lua
    path = tmp / f"{name}.lua"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(lua)
    return path


def run_loads(wrk: str, loads: list[tuple[str, Path]], conns: int, secs: float, fleet: Fleet,
              settle_db: str | None, admin_url: str, token_count) -> dict:
    """Runs one wrk per (url, script) at once; figures summed."""
    pids = fleet.pids()
    ngx = fleet.nginx_pids()
    before = {n: hb.cpu_ticks(p) for n, p in pids.items()}
    ngx0 = sum(hb.cpu_ticks(p) for p in ngx)
    db0 = db_stats(admin_url, settle_db) if settle_db else None
    tok0 = token_count()
    procs = [subprocess.Popen([wrk, "-t1", f"-c{conns}", f"-d{secs:g}s", "--latency", "-s",
                               str(lua), url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for url, lua in loads]
    outs = [p.communicate(timeout=secs + 60) for p in procs]
    after = {n: hb.cpu_ticks(p) for n, p in pids.items()}
    ngx1 = sum(hb.cpu_ticks(p) for p in ngx if os.path.exists(f"/proc/{p}"))
    tok1 = token_count()
    figs = [hb.parse_wrk(out) for out, _ in outs]
    ok = sum(int(f["requests"]) - int(f["status"]) for f in figs)
    errors = sum(int(f[k]) for f in figs for k in ("connect", "read", "write", "timeout", "status"))
    dur = max(f["duration_us"] for f in figs) / 1e6
    cpu = {n: (after[n] - before[n]) / hb.CLK_TCK for n in pids}
    out = {
        "rps": ok / dur, "ok": ok, "errors": errors,
        "p50_ms": statistics.median(f["p50_us"] for f in figs) / 1000,
        "p99_ms": max(f["p99_us"] for f in figs) / 1000,
        "cpu_us_per_req": sum(cpu.values()) * 1e6 / max(ok, 1),
        "broker_cpu_us_per_req": sum(v for n, v in cpu.items() if n.startswith("broker"))
        * 1e6 / max(ok, 1),
        "nginx_cpu_us_per_req": (ngx1 - ngx0) / hb.CLK_TCK * 1e6 / max(ok, 1),
        "token_grants": tok1 - tok0,
    }
    if settle_db:
        # PostgreSQL flushes a backend's statistics when it has been idle
        # for 10 s: wait that out, then read.
        time.sleep(11.5)
        db1 = db_stats(admin_url, settle_db)
        out["db_per_1k"] = {k: (db1[k] - db0[k]) * 1000 / max(ok, 1) for k in DB_FIELDS}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--database-url", default=os.environ.get(
        "NEXUS_TEST_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=8, help="seconds per wrk run")
    ap.add_argument("--connections", type=int, default=32, help="wrk -c per wrk process")
    ap.add_argument("--ids", type=int, default=200, help="connections of each kind")
    ap.add_argument("--brokers", default="1,3", help="broker counts compared")
    ap.add_argument("--token-delay-ms", type=float, default=20)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--keep-tmp", action="store_true")
    args = ap.parse_args()
    counts = [int(x) for x in args.brokers.split(",")]
    repo = HERE.parent.parent
    wrk = hb.ensure_wrk()
    ensure_nginx()
    if not args.no_build:
        hb.build(repo, repo / "target")
    bins = {"nexus": repo / "target" / "release" / "nexus"}
    if not bins["nexus"].exists():
        sys.exit(f"{bins['nexus']} is missing: build it (drop --no-build)")
    u = urllib.parse.urlsplit(args.database_url)
    hb.check_loopback(u.hostname or "")

    def on_signal(signum, frame):
        raise KeyboardInterrupt
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)

    tmp = Path(tempfile.mkdtemp(prefix="nexus-capacity-"))
    db = f"nexus_capacity_{uuid.uuid4().hex[:12]}"
    psql(args.database_url, f"CREATE DATABASE {db}")
    db_url = re.sub(r"/[^/?]*(\?|$)", f"/{db}\\1", args.database_url, count=1)
    fleet = None
    endpoint = None
    commit = hb.git_commit(repo)
    log(f"command: {shlex.join([sys.executable, *sys.argv])}")
    log(f"commit {commit}; {os.cpu_count()} CPUs; database {db}; folder {tmp}")
    results: list[dict] = []
    try:
        keys = {}
        for line in subprocess.run([str(bins["nexus"]), "keys", "generate"], env=hb.clean_env(),
                                   check=True, capture_output=True, text=True).stdout.splitlines():
            if "=" in line:
                k, v = line.split("=", 1)
                keys[k] = v
        env = hb.clean_env(DATABASE_URL=db_url, ENCRYPTION_KEY=keys["ENCRYPTION_KEY"],
                           STATE_KEY=keys["STATE_KEY"], API_KEY=keys["API_KEY"])
        subprocess.run([str(bins["nexus"]), "migrate"], env=env, check=True, capture_output=True)
        procs = hb.Procs()
        endpoint = procs.start("token endpoint", [sys.executable, str(HERE / "token_endpoint.py"),
                                                  "--delay-ms", str(args.token_delay_ms)],
                               hb.clean_env(), tmp, tmp / "token-endpoint.log",
                               stdout=subprocess.PIPE)
        token_addr = hb.read_line(endpoint, "listening on ")
        token_url = f"http://{token_addr}/token"

        def token_count() -> int:
            h = hb.Http(f"http://{token_addr}")
            n = h.json("GET", "/count")["refresh_token"]
            h.close()
            return n

        fleet = Fleet(args, bins, tmp, db_url, keys, token_url)
        fleet.set_brokers(max(counts))
        fleet.set_gateways(cache=False)
        static, oauth, agent = seed(fleet, args.ids)
        log(f"seeded {len(static)} static and {len(oauth)} OAuth connections "
            f"(token endpoint {token_url}, {args.token_delay_ms:g} ms per answer)")
        fetch_lua = write_lua(tmp, "fetch", "GET", [f"/v1/token/{i}" for i in static],
                              ("Authorization", f"Bearer {agent}"))
        refresh_lua = write_lua(tmp, "refresh", "POST",
                                [f"/connections/{i}/refresh" for i in oauth],
                                ("X-API-Key", keys["API_KEY"]))

        def measure(kind: str, n: int, rnd: int, with_db: bool) -> None:
            fleet.set_brokers(n)
            fleet.set_gateways(cache=(kind == "fetch-cached"))
            if kind.startswith("fetch"):
                loads = [(f"http://127.0.0.1:{port}/v1/token/{static[0]}", fetch_lua)
                         for port, _ in fleet.gateways]
            else:
                loads = [(f"{fleet.lb}/connections/{oauth[0]}/refresh", refresh_lua)]
            # Warm: caches, pools, the gateways' change streams.
            run_loads(wrk, loads, args.connections, 2, fleet, None, args.database_url,
                      token_count)
            hb.wait_idle(60, 10)
            r = run_loads(wrk, loads, args.connections, args.duration, fleet,
                          db if with_db else None, args.database_url, token_count)
            r.update(kind=kind, brokers=n, round=rnd)
            results.append(r)
            log(f"round {rnd} {kind:<13} brokers {n}: {r['rps']:8.0f} req/s  "
                f"p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  "
                f"Nexus CPU {r['cpu_us_per_req']:.0f} µs/req (brokers "
                f"{r['broker_cpu_us_per_req']:.0f})  nginx {r['nginx_cpu_us_per_req']:.0f} µs/req"
                + (f"  grants {r['token_grants']}" if kind == "refresh" else "")
                + (f"  ERRORS {r['errors']}" if r["errors"] else ""))
            if "db_per_1k" in r:
                log("    database per 1,000 requests: " + ", ".join(
                    f"{k} {v:.0f}" for k, v in r["db_per_1k"].items()))

        for rnd in range(1, args.rounds + 1):
            order = counts if rnd % 2 else list(reversed(counts))
            for n in order:
                measure("fetch", n, rnd, with_db=(rnd == 1))
            for n in order:
                measure("refresh", n, rnd, with_db=(rnd == 1))
        measure("fetch-cached", max(counts), 1, with_db=True)

        log(f"\n== medians over {args.rounds} rounds (wrk -t1 -c{args.connections} "
            f"-d{args.duration:g}s per wrk; fetch: one wrk per gateway; refresh: one wrk "
            f"through nginx), commit {commit[:12]}")
        summary = {}
        for kind in ("fetch", "refresh", "fetch-cached"):
            for n in counts:
                rs = [r for r in results if r["kind"] == kind and r["brokers"] == n]
                if not rs:
                    continue
                s = {k: statistics.median(r[k] for r in rs)
                     for k in ("rps", "p50_ms", "p99_ms", "cpu_us_per_req",
                               "broker_cpu_us_per_req", "nginx_cpu_us_per_req")}
                s["errors"] = sum(r["errors"] for r in rs)
                s["db_per_1k"] = next((r["db_per_1k"] for r in rs if "db_per_1k" in r), None)
                summary[f"{kind}/{n}"] = s
                log(f"{kind:<13} brokers {n}: {s['rps']:8.0f} req/s  p50 {s['p50_ms']:.2f} ms  "
                    f"p99 {s['p99_ms']:.2f} ms  Nexus CPU {s['cpu_us_per_req']:.0f} µs/req  "
                    f"errors {s['errors']}")
            if f"{kind}/{counts[0]}" in summary and f"{kind}/{counts[-1]}" in summary:
                ratio = summary[f"{kind}/{counts[-1]}"]["rps"] / summary[f"{kind}/{counts[0]}"]["rps"]
                log(f"{kind:<13} scaling {counts[-1]} vs {counts[0]} brokers: {ratio:.2f}×")
        if args.json:
            args.json.write_text(json.dumps({"commit": commit, "args": vars(args) | {
                "json": str(args.json)}, "summary": summary, "runs": results}, indent=2,
                default=str) + "\n")
        return 1 if any(r["errors"] for r in results) else 0
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    except Exception:
        args.keep_tmp = True
        raise
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        if fleet:
            fleet.procs.stop_all()
        if endpoint:
            procs.stop_all()
        try:
            psql(args.database_url, f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        except RuntimeError as e:
            log(f"could not drop {db}: {e}")
        if args.keep_tmp:
            log(f"logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
