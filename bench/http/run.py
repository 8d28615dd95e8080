#!/usr/bin/env python3
"""HTTP benchmark of the warm token fetch, with an external load generator.

wrk (its own process) drives keep-alive load against, in alternating rounds
of one run:

  bare         a bare axum 0.8 handler serving a ~1 KB token-shaped JSON body
               (crates/nexus-gateway/examples/bare.rs, same release profile):
               the ceiling;
  up-gateway   GET /v1/token/{id} on the gateway under `nexus up` (one process);
  up-broker    GET /connections/{id}/token on the broker of that `nexus up`;
  sep-gateway  GET /v1/token/{id} with `nexus broker` and `nexus gateway` as
               two processes;
  sep-broker   GET /connections/{id}/token on that separate broker.

For each wrk run it reports requests/s, p50 and p99 (wrk's figures), and the
server CPU per request, independent of the load generator: utime+stime of
the server process(es) from /proc/<pid>/stat before and after the run,
divided by the 2xx responses. Any non-2xx answer or socket error fails the
run, loudly. The CPU the rest of the machine used during each run (from
/proc/stat) is reported too; a run other processes disturbed is measured
again, after waiting for the machine to be quiet.

With --tls every server speaks HTTPS with the same development
certificates (`nexus certs dev`): bare through a plain tokio-rustls accept
loop, `nexus up --tls`, and the separate broker requiring the gateway's
client certificate (mutual TLS; sep-broker is then left out: wrk cannot
present a client certificate). With --rotate N the gateways' certificates
are then replaced on disk N times while wrk keeps fetching (kept-alive and
one-connection-per-request), checking that no request fails and that new
connections present the new certificate.

Python 3.11, standard library only. See README.md next to this file.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import ipaddress
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

TARGETS = ["bare", "up-gateway", "up-broker", "sep-gateway", "sep-broker"]
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Variables Nexus reads: never inherited from the caller's environment, so a
# developer's own settings cannot leak into the measured servers.
NEXUS_VARS = [
    "DATABASE_URL", "ENCRYPTION_KEY", "ENCRYPTION_KEYS", "STATE_KEY", "API_KEY",
    "BROKER_ADDR", "BROKER_URL", "BROKER_API_KEY", "GATEWAY_ADDR", "BASE_URL",
    "REDIRECT_PATH", "ALLOWED_RETURN_DOMAINS", "ALLOWED_CIDRS", "MAX_BODY_BYTES",
    "PROVIDER_TIMEOUT_SECS", "REDIS_URL", "REDIS_KEY_PREFIX", "REFRESH_MARGIN_SECS",
    "REFRESH_LEASE_SECS", "REFRESH_JITTER_SECS", "TOKEN_CACHE_CAPACITY",
    "REFRESH_WORKER", "WEBHOOK_URL", "WEBHOOK_SECRET", "NEXUS_ISSUANCE_PAUSED",
    "CORS_ALLOWED_ORIGINS", "METRICS_ALLOWED_CIDRS", "GATEWAY_CACHE_CAPACITY",
    "NEXUS_STATE_DIR", "NEXUS_LOG", "NEXUS_LOG_FORMAT", "RUST_LOG",
]

# wrk script: one precomputed request per connection id, taken in turn (each
# thread from its own offset); the figures printed as one JSON line at the end.
LUA = r"""
local paths = {%(paths)s}
local header_name = %(hname)s
local header_value = %(hvalue)s
local reqs = {}
local n = 0
local i = 0
local threads = 0

function setup(thread)
  thread:set("offset", threads * 37)
  threads = threads + 1
end

function init(args)
  for k, p in ipairs(paths) do
    reqs[k] = wrk.format("GET", p, {[header_name] = header_value})
  end
  n = #reqs
  i = (offset or 0) %% n
end

function request()
  i = i + 1
  if i > n then i = 1 end
  return reqs[i]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "NEXUS_BENCH {\"requests\":%%.0f,\"duration_us\":%%.0f,\"bytes\":%%.0f," ..
    "\"connect\":%%.0f,\"read\":%%.0f,\"write\":%%.0f,\"status\":%%.0f,\"timeout\":%%.0f," ..
    "\"p50_us\":%%.1f,\"p90_us\":%%.1f,\"p99_us\":%%.1f,\"mean_us\":%%.1f,\"max_us\":%%.1f}\n",
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max))
end
"""


def log(msg: str) -> None:
    print(msg, flush=True)


def loud(msg: str) -> None:
    bar = "!" * 78
    print(f"\n{bar}\n!! {msg}\n{bar}\n", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- processes


class Procs:
    """Every process this script started; all stopped by `stop_all`."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], env: dict, cwd: Path, logfile: Path,
              stdout=None) -> subprocess.Popen:
        out = open(logfile, "ab")
        p = subprocess.Popen(
            argv, env=env, cwd=cwd,
            stdout=stdout if stdout is not None else out, stderr=out,
            stdin=subprocess.DEVNULL,
            # Own session: a Ctrl-C at the terminal reaches this script, which
            # stops the servers itself, in order.
            start_new_session=True,
        )
        out.close()
        self.procs.append((name, p))
        return p

    def stop_all(self) -> None:
        for name, p in reversed(self.procs):
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        for name, p in reversed(self.procs):
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log(f"{name} (pid {p.pid}) did not stop on SIGTERM in time: SIGKILL")
                p.kill()
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    log(f"{name} (pid {p.pid}) still running after SIGKILL")
        self.procs.clear()


def cpu_ticks(pid: int) -> int:
    """utime + stime (clock ticks) of every thread of `pid`, from /proc."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read().decode()
    # The command name (field 2) may contain spaces: split after its ')'.
    rest = stat[stat.rindex(")") + 2:].split()
    return int(rest[11]) + int(rest[12])  # fields 14 (utime) and 15 (stime)


def machine_busy() -> float:
    """CPU seconds all CPUs spent busy since boot (user, nice, system, irq,
    softirq, steal), from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = v
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def wait_idle(limit: float, max_pct: float) -> float:
    """Waits (at most `limit` seconds) until the machine is quiet: less than
    `max_pct` % of all CPUs busy over one second (our servers idle between
    runs). Returns the last busy percentage seen."""
    deadline = time.monotonic() + limit
    said = False
    while True:
        b0, t0 = machine_busy(), time.monotonic()
        time.sleep(1.0)
        pct = 100 * (machine_busy() - b0) / ((time.monotonic() - t0) * (os.cpu_count() or 1))
        if pct < max_pct:
            return pct
        if time.monotonic() >= deadline:
            loud(f"the machine is still busy ({pct:.0f}% of the CPUs used by other processes) "
                 f"after waiting {limit:.0f} s: measuring anyway, figures will be noisy")
            return pct
        if not said:
            log(f"  machine busy ({pct:.0f}% of the CPUs used by other processes): waiting "
                f"up to {limit:.0f} s for it to quieten")
            said = True


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_loopback(host: str) -> None:
    try:
        ip = ipaddress.ip_address(host)
        ok = ip.version == 4 and ip.is_loopback
    except ValueError:
        ok = False
    if not ok:
        sys.exit(f"refusing to run against {host!r}: IPv4 loopback addresses only (127.0.0.0/8)")


# ---------------------------------------------------------------- HTTP client


# Trust for HTTPS targets: the CA file, and the client certificate a
# mutual-TLS broker wants (set by main with --tls).
TLS_CA: Path | None = None
TLS_CLIENT: tuple[Path, Path] | None = None


def tls_context(ca: Path | None = None, client: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca or TLS_CA))
    client = client or TLS_CLIENT
    if client:
        ctx.load_cert_chain(str(client[0]), str(client[1]))
    return ctx


def connect(u: urllib.parse.SplitResult, timeout: float) -> http.client.HTTPConnection:
    if u.scheme == "https":
        return http.client.HTTPSConnection(u.hostname, u.port, timeout=timeout,
                                           context=tls_context())
    return http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)


class Http:
    """A small keep-alive client for seeding and checks (loopback only)."""

    def __init__(self, base: str) -> None:
        u = urllib.parse.urlsplit(base)
        check_loopback(u.hostname or "")
        self.u = u
        self.conn = connect(u, 15)

    def call(self, method: str, path: str, headers: dict | None = None,
             body: object = None) -> tuple[int, bytes, dict]:
        data = None
        h = dict(headers or {})
        if body is not None:
            data = json.dumps(body).encode()
            h["Content-Type"] = "application/json"
        for attempt in range(2):
            try:
                self.conn.request(method, path, body=data, headers=h)
                r = self.conn.getresponse()
                return r.status, r.read(), {k.lower(): v for k, v in r.getheaders()}
            except (ConnectionError, http.client.HTTPException):
                self.conn.close()
                self.conn = connect(self.u, 15)
                if attempt == 1:
                    raise
        raise AssertionError("unreachable")

    def json(self, method: str, path: str, headers: dict | None = None,
             body: object = None, expect: tuple[int, ...] = (200, 201)) -> dict:
        status, raw, _ = self.call(method, path, headers, body)
        if status not in expect:
            raise RuntimeError(f"{method} {path}: HTTP {status}: {raw[:300]!r}")
        return json.loads(raw) if raw else {}

    def close(self) -> None:
        self.conn.close()


def wait_ready(url: str, proc: subprocess.Popen, logfile: Path, timeout: float = 60) -> None:
    """Polls GET url until it answers 200 (bounded)."""
    u = urllib.parse.urlsplit(url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited ({proc.returncode}) before it was ready; "
                               f"log {logfile}:\n{tail(logfile)}")
        try:
            c = connect(u, 2)
            c.request("GET", u.path or "/")
            if c.getresponse().status == 200:
                c.close()
                return
            c.close()
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout:.0f} s; log {logfile}:\n{tail(logfile)}")


def tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def read_line(proc: subprocess.Popen, prefix: str, timeout: float = 30) -> str:
    """The first stdout line of `proc` starting with prefix (bounded wait)."""
    import selectors
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    buf = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                break
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            buf += chunk
            complete = buf[: buf.rfind(b"\n") + 1]  # whole lines only
            for line in complete.decode(errors="replace").splitlines():
                if line.startswith(prefix):
                    return line[len(prefix):].strip()
    finally:
        sel.close()
    raise RuntimeError(f"{proc.args[0]}: no '{prefix}' line within {timeout:.0f} s "
                       f"(exit {proc.poll()}): {buf[-500:]!r}")


# ---------------------------------------------------------------- setup


def ensure_wrk() -> str:
    wrk = shutil.which("wrk")
    if wrk:
        return wrk
    log("wrk is missing: installing it from the distribution (apt-get install -y wrk)")
    sudo = [] if os.geteuid() == 0 else (["sudo", "-n"] if shutil.which("sudo") else [])
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    r = subprocess.run(sudo + ["apt-get", "install", "-y", "wrk"], env=env)
    if r.returncode != 0:
        log("apt-get install failed: running apt-get update first, then installing again")
        subprocess.run(sudo + ["apt-get", "update"], env=env, check=True)
        subprocess.run(sudo + ["apt-get", "install", "-y", "wrk"], env=env, check=True)
    wrk = shutil.which("wrk")
    if not wrk:
        sys.exit("wrk is still missing after apt-get install; install it (or put it on PATH)")
    log(f"installed {wrk}")
    return wrk


def build(repo: Path, target_dir: Path) -> None:
    for argv in (
        ["cargo", "build", "--release", "-p", "nexus-cli", "--target-dir", str(target_dir)],
        ["cargo", "build", "--release", "-p", "nexus-gateway", "--example", "bare",
         "--target-dir", str(target_dir)],
    ):
        log(f"$ (cd {repo} && {shlex.join(argv)})")
        subprocess.run(argv, cwd=repo, check=True)


def git_commit(repo: Path) -> str:
    try:
        rev = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], check=True,
                             capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain",
                                "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return rev + (" (+ uncommitted changes to tracked files)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in NEXUS_VARS}
    env["NEXUS_LOG"] = "warn"
    env.update(extra)
    return env


def env_file_values(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            k, v = line.split("=", 1)
            out.setdefault(k.strip(), []).append(v.strip())
    return out


def seed(broker: str, api_key: str, count: int) -> list[str]:
    """A static api_key provider and `count` connections of workspace
    `bench`, connected through the hosted capture (consent-spec, then the
    JSON submit), as the in-process benches do. Returns the connection ids."""
    h = Http(broker)
    admin = {"X-API-Key": api_key}
    h.json("POST", "/providers", admin, {"profile": {
        "name": "weather", "auth_type": "api_key",
        "params": {
            "credential_schema": {"type": "object", "required": ["api_key"],
                                  "properties": {"api_key": {"type": "string"}}},
            "strategy": {"type": "header",
                         "config": {"header_name": "X-Api-Key", "credential_field": "api_key"}},
        },
    }}, expect=(201,))
    ids = []
    for i in range(count):
        spec = h.json("POST", "/auth/consent-spec", admin, {
            "workspace_id": "bench", "provider_name": "weather",
            "return_url": "http://localhost/done"})
        h.json("POST", "/auth/capture-credential", {}, {
            "state": spec["state"],
            "credentials": {"api_key": f"weather-key-{i:04}-" + "x" * 40}},
            expect=tuple(range(200, 300)))
        ids.append(spec["connection_id"])
    h.close()
    return ids


@dataclass
class Target:
    name: str
    url: str                      # base URL
    prefix: str                   # path before the connection id
    header: tuple[str, str]       # auth header sent on every request
    pids: dict[str, int]          # server processes whose CPU is counted
    ids: list[str] = field(default_factory=list)
    lua: Path | None = None
    body_bytes: int = 0
    # With --tls: the certificate and key files this target serves (rotated
    # by --rotate).
    certs: tuple[Path, Path] | None = None


def start_bare(procs: Procs, bins: dict, host: str, tmp: Path, bare_bytes: int,
               certs: Path | None) -> Target:
    logf = tmp / "bare.log"
    argv = [str(bins["bare"]), f"{host}:0", str(bare_bytes)]
    if certs:  # the gateway's certificate, as the gateway targets serve
        argv += ["tls", str(certs / "gateway.pem"), str(certs / "gateway-key.pem")]
    p = procs.start("bare", argv, clean_env(), tmp, logf, stdout=subprocess.PIPE)
    addr = read_line(p, "listening on ")
    scheme = "https" if certs else "http"
    return Target("bare", f"{scheme}://{addr}", "/v1/token/", ("Authorization", "Bearer none"),
                  {"bare": p.pid})


def start_up(procs: Procs, bins: dict, host: str, tmp: Path, count: int,
             tls: bool) -> list[Target]:
    state = tmp / "up-state"
    bport, gport = free_port(host), free_port(host)
    scheme = "https" if tls else "http"
    broker, gateway = f"{scheme}://{host}:{bport}", f"{scheme}://{host}:{gport}"
    logf = tmp / "up.log"
    # Seeding starts --ids handshakes in one workspace: lift the per-minute limit.
    # With --tls, `nexus up` uses the certificates already in state/certs.
    argv = [str(bins["nexus"]), "up", "--state-dir", str(state),
            "--handshake-starts-per-minute", "1000000",
            "--broker-addr", f"{host}:{bport}", "--gateway-addr", f"{host}:{gport}"]
    if tls:
        argv.append("--tls")
    log(f"$ NEXUS_LOG=warn {shlex.join(argv)}")
    p = procs.start("nexus up", argv, clean_env(), tmp, logf)
    wait_ready(broker + "/health", p, logf)
    wait_ready(gateway + "/health", p, logf)
    env = env_file_values(state / "nexus.env")
    api_key, agent_key = env["API_KEY"][-1], env["AGENT_KEY"][-1]
    ids = seed(broker, api_key, count)
    pids = {"nexus up": p.pid}
    up_gateway = Target("up-gateway", gateway, "/v1/token/",
                        ("Authorization", f"Bearer {agent_key}"), pids, ids)
    up_gateway.certs = (state / "certs" / "gateway.pem", state / "certs" / "gateway-key.pem")
    return [
        up_gateway,
        Target("up-broker", broker, "/connections/", ("X-API-Key", api_key), pids, ids),
    ]


def start_separate(procs: Procs, bins: dict, host: str, tmp: Path, count: int,
                   certs: Path | None) -> list[Target]:
    keys = {}
    out = subprocess.run([str(bins["nexus"]), "keys", "generate"], env=clean_env(), cwd=tmp,
                         check=True, capture_output=True, text=True).stdout
    for line in out.splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            keys[k] = v
    bport, gport = free_port(host), free_port(host)
    scheme = "https" if certs else "http"
    broker, gateway = f"{scheme}://{host}:{bport}", f"{scheme}://{host}:{gport}"
    db = tmp / "sep-broker.db"
    broker_tls: dict[str, str] = {}
    gateway_tls: dict[str, str] = {}
    if certs:
        # Copies, so that rotating this gateway's pair leaves `nexus up`'s alone.
        own = tmp / "sep-certs"
        shutil.copytree(certs, own)
        broker_tls = {
            "TLS_CERT_FILE": str(own / "broker.pem"), "TLS_KEY_FILE": str(own / "broker-key.pem"),
            "BROKER_CLIENT_CA_FILE": str(own / "ca.pem"),
            "BROKER_CLIENT_IDS": "spiffe://nexus.local/nexus/gateway",
        }
        gateway_tls = {
            "TLS_CERT_FILE": str(own / "gateway.pem"),
            "TLS_KEY_FILE": str(own / "gateway-key.pem"),
            "BROKER_CA_FILE": str(own / "ca.pem"),
            "BROKER_CLIENT_CERT_FILE": str(own / "gateway-client.pem"),
            "BROKER_CLIENT_KEY_FILE": str(own / "gateway-client-key.pem"),
        }
    blog, glog = tmp / "sep-broker.log", tmp / "sep-gateway.log"
    log(f"$ DATABASE_URL=sqlite:{db} ENCRYPTION_KEY=… STATE_KEY=… API_KEY=… "
        f"BROKER_ADDR={host}:{bport} NEXUS_LOG=warn {bins['nexus']} broker")
    b = procs.start("nexus broker", [str(bins["nexus"]), "broker"], clean_env(
        DATABASE_URL=f"sqlite:{db}", ENCRYPTION_KEY=keys["ENCRYPTION_KEY"],
        STATE_KEY=keys["STATE_KEY"], API_KEY=keys["API_KEY"], BROKER_ADDR=f"{host}:{bport}",
        HANDSHAKE_STARTS_PER_MINUTE="1000000", **broker_tls,
    ), tmp, blog)
    wait_ready(broker + "/health", b, blog)
    ids = seed(broker, keys["API_KEY"], count)
    h = Http(broker)
    agent_key = h.json("POST", "/agent-keys", {"X-API-Key": keys["API_KEY"]},
                       {"name": "bench", "workspaces": ["*"]}, expect=(201,))["key"]
    h.close()
    log(f"$ BROKER_URL={broker} BROKER_API_KEY=… GATEWAY_ADDR={host}:{gport} NEXUS_LOG=warn "
        f"{bins['nexus']} gateway")
    g = procs.start("nexus gateway", [str(bins["nexus"]), "gateway"], clean_env(
        BROKER_URL=broker, BROKER_API_KEY=keys["API_KEY"], GATEWAY_ADDR=f"{host}:{gport}",
        **gateway_tls,
    ), tmp, glog)
    wait_ready(gateway + "/health", g, glog)
    sep_gateway = Target("sep-gateway", gateway, "/v1/token/",
                         ("Authorization", f"Bearer {agent_key}"),
                         {"broker": b.pid, "gateway": g.pid}, ids)
    if certs:
        sep_gateway.certs = (Path(gateway_tls["TLS_CERT_FILE"]),
                             Path(gateway_tls["TLS_KEY_FILE"]))
    return [
        sep_gateway,
        Target("sep-broker", broker, "/connections/", ("X-API-Key", keys["API_KEY"]),
               {"broker": b.pid}, ids),
    ]


def paths_of(t: Target, ids: list[str]) -> list[str]:
    suffix = "/token" if t.name.endswith("broker") else ""
    return [f"{t.prefix}{i}{suffix}" for i in ids]


def prepare(t: Target, ids: list[str], tmp: Path) -> None:
    """Checks every path answers 200 with JSON (this also fills the caches)
    and writes the target's wrk script (mode 0600: it holds a key)."""
    if not t.ids:
        t.ids = ids
    paths = paths_of(t, t.ids)
    h = Http(t.url)
    for p in paths:
        status, raw, headers = h.call("GET", p, {t.header[0]: t.header[1]})
        if status != 200:
            raise RuntimeError(f"{t.name}: GET {p} answered {status}: {raw[:300]!r}")
        json.loads(raw)
        t.body_bytes = len(raw)
    h.close()
    lua = LUA % {
        "paths": ", ".join(json.dumps(p) for p in paths),
        "hname": json.dumps(t.header[0]),
        "hvalue": json.dumps(t.header[1]),
    }
    t.lua = tmp / f"{t.name}.lua"
    fd = os.open(t.lua, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(lua)


# ---------------------------------------------------------------- measuring


def wrk_argv(wrk: str, t: Target, threads: int, conns: int, secs: float) -> list[str]:
    return [wrk, f"-t{threads}", f"-c{conns}", f"-d{secs:g}s", "--latency", "-s", str(t.lua),
            t.url + paths_of(t, t.ids[:1])[0]]


def parse_wrk(out: str) -> dict:
    m = re.search(r"^NEXUS_BENCH (\{.*\})$", out, re.M)
    if not m:
        raise RuntimeError(f"no figures in wrk's output:\n{out}")
    f = json.loads(m.group(1))
    # Cross-check against the human-readable lines.
    m = re.search(r"^\s*(\d+) requests in", out, re.M)
    if m and int(m.group(1)) != int(f["requests"]):
        raise RuntimeError(f"wrk's request counts disagree:\n{out}")
    m = re.search(r"Requests/sec:\s*([\d.]+)", out)
    f["rps_text"] = float(m.group(1)) if m else None
    return f


def run_wrk(wrk: str, t: Target, threads: int, conns: int, secs: float) -> dict:
    argv = wrk_argv(wrk, t, threads, conns, secs)
    for pid in t.pids.values():
        if not os.path.exists(f"/proc/{pid}"):
            raise RuntimeError(f"{t.name}: server process {pid} is gone")
    before = {n: cpu_ticks(pid) for n, pid in t.pids.items()}
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy0 = machine_busy()
    p = subprocess.run(argv, capture_output=True, text=True, timeout=secs + 60)
    busy1 = machine_busy()
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    after = {n: cpu_ticks(pid) for n, pid in t.pids.items()}
    if p.returncode != 0:
        raise RuntimeError(f"wrk failed ({p.returncode}): {p.stderr}\n{p.stdout}")
    f = parse_wrk(p.stdout)
    errors = {k: int(f[k]) for k in ("connect", "read", "write", "timeout", "status")}
    ok = int(f["requests"]) - errors["status"]
    cpu = {n: (after[n] - before[n]) / CLK_TCK for n in t.pids}
    total = sum(cpu.values())
    wrk_cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    # CPU used by anything but the measured servers and wrk during the run
    # (other processes, idle targets, the kernel for others): noise.
    other = (busy1 - busy0) - total - wrk_cpu
    other_pct = 100 * max(0.0, other) / ((os.cpu_count() or 1) * f["duration_us"] / 1e6)
    return {
        "target": t.name,
        "requests": int(f["requests"]),
        "ok": ok,
        "errors": errors,
        "failed": any(errors.values()) or ok <= 0,
        "duration_s": f["duration_us"] / 1e6,
        "rps": ok / (f["duration_us"] / 1e6),
        "p50_ms": f["p50_us"] / 1000,
        "p90_ms": f["p90_us"] / 1000,
        "p99_ms": f["p99_us"] / 1000,
        "mean_ms": f["mean_us"] / 1000,
        "max_ms": f["max_us"] / 1000,
        "server_cpu_s": cpu,
        "cpu_us_per_req": total * 1e6 / ok if ok > 0 else float("nan"),
        "wrk_cpu_us_per_req": wrk_cpu * 1e6 / ok if ok > 0 else float("nan"),
        "other_cpu_pct": other_pct,
        "wrk_stdout": p.stdout,
    }


def fmt_row(cols: list, widths: list[int]) -> str:
    return "  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                     for i, (c, w) in enumerate(zip(cols, widths)))


def report(results: list[dict], names: list[str], label: str) -> dict:
    summary = {}
    for n in names:
        good = [r for r in results if r["target"] == n and not r["failed"]]
        if not good:
            summary[n] = None
            continue
        summary[n] = {
            "rounds": len(good),
            "rps": statistics.median(r["rps"] for r in good),
            "p50_ms": statistics.median(r["p50_ms"] for r in good),
            "p99_ms": statistics.median(r["p99_ms"] for r in good),
            "cpu_us_per_req": statistics.median(r["cpu_us_per_req"] for r in good),
            "wrk_cpu_us_per_req": statistics.median(r["wrk_cpu_us_per_req"] for r in good),
        }
    base = summary.get("bare")
    widths = [12, 9, 8, 8, 8, 9, 10, 9, 10, 6]
    log(f"\n== {label}: medians over rounds (ratios are of the medians, vs bare)")
    log(fmt_row(["target", "req/s", "% bare", "p50 ms", "p99 ms", "p99 ×bare",
                 "CPU µs/req", "CPU ×bare", "wrk µs/req", "rounds"], widths))
    for n in names:
        s = summary[n]
        if s is None:
            log(fmt_row([n, "FAILED", "", "", "", "", "", "", "", 0], widths))
            continue
        if base:
            s["rps_pct_of_bare"] = 100 * s["rps"] / base["rps"]
            s["p99_x_bare"] = s["p99_ms"] / base["p99_ms"]
            s["cpu_x_bare"] = s["cpu_us_per_req"] / base["cpu_us_per_req"]
        log(fmt_row([
            n, f"{s['rps']:.0f}",
            f"{s['rps_pct_of_bare']:.1f}%" if base else "-",
            f"{s['p50_ms']:.3f}", f"{s['p99_ms']:.3f}",
            f"{s['p99_x_bare']:.2f}×" if base else "-",
            f"{s['cpu_us_per_req']:.1f}",
            f"{s['cpu_x_bare']:.2f}×" if base else "-",
            f"{s['wrk_cpu_us_per_req']:.1f}", s["rounds"],
        ], widths))
    return summary


def print_raw(results: list[dict]) -> None:
    log("\n-- each run (CPU split per server process; wrk µs/req is the load generator's own CPU)")
    widths = [6, 12, 9, 9, 8, 8, 10, 10, 7, 6]
    log(fmt_row(["round", "target", "2xx", "req/s", "p50 ms", "p99 ms", "CPU µs/req",
                 "wrk µs/req", "other%", "status"], widths) + "  server CPU s")
    for r in results:
        split = ", ".join(f"{n} {s:.2f}" for n, s in r["server_cpu_s"].items())
        status = "FAIL" if r["failed"] else ("noisy" if r.get("noisy") else "ok")
        log(fmt_row([r["round"], r["target"], r["ok"], f"{r['rps']:.0f}",
                     f"{r['p50_ms']:.3f}", f"{r['p99_ms']:.3f}",
                     f"{r['cpu_us_per_req']:.1f}", f"{r['wrk_cpu_us_per_req']:.1f}",
                     f"{r['other_cpu_pct']:.1f}", status],
                    widths) + f"  {split}"
            + (f"  errors {r['errors']}" if r["failed"] else ""))


# ---------------------------------------------------------------- rotation


def presented_cert(url: str, ca: Path) -> bytes:
    """The leaf certificate (DER) a new TLS connection to `url` gets,
    verified against `ca` for the address."""
    u = urllib.parse.urlsplit(url)
    ctx = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection((u.hostname, u.port), timeout=3) as raw:
        with ctx.wrap_socket(raw, server_hostname=u.hostname) as tls:
            return tls.getpeercert(binary_form=True) or b""


def replace_file(src: Path, dst: Path) -> None:
    """Replaces dst by a copy of src in one rename, as a secret volume or
    cert-manager update does (a reader never sees half a file)."""
    staged = dst.with_name(dst.name + ".new")
    shutil.copyfile(src, staged)
    os.chmod(staged, 0o600)
    os.replace(staged, dst)


def rotate_under_load(wrk: str, bins: dict, t: Target, tmp: Path, rotations: int,
                      every: float) -> dict:
    """Replaces t's certificate and key `rotations` times while two wrk
    processes fetch tokens: one on kept-alive connections, one opening a new
    connection (a new TLS handshake) per request. Each rotation but the last
    is announced with SIGHUP; the last is left to the file poll. After each,
    a new connection must present the new certificate, verified against its
    new CA. Any non-2xx answer or socket error fails it."""
    assert t.certs and t.lua
    close_lua = tmp / f"{t.name}-close.lua"
    text = t.lua.read_text()
    old = "{[header_name] = header_value}"
    assert old in text
    fd = os.open(close_lua, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text.replace(old, '{[header_name] = header_value, ["Connection"] = "close"}'))
    poll_wait = 15.0  # the servers look at the files every 10 s
    secs = 2 + (rotations - 1) * every + poll_wait + 3
    url = t.url + paths_of(t, t.ids[:1])[0]
    runs = {
        "kept-alive": subprocess.Popen(
            [wrk, "-t1", "-c8", f"-d{secs:.0f}s", "-s", str(t.lua), url],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
        "new connection per request": subprocess.Popen(
            [wrk, "-t1", "-c2", f"-d{secs:.0f}s", "-s", str(close_lua), url],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
    }
    hup_pids = [pid for n, pid in t.pids.items() if n != "broker"]
    took: list[float] = []
    ca = TLS_CA
    problems: list[str] = []
    try:
        time.sleep(2)
        for i in range(rotations):
            gen = tmp / f"rotation-{t.name}-{i}"
            subprocess.run([str(bins["nexus"]), "certs", "dev", "--state-dir", str(gen)],
                           env=clean_env(), check=True, capture_output=True)
            new_cert, new_key = gen / "certs" / "gateway.pem", gen / "certs" / "gateway-key.pem"
            want = ssl.PEM_cert_to_DER_cert(new_cert.read_text())
            ca = gen / "certs" / "ca.pem"
            # Key first, then certificate: a poll in between sees a mismatched
            # pair, which the server refuses while keeping the old one.
            replace_file(new_key, t.certs[1])
            replace_file(new_cert, t.certs[0])
            t0 = time.monotonic()
            hup = i < rotations - 1
            if hup:
                for pid in hup_pids:
                    os.kill(pid, signal.SIGHUP)
            deadline = t0 + (5 if hup else poll_wait)
            seen = None
            while time.monotonic() < deadline:
                try:
                    if presented_cert(t.url, gen / "certs" / "ca.pem") == want:
                        seen = time.monotonic() - t0
                        break
                except (OSError, ssl.SSLError):
                    pass  # still the old certificate (another CA)
                time.sleep(0.05)
            how = "SIGHUP" if hup else "file poll"
            if seen is None:
                problems.append(f"rotation {i + 1} ({how}): new connections did not get the new "
                                f"certificate within {deadline - t0:.0f} s")
            else:
                took.append(seen)
                log(f"  {t.name}: rotation {i + 1} ({how}): new certificate presented "
                    f"after {seen:.2f} s")
            if hup:
                time.sleep(every)
    finally:
        outs = {}
        for name, p in runs.items():
            try:
                out, err = p.communicate(timeout=secs + 60)
            except subprocess.TimeoutExpired:
                p.kill()
                out, err = p.communicate()
            outs[name] = (p.returncode, out, err)
    figures = {}
    for name, (rc, out, err) in outs.items():
        if rc != 0:
            problems.append(f"wrk ({name}) failed ({rc}): {err}")
            continue
        f = parse_wrk(out)
        errors = {k: int(f[k]) for k in ("connect", "read", "write", "timeout", "status")}
        figures[name] = {"requests": int(f["requests"]), "errors": errors,
                         "p99_ms": f["p99_us"] / 1000}
        if any(errors.values()) or int(f["requests"]) == 0:
            problems.append(f"wrk ({name}): {int(f['requests'])} requests, errors {errors}")
    # The server's own count of reloads (its certificate is now the last one).
    u = urllib.parse.urlsplit(t.url)
    c = http.client.HTTPSConnection(u.hostname, u.port, timeout=10, context=tls_context(ca))
    c.request("GET", "/metrics")
    reloads = [line for line in c.getresponse().read().decode(errors="replace").splitlines()
               if line.startswith("nexus_tls_reloads_total")]
    c.close()
    return {"target": t.name, "rotations": rotations, "took_s": took, "wrk": figures,
            "reloads": reloads, "problems": problems}


# ---------------------------------------------------------------- main


def main() -> int:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(
        description="Warm token fetch under wrk: bare axum vs Nexus (gateway and broker).")
    ap.add_argument("--repo", type=Path, default=here.parent.parent,
                    help="repository to build and measure (default: the one holding this script)")
    ap.add_argument("--target-dir", type=Path, help="cargo target dir (default: REPO/target)")
    ap.add_argument("--no-build", action="store_true", help="use the binaries already built")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="wrk -t")
    ap.add_argument("--connections", type=int, default=64, help="wrk -c")
    ap.add_argument("--duration", type=float, default=6, help="wrk -d, seconds")
    ap.add_argument("--warmup", type=float, default=3,
                    help="seconds of wrk per target before the first round")
    ap.add_argument("--ids", type=int, default=100, help="connections seeded and spread over")
    ap.add_argument("--only", default=",".join(TARGETS),
                    help=f"comma-separated targets (default all: {','.join(TARGETS)})")
    ap.add_argument("--bare-bytes", type=int, default=1024,
                    help="size of the bare handler's JSON body (Nexus's answers here: ~360)")
    ap.add_argument("--host", default="127.0.0.1",
                    help="IPv4 loopback address the servers listen on (127.0.0.0/8 only)")
    ap.add_argument("--wait-idle", type=float, default=120, metavar="SECONDS",
                    help="before each run, wait up to this long for other processes to leave "
                         "the CPUs idle (default 120)")
    ap.add_argument("--max-other", type=float, default=5, metavar="PERCENT",
                    help="a run during which other processes used more than this share of "
                         "all CPUs is noisy: measured again (default 5)")
    ap.add_argument("--retries", type=int, default=2, help="re-measurements of a noisy run")
    ap.add_argument("--json", type=Path, help="write every figure to this file")
    ap.add_argument("--serve-only", type=float, metavar="SECONDS",
                    help="start, seed and warm the targets, print how to load them, keep them "
                         "up this long (for profilers), then stop; no measuring")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temporary state and logs")
    ap.add_argument("--tls", action="store_true",
                    help="every server on HTTPS with `nexus certs dev` certificates; the separate "
                         "broker requires the gateway's client certificate (sep-broker left out)")
    ap.add_argument("--rotate", type=int, default=0, metavar="N",
                    help="with --tls, after the rounds: replace each gateway's certificate N "
                         "times under load (SIGHUP, the last by the file poll); 0: skip")
    ap.add_argument("--rotate-every", type=float, default=3, metavar="SECONDS")
    args = ap.parse_args()

    check_loopback(args.host)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in TARGETS]
    if unknown or not names:
        sys.exit(f"unknown targets {unknown}; choose from {TARGETS}")
    names = [n for n in TARGETS if n in names]
    if args.tls and "sep-broker" in names:
        log("--tls: sep-broker left out (that broker requires a client certificate, "
            "which wrk cannot present)")
        names.remove("sep-broker")
        if not names:
            sys.exit("nothing left to measure")
    if args.rotate and not args.tls:
        sys.exit("--rotate needs --tls")
    if args.rounds < 1 or args.duration <= 0 or args.threads < 1 or args.connections < args.threads:
        sys.exit("need --rounds >= 1, --duration > 0, 1 <= --threads <= --connections")
    repo = args.repo.resolve()
    target_dir = (args.target_dir or repo / "target").resolve()

    # Ctrl-C, SIGTERM and SIGHUP all end in the `finally` below, which stops
    # everything (SIGINT set explicitly: a shell starts background jobs with
    # it ignored, and Python would then keep ignoring it).
    def on_signal(signum, frame):
        raise KeyboardInterrupt
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)

    cmdline = shlex.join([sys.executable, *sys.argv])
    commit = git_commit(repo)
    wrk = ensure_wrk()
    if not args.no_build:
        build(repo, target_dir)
    bins = {"nexus": target_dir / "release" / "nexus",
            "bare": target_dir / "release" / "examples" / "bare"}
    for n, b in bins.items():
        if n == "bare" and "bare" not in names:
            continue
        if not b.exists():
            sys.exit(f"{b} is missing: build it (drop --no-build)"
                     + (", and copy crates/nexus-gateway/examples/bare.rs into the measured "
                        "repository" if n == "bare" else ""))
    wrk_version = subprocess.run([wrk, "-v"], capture_output=True, text=True)
    wrk_version = (wrk_version.stdout + wrk_version.stderr).strip().splitlines()[0]

    log(f"command: {cmdline}")
    log(f"measured repository: {repo} at commit {commit}")
    log(f"binaries: {bins['nexus']}, {bins['bare']} (target dir {target_dir})")
    log(f"machine: {os.cpu_count()} CPUs, {platform.platform()}; {wrk_version}")

    tmp = Path(tempfile.mkdtemp(prefix="nexus-http-bench-"))
    procs = Procs()
    results: list[dict] = []
    rotations: list[dict] = []
    failed_any = False
    noisy_any = False
    try:
        certs = None
        if args.tls:
            # In `nexus up`'s state folder, which `up --tls` then uses as is.
            subprocess.run([str(bins["nexus"]), "certs", "dev", "--state-dir",
                            str(tmp / "up-state")], env=clean_env(), check=True,
                           capture_output=True)
            certs = tmp / "up-state" / "certs"
            global TLS_CA, TLS_CLIENT
            TLS_CA = certs / "ca.pem"
            TLS_CLIENT = (certs / "gateway-client.pem", certs / "gateway-client-key.pem")
            log(f"TLS: development certificates in {certs} (ECDSA P-256)")
        targets: dict[str, Target] = {}
        ids: list[str] = []
        if "bare" in names:
            targets["bare"] = start_bare(procs, bins, args.host, tmp, args.bare_bytes, certs)
        if any(n.startswith("up-") for n in names):
            for t in start_up(procs, bins, args.host, tmp, args.ids, args.tls):
                targets[t.name] = t
                ids = t.ids
        if any(n.startswith("sep-") for n in names):
            for t in start_separate(procs, bins, args.host, tmp, args.ids, certs):
                targets[t.name] = t
                ids = t.ids
        if not ids:  # bare alone: made-up ids spread the same way
            ids = [f"00000000-0000-4000-8000-{i:012d}" for i in range(args.ids)]
        for n in names:
            prepare(targets[n], ids, tmp)
        log("answer sizes (bytes of JSON body): "
            + ", ".join(f"{n} {targets[n].body_bytes}" for n in names))
        log("server processes: " + "; ".join(
            f"{n}: " + ", ".join(f"{k} pid {v}" for k, v in targets[n].pids.items())
            for n in names))

        if args.warmup > 0:
            for n in names:
                r = run_wrk(wrk, targets[n], args.threads, args.connections, args.warmup)
                log(f"warm-up {n}: {r['rps']:.0f} req/s"
                    + (f"  FAILED: errors {r['errors']}" if r["failed"] else ""))

        if args.serve_only is not None:
            log(f"\nserving for {args.serve_only:g} s (Ctrl-C stops earlier); load with:")
            for n in names:
                log(f"  {n:<12} {shlex.join(wrk_argv(wrk, targets[n], args.threads, args.connections, args.duration))}"
                    f"   # pids {targets[n].pids}")
            deadline = time.monotonic() + args.serve_only
            while time.monotonic() < deadline:
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
            return 0

        example = wrk_argv(wrk, targets[names[0]], args.threads, args.connections, args.duration)
        log(f"each run: {shlex.join(example)}  (script and URL per target)")
        for rnd in range(1, args.rounds + 1):
            for n in names:
                for attempt in range(args.retries + 1):
                    wait_idle(args.wait_idle, args.max_other)
                    r = run_wrk(wrk, targets[n], args.threads, args.connections, args.duration)
                    r["round"] = rnd
                    r["noisy"] = r["other_cpu_pct"] > args.max_other
                    log(f"round {rnd} {n:<12} {r['rps']:>9.0f} req/s  p50 {r['p50_ms']:.3f} ms  "
                        f"p99 {r['p99_ms']:.3f} ms  CPU {r['cpu_us_per_req']:.1f} µs/req  "
                        f"other CPU {r['other_cpu_pct']:.1f}%"
                        + ("  NOISY" if r["noisy"] else ""))
                    if not r["noisy"] or r["failed"]:
                        break
                    if attempt < args.retries:
                        log("  other processes used the CPUs during this run: measuring it again")
                results.append(r)
                if r["noisy"]:
                    noisy_any = True
                if r["failed"]:
                    failed_any = True
                    loud(f"FAILED RUN: round {rnd} {n}: {r['ok']} 2xx of {r['requests']}, "
                         f"errors {r['errors']} -- this run is excluded from the medians\n"
                         + r["wrk_stdout"])

        label = (f"wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s, "
                 f"{args.rounds} rounds, {'HTTPS' if args.tls else 'plain HTTP'}, "
                 f"commit {commit[:12]}")
        summary = report(results, names, label)
        print_raw(results)
        if args.rotate:
            log(f"\n== certificate rotation under load ({args.rotate} per gateway)")
            for n in names:
                t = targets[n]
                if not t.certs:
                    continue
                r = rotate_under_load(wrk, bins, t, tmp, args.rotate, args.rotate_every)
                rotations.append(r)
                for kind, f in r["wrk"].items():
                    log(f"  {n}: wrk {kind}: {f['requests']} requests, errors {f['errors']}, "
                        f"p99 {f['p99_ms']:.3f} ms")
                for line in r["reloads"]:
                    log(f"  {n}: {line}")
                if r["problems"]:
                    failed_any = True
                    loud(f"ROTATION FAILED ({n}): " + "; ".join(r["problems"]))
                else:
                    log(f"  {n}: {args.rotate} rotations, 0 failed requests, new certificate "
                        f"seen after {max(r['took_s']):.2f} s at most")
        if failed_any:
            loud("SOME RUNS FAILED (non-2xx answers or socket errors): see above")
        if noisy_any:
            loud(f"SOME RUNS WERE NOISY (other processes used more than {args.max_other:g}% of "
                 "the CPUs during them, even after retries): marked 'noisy' above; "
                 "their figures are in the medians")
        if args.json:
            args.json.write_text(json.dumps({
                "command": cmdline,
                "repo": str(repo),
                "commit": commit,
                "when": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                            "wrk": wrk_version, "clk_tck": CLK_TCK},
                "wrk": {"threads": args.threads, "connections": args.connections,
                        "duration_s": args.duration, "warmup_s": args.warmup},
                "rounds": args.rounds,
                "targets": names,
                "body_bytes": {n: targets[n].body_bytes for n in names},
                "summary": summary,
                "runs": [{k: v for k, v in r.items() if k != "wrk_stdout"} for r in results],
                "tls": args.tls,
                "rotations": rotations,
                "failed": failed_any,
                "noisy": noisy_any,
            }, indent=2) + "\n")
            log(f"\nwrote {args.json}")
        return 1 if failed_any else 0
    except KeyboardInterrupt:
        log("\ninterrupted: stopping every process this script started")
        return 130
    except Exception:
        log(f"\nerror; logs kept in {tmp}")
        args.keep_tmp = True
        raise
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        procs.stop_all()
        if args.keep_tmp:
            log(f"temporary state and logs: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
