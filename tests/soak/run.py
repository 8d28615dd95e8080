#!/usr/bin/env python3
"""Soak and chaos run: several broker and gateway processes on one PostgreSQL
database, a real OpenID provider that rotates refresh tokens and kills a grant
whose refresh token is replayed, token fetches through the gateways, and
faults on a schedule. At the end, invariants are checked and printed as a
table; any violation fails the run (exit 1) with its evidence.

    python3 tests/soak/run.py --duration 1800          # the long run, by hand
    python3 tests/soak/run.py --profile ci              # about two minutes

Needs: a built `nexus` (target/debug or target/release, or --nexus),
PostgreSQL (--database-url, trust auth, may CREATE DATABASE), redis-server on
PATH, Node with tests/peers/oidc-provider installed (npm ci), and the Python
package `requests`. Everything listens on 127.0.0.1 only; every loop is
bounded by the run's duration. The run folder (logs of every process, the
event timeline, the report as JSON) is printed at the start.

What the faults are and what each must not cause is in tests/soak/README.md.
"""

import argparse
import base64
import calendar
import hashlib
import hmac
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

try:
    import requests
except ImportError:  # reported with the other missing pieces in main()
    requests = None

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
PEER_DIR = os.path.join(ROOT, "tests", "peers", "oidc-provider")
RETURN_URL = "http://127.0.0.1:9/soak-done"
SCOPE = "calendar.read"

PROFILES = {
    # The long run: hundreds of connections, thirty minutes.
    "long": dict(duration=1800, accounts=40, per_account=5, brokers=3, gateways=2,
                 access_ttl=20, load_threads=6, chaos_min=3.0, chaos_max=8.0),
    # CI: the same faults, fewer connections, about two minutes of chaos.
    "ci": dict(duration=100, accounts=12, per_account=3, brokers=3, gateways=2,
               access_ttl=12, load_threads=4, chaos_min=3.0, chaos_max=6.0),
}


def now():
    return time.time()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Timeline:
    """Every chaos action and deliberate change, with its time (the evidence)."""

    def __init__(self, path):
        self.events = []
        self.lock = threading.Lock()
        self.path = path

    def add(self, kind, **detail):
        e = {"t": now(), "kind": kind, **detail}
        with self.lock:
            self.events.append(e)
            with open(self.path, "a") as f:
                f.write(json.dumps(e) + "\n")
        print(f"  [{time.strftime('%H:%M:%S')}] {kind} {json.dumps(detail) if detail else ''}", flush=True)
        return e

    def of(self, *kinds):
        with self.lock:
            return [e for e in self.events if e["kind"] in kinds]


class Proc:
    """One OS process of the run, restartable; its output goes to a log file."""

    def __init__(self, name, argv, env, run_dir, port=None, health=None):
        self.name, self.argv, self.env, self.port, self.health = name, argv, env, port, health
        self.log_path = os.path.join(run_dir, f"{name}.log")
        self.p = None
        self.incarnation = 0
        self.started_at = None
        self.rss = {}  # incarnation -> [first, last] (kB)

    def start(self, wait=True):
        log = open(self.log_path, "a")
        log.write(f"\n==== start {self.incarnation + 1} at {time.strftime('%H:%M:%S')}\n")
        log.flush()
        self.p = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, cwd=os.path.dirname(self.log_path))
        log.close()
        self.incarnation += 1
        self.started_at = now()
        if wait:
            self.wait_healthy()

    def wait_healthy(self, within=60):
        if not self.health:
            return
        deadline = now() + within
        while now() < deadline:
            if self.p.poll() is not None:
                raise SystemExit(f"{self.name} exited with {self.p.returncode} at start; see {self.log_path}")
            try:
                if requests.get(self.health, timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise SystemExit(f"{self.name} not healthy within {within}s; see {self.log_path}")

    def alive(self):
        return self.p is not None and self.p.poll() is None

    def signal(self, sig, wait=10):
        if not self.alive():
            return None
        self.p.send_signal(sig)
        try:
            return self.p.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            self.p.kill()
            return self.p.wait()

    def sample_rss(self):
        if not self.alive():
            return
        try:
            with open(f"/proc/{self.p.pid}/status") as f:
                kb = next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
        except (OSError, StopIteration):
            return
        seen = self.rss.setdefault(self.incarnation, [kb, kb, self.started_at, now()])
        seen[1], seen[3] = kb, now()


class Balancer:
    """A TCP round-robin in front of the brokers (the Service a cluster would
    give them): a connection goes to the next broker that accepts it."""

    def __init__(self, backends):
        self.backends = backends  # list of ports (fixed; processes come and go)
        self.port = free_port()
        self.i = 0
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", self.port))
        self.sock.listen(512)
        self.stopping = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stopping:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client):
        upstream = None
        with self.lock:
            start = self.i
            self.i += 1
        for k in range(len(self.backends)):
            port = self.backends[(start + k) % len(self.backends)]
            try:
                upstream = socket.create_connection(("127.0.0.1", port), timeout=0.5)
                upstream.settimeout(None)
                break
            except OSError:
                continue
        if upstream is None:
            client.close()
            return

        def pipe(a, b):
            try:
                while True:
                    data = a.recv(65536)
                    if not data:
                        break
                    b.sendall(data)
            except OSError:
                pass
            finally:
                for s in (a, b):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()
        pipe(client, upstream)
        client.close()
        upstream.close()


class WebhookReceiver:
    """Receives the brokers' webhooks, verifies every signature (Standard
    Webhooks), answers one in ten with a 503 so retries happen."""

    def __init__(self, secret):
        key = base64.b64decode(secret.removeprefix("whsec_"))
        self.ids = {}  # webhook-id -> {type, deliveries}
        self.bad = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                wid = self.headers.get("webhook-id", "")
                ts = self.headers.get("webhook-timestamp", "")
                sigs = self.headers.get("webhook-signature", "").split()
                mac = hmac.new(key, f"{wid}.{ts}.".encode() + body, hashlib.sha256).digest()
                want = "v1," + base64.b64encode(mac).decode()
                if not any(hmac.compare_digest(s, want) for s in sigs):
                    with outer.lock:
                        outer.bad.append(wid)
                    self.send_response(400)
                    self.end_headers()
                    return
                if random.random() < 0.1:
                    self.send_response(503)
                    self.end_headers()
                    return
                event = json.loads(body)
                with outer.lock:
                    seen = outer.ids.setdefault(wid, {"type": event.get("type"), "deliveries": 0,
                                                      "data": event.get("data", {})})
                    seen["deliveries"] += 1
                self.send_response(204)
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


class Load:
    """Agents: fetch a token through a random gateway, use it at the
    provider's resource API, report a 403 as an agent would (scope failure)
    and refresh once on a 401. Bounded: stops when told, sleeps between calls."""

    def __init__(self, gateways, agent_key, issuer, conns, threads, pace):
        self.gateways, self.key, self.issuer, self.conns = gateways, agent_key, issuer, conns
        self.results = []  # (start, connection, status, latency_s, error)
        self.uses = {"ok": 0, "401": 0, "403": 0, "other": 0}
        self.rejected = []  # (fetched at, connection, expires_in the gateway gave, used at)
        self.refreshed = 0  # 200s of POST /v1/refresh after a 401 (each a token issued)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.pace = pace
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def start(self):
        for t in self.threads:
            t.start()

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)

    def use(self, session, conn):
        """One agent step on one connection; returns the token fetch's status."""
        gw = random.choice(self.gateways)
        headers = {"authorization": f"Bearer {self.key}"}
        t0 = now()
        err = None
        try:
            r = session.get(f"{gw}/v1/token/{conn}", headers=headers, timeout=15)
            status = r.status_code
            body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
            if status != 200:
                err = body.get("error")
        except (requests.RequestException, ValueError) as e:
            status, body, err = 0, {}, type(e).__name__
        latency = now() - t0
        with self.lock:
            self.results.append((t0, conn, status, latency, err))
        if status != 200 or "access_token" not in body:
            return status
        try:
            u = session.get(f"{self.issuer}/api/resource", params={"scope": SCOPE},
                            headers={"authorization": f"Bearer {body['access_token']}"}, timeout=10)
        except requests.RequestException:
            return status
        kind = str(u.status_code) if u.status_code in (401, 403) else ("ok" if u.status_code == 200 else "other")
        with self.lock:
            self.uses[kind] += 1
            if u.status_code == 401:
                self.rejected.append((t0, conn, body.get("expires_in"), now()))
        try:
            if u.status_code == 403:
                session.post(f"{gw}/v1/connections/{conn}/scope-failures", headers=headers, timeout=10,
                             json={"status": 403, "www_authenticate": u.headers.get("www-authenticate", ""),
                                   "method": "GET", "host": "127.0.0.1", "path_template": "/api/resource"})
            elif u.status_code == 401:
                rr = session.post(f"{gw}/v1/refresh/{conn}", headers=headers, timeout=15)
                # A refresh answers with a token: audited as issued too.
                if rr.status_code == 200:
                    with self.lock:
                        self.refreshed += 1
        except requests.RequestException:
            pass
        return status

    def _run(self):
        session = requests.Session()
        while not self.stop.is_set():
            self.use(session, random.choice(self.conns))
            self.stop.wait(self.pace)


def psql(admin_url, sql, db=None):
    url = admin_url if db is None else re.sub(r"/[^/?]*(\?|$)", f"/{db}\\1", admin_url, count=1)
    out = subprocess.run(["psql", url, "-v", "ON_ERROR_STOP=1", "-Atc", sql],
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"psql failed: {out.stderr.strip()}")
    return out.stdout.strip()


def quantile(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def scrape(url):
    """A broker's /metrics as {name{labels}: value}."""
    try:
        text = requests.get(url, timeout=2).text
    except requests.RequestException:
        return {}
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            k, _, v = line.rpartition(" ")
            try:
                out[k] = float(v)
            except ValueError:
                pass
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=PROFILES, default="long")
    ap.add_argument("--duration", type=int, help="seconds of load and chaos")
    ap.add_argument("--accounts", type=int)
    ap.add_argument("--per-account", type=int, help="connections per account")
    ap.add_argument("--nexus", help="the nexus binary (default: target/release, else target/debug)")
    ap.add_argument("--database-url", default=os.environ.get("NEXUS_TEST_DATABASE_URL",
                                                            "postgres://postgres@127.0.0.1:5432/test"))
    ap.add_argument("--provider-latency-ms", type=int, default=0,
                    help="refresh answers arrive this long after the provider rotated the token (a real "
                         "provider's round trip: the window a SIGKILL can hit)")
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--keep", action="store_true", help="keep the database afterwards")
    args = ap.parse_args()
    cfg = dict(PROFILES[args.profile])
    for k in ("duration", "accounts", "per_account"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    random.seed(args.seed)

    nexus = args.nexus or next((p for p in (os.path.join(ROOT, "target", d, "nexus") for d in ("release", "debug"))
                                if os.path.exists(p)), None)
    missing = []
    if not nexus or not os.path.exists(nexus):
        missing.append("the nexus binary (cargo build -p nexus-cli)")
    for tool in ("redis-server", "psql", "node"):
        if not shutil.which(tool):
            missing.append(tool)
    if requests is None:
        missing.append("the Python package requests (pip install -r tests/soak/requirements.txt)")
    if not os.path.isdir(os.path.join(PEER_DIR, "node_modules", "oidc-provider")):
        missing.append("tests/peers/oidc-provider/node_modules (npm ci --prefix tests/peers/oidc-provider)")
    if missing:
        msg = "soak: cannot run: missing " + ", ".join(missing)
        if os.environ.get("CI") == "true":
            raise SystemExit(msg)
        print(msg + " (skipped)")
        return 0

    run_dir = os.path.join(ROOT, "target", "soak", time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(run_dir, exist_ok=True)
    print(f"soak: profile {args.profile}, seed {args.seed}, {cfg}; run folder {run_dir}", flush=True)
    timeline = Timeline(os.path.join(run_dir, "timeline.jsonl"))
    procs = []
    db = f"nexus_soak_{uuid.uuid4().hex[:12]}"
    psql(args.database_url, f"CREATE DATABASE {db}")
    db_url = re.sub(r"/[^/?]*(\?|$)", f"/{db}\\1", args.database_url, count=1)
    try:
        return run(cfg, nexus, db, db_url, args, run_dir, timeline, procs)
    finally:
        for p in procs:
            p.signal(signal.SIGKILL, wait=5)
        if not args.keep:
            try:
                psql(args.database_url, f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
            except RuntimeError as e:
                print(f"soak: could not drop {db}: {e}")


def run(cfg, nexus, db, db_url, args, run_dir, timeline, procs):
    keys = dict(l.split("=", 1) for l in subprocess.run([nexus, "keys", "generate"], capture_output=True,
                                                          text=True, check=True).stdout.split() if "=" in l)
    gateway_key = "gw_" + uuid.uuid4().hex + uuid.uuid4().hex
    hook = WebhookReceiver(keys["WEBHOOK_SECRET"])
    broker_ports = [free_port() for _ in range(cfg["brokers"])]
    lb = Balancer(broker_ports)
    base = f"http://127.0.0.1:{lb.port}"
    admin = {"x-api-key": keys["API_KEY"]}

    # The provider: short access tokens, rotation, strict reuse detection.
    peer_env = dict(os.environ, PORT="0", ACCESS_TOKEN_TTL=str(cfg["access_ttl"]),
                    REFRESH_ANSWER_DELAY_MS=str(args.provider_latency_ms),
                    CLIENTS=json.dumps([{
                        "client_id": "nexus", "client_secret": "nexus-secret",
                        "redirect_uris": [f"{base}/auth/callback"],
                        "token_endpoint_auth_method": "client_secret_post",
                        "grant_types": ["authorization_code", "refresh_token"], "response_types": ["code"],
                        "scope": f"openid email profile offline_access {SCOPE} calendar.write"}]))
    peer_log = open(os.path.join(run_dir, "provider.log"), "w")
    peer = subprocess.Popen(["node", "server.mjs"], cwd=PEER_DIR, env=peer_env, stdout=subprocess.PIPE,
                            stderr=peer_log, stdin=subprocess.DEVNULL, text=True)
    issuer = json.loads(peer.stdout.readline())["issuer"]

    redis_port = free_port()
    redis = Proc("redis", ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                           "--appendonly", "no"], dict(os.environ), run_dir)
    procs.append(redis)
    redis.start(wait=False)
    time.sleep(0.3)

    common = dict(os.environ, DATABASE_URL=db_url, ENCRYPTION_KEY=keys["ENCRYPTION_KEY"],
                  STATE_KEY=keys["STATE_KEY"], API_KEY=keys["API_KEY"], NEXUS_LOG="info")
    subprocess.run([nexus, "migrate"], env=common, check=True, capture_output=True, cwd=run_dir)
    brokers = []
    for i, port in enumerate(broker_ports):
        env = dict(common, BROKER_ADDR=f"127.0.0.1:{port}", BASE_URL=base, GATEWAY_API_KEY=gateway_key,
                   REDIS_URL=f"redis://127.0.0.1:{redis_port}", PROVIDER_TIMEOUT_SECS="2",
                   REFRESH_LEASE_SECS="5", REFRESH_COMMIT_GRACE_SECS="10", REFRESH_MARGIN_SECS="300",
                   REFRESH_JITTER_SECS="2", WEBHOOK_URL=hook.url, WEBHOOK_SECRET=keys["WEBHOOK_SECRET"],
                   EGRESS_ALLOWED_CIDRS="127.0.0.0/8", HANDSHAKE_STARTS_PER_MINUTE="100000",
                   MAX_PENDING_PER_WORKSPACE="100000", SHUTDOWN_GRACE_SECS="5")
        b = Proc(f"broker-{i}", [nexus, "broker"], env, run_dir, port, f"http://127.0.0.1:{port}/health")
        procs.append(b)
        brokers.append(b)
        b.start()
    gateways = []
    for i in range(cfg["gateways"]):
        port = free_port()
        env = dict(os.environ, BROKER_URL=base, BROKER_API_KEY=gateway_key, GATEWAY_ADDR=f"127.0.0.1:{port}",
                   NEXUS_LOG="info", SHUTDOWN_GRACE_SECS="5")
        g = Proc(f"gateway-{i}", [nexus, "gateway"], env, run_dir, port, f"http://127.0.0.1:{port}/health")
        procs.append(g)
        gateways.append(g)
        g.start()

    # Accounts: one provider registration per account (its login_hint picks
    # the person at the provider), several connections (grants) each.
    conns, account_of = [], {}
    for a in range(cfg["accounts"]):
        r = requests.post(f"{base}/providers", headers=admin, timeout=10, json={"profile": {
            "name": f"acct-{a}", "auth_type": "oauth2", "client_id": "nexus", "client_secret": "nexus-secret",
            "issuer": issuer, "enable_discovery": True, "scopes": ["openid", "email", SCOPE],
            "params": {"login_hint": f"user{a}"}}})
        assert r.status_code == 201, r.text
        for _ in range(cfg["per_account"]):
            spec = requests.post(f"{base}/auth/consent-spec", headers=admin, timeout=10, json={
                "workspace_id": f"ws-{a}", "provider_name": f"acct-{a}", "return_url": RETURN_URL}).json()
            browser = requests.Session()
            url = spec["authUrl"]
            for _ in range(10):
                r = browser.get(url, allow_redirects=False, timeout=10)
                nxt = urllib.parse.urljoin(url, r.headers["location"])
                if url.startswith(base):
                    break
                url = nxt
            q = dict(urllib.parse.parse_qsl(urllib.parse.urlparse(nxt).query))
            assert q.get("status") == "success", f"consent failed: {nxt}"
            conns.append(spec["connection_id"])
            account_of[spec["connection_id"]] = a
    c0 = requests.get(f"{base}/connections/{conns[-1]}", headers=admin, timeout=10).json()
    assert c0.get("identity", {}).get("sub") == f"user{cfg['accounts'] - 1}", f"login_hint not honoured: {c0}"
    agent = requests.post(f"{base}/agent-keys", headers=admin, timeout=10, json={
        "name": "soak", "workspaces": [f"ws-{a}" for a in range(cfg["accounts"])]}).json()["key"]
    timeline.add("connected", connections=len(conns), accounts=cfg["accounts"])

    gw_urls = [f"http://127.0.0.1:{g.port}" for g in gateways]
    load = Load(gw_urls, agent, issuer, conns, cfg["load_threads"], pace=0.02)
    metrics = {}  # (broker, incarnation) -> last scrape

    def sample():
        for p in procs:
            p.sample_rss()
        for b in brokers:
            if b.alive():
                m = scrape(f"http://127.0.0.1:{b.port}/metrics")
                if m:
                    metrics[(b.name, b.incarnation)] = m

    # Deliberate changes, a third of the way in: one account withdraws the
    # scope at the provider, one revokes its grants there, one connection is
    # revoked in Nexus.
    withdrawn, provider_revoked = 0, 1
    nexus_revoked = next(c for c in conns if account_of[c] not in (withdrawn, provider_revoked))

    def deliberate():
        requests.post(f"{issuer}/__admin/remove-scope", timeout=10,
                      json={"sub": f"user{withdrawn}", "client_id": "nexus", "scope": SCOPE})
        timeline.add("scope_withdrawn", account=withdrawn)
        requests.post(f"{issuer}/__admin/revoke-grant", timeout=10,
                      json={"sub": f"user{provider_revoked}", "client_id": "nexus"})
        timeline.add("provider_revoked", account=provider_revoked)
        r = requests.delete(f"{base}/connections/{nexus_revoked}", headers=admin, timeout=30)
        timeline.add("nexus_revoked", connection=nexus_revoked, status=r.status_code)

    db_down = []  # (start, end)

    def chaos_step():
        action = random.choices(
            ["kill_broker", "restart_broker", "kill_gateway", "db_outage", "redis_outage",
             "provider_unavailable", "provider_slow"],
            weights=[5, 2, 1, 1, 1, 1, 1])[0]
        if action == "kill_broker":
            b = random.choice([b for b in brokers if b.alive()] or brokers)
            b.signal(signal.SIGKILL)
            timeline.add("sigkill", process=b.name)
            time.sleep(random.uniform(0.5, 2.5))
            b.start()
            timeline.add("restarted", process=b.name)
        elif action == "restart_broker":
            b = random.choice(brokers)
            code = b.signal(signal.SIGTERM, wait=30)
            timeline.add("graceful_stop", process=b.name, exit=code)
            b.start()
            timeline.add("restarted", process=b.name)
        elif action == "kill_gateway":
            g = random.choice(gateways)
            g.signal(signal.SIGKILL)
            timeline.add("sigkill", process=g.name)
            time.sleep(random.uniform(0.5, 1.5))
            g.start()
            timeline.add("restarted", process=g.name)
        elif action == "db_outage":
            secs = random.uniform(2, 5)
            start = now()
            psql(args.database_url, f"ALTER DATABASE {db} ALLOW_CONNECTIONS false")
            psql(args.database_url, f"SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = '{db}'")
            timeline.add("db_down", seconds=round(secs, 1))
            time.sleep(secs)
            psql(args.database_url, f"ALTER DATABASE {db} ALLOW_CONNECTIONS true")
            db_down.append((start, now()))
            timeline.add("db_up")
        elif action == "redis_outage":
            redis.signal(signal.SIGKILL)
            timeline.add("sigkill", process="redis")
            time.sleep(random.uniform(2, 5))
            redis.start(wait=False)
            timeline.add("restarted", process="redis")
        elif action == "provider_unavailable":
            secs = random.uniform(3, 8)
            requests.post(f"{issuer}/__admin/faults", json={"unavailable_secs": secs}, timeout=5)
            timeline.add("provider_503", seconds=round(secs, 1))
        elif action == "provider_slow":
            secs = random.uniform(3, 8)
            requests.post(f"{issuer}/__admin/faults", json={"slow_secs": secs, "slow_ms": 3000}, timeout=5)
            timeline.add("provider_slow", seconds=round(secs, 1))

    # ---- the run
    sample()
    load.start()
    started = now()
    end = started + cfg["duration"]
    deliberate_at = started + cfg["duration"] / 3
    done_deliberate = False
    pause_at = started + 2 * cfg["duration"] / 3
    done_pause = False
    next_sample = now()
    while now() < end:
        if not done_deliberate and now() >= deliberate_at:
            deliberate()
            done_deliberate = True
        if not done_pause and now() >= pause_at:
            # The operator's kill switch for a few seconds.
            r = requests.post(f"{base}/admin/pause", headers=admin, json={"reason": "soak"}, timeout=30)
            timeline.add("paused", status=r.status_code)
            time.sleep(3)
            r = requests.delete(f"{base}/admin/pause", headers=admin, timeout=30)
            timeline.add("resumed", status=r.status_code)
            done_pause = True
        chaos_step()
        wait_until = min(end, now() + random.uniform(cfg["chaos_min"], cfg["chaos_max"]))
        while now() < wait_until:
            if now() >= next_sample:
                sample()
                next_sample = now() + 5
            time.sleep(0.2)
    if not done_deliberate:
        deliberate()
    load.finish()
    timeline.add("chaos_over")

    # ---- settle: everything up, faults off; every connection used once more
    requests.post(f"{issuer}/__admin/faults", json={"unavailable_secs": 0, "slow_secs": 0}, timeout=5)
    for p in procs:
        if not p.alive():
            p.start(wait=p.health is not None)
    time.sleep(cfg["access_ttl"])

    def judge(states):
        bad, interrupted, lost = [], [], []
        for c, s in states.items():
            a = account_of[c]
            status, code = s.get("status"), s.get("error_code")
            if c == nexus_revoked:
                if status != "revoked":
                    bad.append(f"{c}: revoked in Nexus but {status}")
            elif status == "attention_required" and code == "refresh_interrupted":
                # Counted whatever the account: a grant the provider
                # revoked later may have been lost to a replay first, and
                # that replay is in the provider's count.
                interrupted.append(c)
            elif a == provider_revoked:
                if status != "attention_required":
                    bad.append(f"{c}: grant revoked at the provider but {status} ({code})")
            elif a == withdrawn:
                if status != "degraded" or SCOPE not in (s.get("failing_scopes") or []):
                    bad.append(f"{c}: scope withdrawn at the provider but {status} {s.get('failing_scopes')}")
            elif status != "active":
                lost.append(c)
                bad.append(f"{c}: should be active, is {status} ({code}: {s.get('error_description')})")
        return bad, interrupted, lost

    # Until every connection shows where it should be, or the deadline: each
    # is used once (a 403 reported, a 401 refreshed) and refreshed by force
    # (a grant that died at the provider shows then). Retries scheduled after
    # the last faults may hold a refresh back for a while; a lost grant
    # never comes back, so it is still a violation at the deadline.
    session = requests.Session()
    deadline = now() + max(120, 6 * cfg["access_ttl"])
    rounds = 0
    while True:
        rounds += 1
        for c in conns:
            load.use(session, c)
        forced = {}
        for c in conns:
            r = requests.post(f"{base}/connections/{c}/refresh", headers=admin, timeout=30)
            forced[c] = r.status_code
        states = {c: requests.get(f"{base}/connections/{c}", headers=admin, timeout=10).json() for c in conns}
        violations, interrupted, lost = judge(states)
        if not violations or now() > deadline:
            break
        time.sleep(5)
    sample()
    timeline.add("settled", rounds=rounds, pending=len(violations))

    # ---- invariants
    stats = requests.get(f"{issuer}/__admin/stats", timeout=5).json()

    # Every replay the provider saw killed a grant; each must be one reported
    # as an interrupted refresh, and each of those must follow a SIGKILL of a
    # broker (the one cause no design can undo).
    # Counted by distinct token: a broker whose replay's refusal never
    # reached it (it had timed out) presents the same token again later.
    found = {}
    for c in interrupted:
        ev = requests.get(f"{base}/audit", headers=admin, timeout=10, params={
            "event_type": "connection.refresh_interrupted", "connection_id": c}).json().get("events", [])
        found[c] = ev[0] if ev else None
    # A connection of the account revoked at the provider, refused after the
    # revocation while an unanswered call was pending: the provider answers
    # a revoked grant as it answers a replay, so Nexus says "most likely
    # interrupted". The revocation explains it; it is not counted as a
    # replay (the provider's replay count says which it was).
    revoked_at = next((e["t"] for e in timeline.of("provider_revoked")), None)
    by_revocation = [c for c in interrupted if account_of[c] == provider_revoked and revoked_at
                     and found[c] and calendar.timegm(time.strptime(found[c]["occurred_at"][:19],
                                                                    "%Y-%m-%dT%H:%M:%S")) + 1 >= revoked_at]
    interrupted = [c for c in interrupted if c not in by_revocation]
    reuse = stats.get("refresh_token_reuse", 0)
    reuse_distinct = stats.get("refresh_token_reuse_distinct", reuse)
    if reuse_distinct > len(interrupted):
        violations.append(f"the provider saw {reuse_distinct} distinct refresh tokens replayed, only "
                          f"{len(interrupted)} connections report an interrupted refresh")
    kills = [e["t"] for e in timeline.of("sigkill") if e["process"].startswith("broker")]
    lost_answers = [t / 1000 for t in stats.get("refresh_answers_lost", [])]
    by_timeout = 0
    for c in interrupted:
        ev = [found[c]] if found[c] else []
        last_call = ev[0]["detail"].get("interrupted_refresh_started_at", 0) / 1000 if ev else 0
        detected = calendar.timegm(time.strptime(ev[0]["occurred_at"][:19], "%Y-%m-%dT%H:%M:%S")) + 1 \
            if ev else now()
        # The spent refresh token is the one the last committed refresh
        # stored: the call that spent it came after that commit. The intent
        # names only the latest call (a later attempt the provider refused
        # unprocessed, a 503, moves it), so the window starts at the last
        # success, or at the latest call when there was none.
        success = states[c].get("last_success_at")
        started_at = calendar.timegm(time.strptime(success[:19], "%Y-%m-%dT%H:%M:%S")) \
            if success else last_call
        # Between that and the latest call's answer (at most the provider
        # timeout later): a broker killed, or an answer the provider sent
        # into a closed connection (the broker had timed out).
        until = min(detected + 1, last_call + 3) if last_call else detected + 1
        if any(started_at - 1 <= k <= until for k in kills):
            continue
        if any(started_at - 1 <= t <= until for t in lost_answers):
            by_timeout += 1
            continue
        violations.append(f"{c}: interrupted refresh (last success {started_at:.3f}, latest call {last_call:.3f}, "
                          f"found {detected:.0f}) with no "
                          f"broker SIGKILL and no lost answer in between (graceful stops, database and provider "
                          f"faults must lose nothing)")

    # Webhooks: every event in the outbox delivered at least once, every
    # signature valid.
    deadline = now() + 90
    while True:
        outbox = set(psql(args.database_url, "SELECT id FROM webhook_messages", db=db).split())
        with hook.lock:
            got = set(hook.ids)
        missing = outbox - got
        if not missing or now() > deadline:
            break
        time.sleep(1)
    if missing:
        violations.append(f"{len(missing)} webhook events never delivered, e.g. {sorted(missing)[:3]}")
    if hook.bad:
        violations.append(f"{len(hook.bad)} webhook deliveries with a bad signature")

    # Issuance in the audit log: never more than was served. Fewer by what
    # the killed processes had counted but not yet written (a gateway
    # reports every second, a broker flushes every second).
    time.sleep(3)
    audited = int(psql(args.database_url, "SELECT COALESCE(SUM(CAST(CAST(detail AS json)->>'count' AS bigint)), 0) "
                       "FROM audit_events WHERE event_type = 'token.issued'", db=db) or 0)
    served = sum(1 for r in load.results if r[2] == 200) + load.refreshed
    forced_ok = sum(1 for v in forced.values() if v == 200) * rounds
    if audited > served + forced_ok:
        violations.append(f"the audit log counts {audited} tokens issued, only {served} were served "
                          f"(fetches and {load.refreshed} refreshes after a 401) "
                          f"(+ at most {forced_ok} forced refreshes)")

    # No token served after a revocation in Nexus (1 s allowance for the
    # change to reach every gateway cache).
    t_rev = next(e["t"] for e in timeline.of("nexus_revoked"))
    late = [r for r in load.results if r[1] == nexus_revoked and r[2] == 200 and r[0] > t_rev + 1.0]
    if late:
        violations.append(f"{len(late)} tokens served for {nexus_revoked} more than 1 s after its revocation")

    # Tokens the provider refused (401) though their connection was neither
    # revoked nor its grant lost: served expired or from a dead grant.
    # (The Nexus-revoked connection's grant is revoked at the provider too.)
    dead = set(interrupted) | {nexus_revoked} | {c for c in conns if account_of[c] == provider_revoked}
    bad_tokens = [r for r in load.rejected if r[1] not in dead]
    with open(os.path.join(run_dir, "rejected_tokens.json"), "w") as f:
        json.dump(load.rejected, f)

    # No token served while issuance was paused (1 s allowance both ways).
    paused = timeline.of("paused")
    resumed = timeline.of("resumed")
    during_pause = []
    if paused and resumed:
        p0, p1 = paused[0]["t"], resumed[0]["t"]
        # A request that started after the pause took effect and ended
        # before the resume: a token there is a violation.
        during_pause = [r for r in load.results if r[2] == 200 and r[0] > p0 + 1.0 and r[0] + r[3] < p1 - 0.2]
        if during_pause:
            violations.append(f"{len(during_pause)} tokens served while issuance was paused, e.g. {during_pause[:2]}")
        if paused[0].get("status") not in (200, 201) or resumed[0].get("status") not in (200, 204):
            violations.append(f"the pause or resume was refused: {paused[0]} {resumed[0]}")

    # Token fetches outside the database outages.
    pause_window = [(e["t"], r["t"]) for e, r in zip(paused, resumed)]

    def in_outage(t):
        return any(a - 0.5 <= t <= b + 6 for a, b in db_down) or any(a <= t <= b + 1 for a, b in pause_window)
    outside = [r for r in load.results if not in_outage(r[0]) and r[1] != nexus_revoked
               and account_of[r[1]] != provider_revoked]
    ok = [r for r in outside if r[2] == 200]
    lat = [r[3] for r in ok]
    errors = {}
    for r in outside:
        if r[2] != 200:
            errors[f"{r[2]} {r[4]}"] = errors.get(f"{r[2]} {r[4]}", 0) + 1

    windows = [(m.get('nexus_refresh_commit_window_seconds{quantile="0.5"}'),
                m.get('nexus_refresh_commit_window_seconds{quantile="0.99"}'),
                m.get("nexus_refresh_commit_window_seconds_count", 0)) for m in metrics.values()]
    windows = [w for w in windows if w[0] is not None]
    late_commits = sum(v for m in metrics.values() for k, v in m.items()
                       if k.startswith("nexus_refresh_late_commits_total") and 'outcome="stored"' in k)

    rss = []
    for p in procs:
        for inc, (first, last, t0, t1) in p.rss.items():
            if t1 - t0 >= 60:
                rss.append((f"{p.name}#{inc}", first, last, t1 - t0))

    kinds = {}
    for e in timeline.events:
        key = e["kind"] + (f" {e['process'].split('-')[0]}" if "process" in e else "")
        kinds[key] = kinds.get(key, 0) + 1

    rows = [
        ("connections", len(conns)),
        ("chaos actions", ", ".join(f"{k} ×{v}" for k, v in sorted(kinds.items()) if k not in ("connected", "chaos_over"))),
        ("refresh requests at the provider", stats["token_requests"]["refresh_token"]),
        ("refresh tokens replayed (provider): requests / distinct tokens", f"{reuse} / {reuse_distinct}"),
        ("grants lost to a SIGKILL mid-refresh (refresh_interrupted)", len(interrupted)),
        ("  and revoked-account grants refused after the revocation, labelled interrupted", len(by_revocation)),
        ("  of those, after an answer lost to a timeout (provider slower than PROVIDER_TIMEOUT_SECS)", by_timeout),
        ("answers the provider sent after the broker gave up", len(lost_answers)),
        ("broker SIGKILLs", len(kills)),
        ("grants lost otherwise", len(lost)),
        ("rotated tokens committed late (database away)", int(late_commits)),
        ("refresh window sent→durable p50 / p99 (per broker process, s)",
         f"{statistics.median([w[0] for w in windows]):.3f} / {max(w[1] for w in windows):.3f}" if windows else "n/a"),
        ("token fetches outside db outages and the pause", len(outside)),
        ("  success rate", f"{100 * len(ok) / max(1, len(outside)):.2f} %"),
        ("  p50 / p99 latency (ms)", f"{1000 * quantile(lat, 0.5):.1f} / {1000 * quantile(lat, 0.99):.1f}" if lat else "n/a"),
        ("  failures by answer", json.dumps(dict(sorted(errors.items(), key=lambda kv: -kv[1])[:8]))),
        ("tokens served (fetch and refresh 200s) / audited token.issued",
         f"{served} / {audited} ({served - audited:+d} unaudited; gateway SIGKILLs "
         f"{sum(1 for e in timeline.of('sigkill') if e['process'].startswith('gateway'))})"),
        ("tokens used at the provider", json.dumps(load.uses)),
        ("  refused (401) on a live grant", f"{len(bad_tokens)}, expires_in given: "
         f"{sorted({r[2] for r in bad_tokens}, key=str)[:10]}"),
        ("webhook events (outbox) / delivered ids / deliveries",
         f"{len(outbox)} / {len(got)} / {sum(v['deliveries'] for v in hook.ids.values())}"),
        ("database outages", f"{len(db_down)}, {sum(b - a for a, b in db_down):.1f} s in all"),
        ("tokens served during the operator pause", len(during_pause)),
        ("final forced refresh answers", json.dumps({str(k): list(forced.values()).count(k) for k in set(forced.values())})),
    ]
    for name, first, last, secs in rss:
        rows.append((f"RSS {name} ({secs:.0f} s)", f"{first / 1024:.1f} → {last / 1024:.1f} MiB"))
    width = max(len(r[0]) for r in rows)
    print("\n" + "-" * (width + 40))
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print("-" * (width + 40))
    report = {"profile": args.profile, "seed": args.seed, "config": cfg, "rows": rows, "violations": violations}
    with open(os.path.join(run_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)
    peer.terminate()
    if violations:
        print(f"\nsoak: {len(violations)} violation(s):")
        for v in violations:
            print(f"  - {v}")
        print(f"evidence: {run_dir}")
        return 1
    print("\nsoak: every invariant held")
    return 0


if __name__ == "__main__":
    sys.exit(main())
