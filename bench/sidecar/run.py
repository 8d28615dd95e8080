#!/usr/bin/env python3
"""The sidecar against nginx, proxying the same loopback upstream with a
static credential header, under the same external load generator (wrk, its
own process), in alternating rounds of one run:

  direct   wrk -> upstream                       (the floor: no proxy at all)
  sidecar  wrk -> `nexus sidecar` -> upstream    (header strategy, credential
                                                  from the gateway of a `nexus up`)
  nginx    wrk -> nginx (proxy_pass, keep-alive upstream, proxy_set_header) -> upstream
  floor    wrk -> examples/hyper_proxy -> upstream   (the sidecar's worker model, server
                                                  and upstream pool with none of its work:
                                                  what hyper itself costs)

The upstream is the bare axum handler of the HTTP benchmark
(crates/nexus-gateway/examples/bare.rs, a 1 KB JSON body). For each target:
requests/s, p50 and p99 (wrk's figures), the proxy's CPU per request
(utime+stime from /proc of the proxy's processes: the sidecar, or nginx's
master and workers; the upstream's CPU is the same for both and not
counted), and the latency a proxy adds over `direct`. Any non-2xx answer or
socket error fails the run. nginx comes from Debian (`apt-get install -y
nginx` if missing, said out loud); it runs with `worker_processes` equal to
the sidecar's worker threads (the CPU count).

Then, with --upload-gib N (default 1), N GiB are streamed through the
sidecar to the upstream's sink (curl from Debian, --upload-file from a
pipe) while the sidecar's resident memory is sampled: the peak is reported
next to the idle figure.

Python 3.11, standard library only; reuses bench/http/run.py's helpers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "http"))
import run as hb  # noqa: E402  (the HTTP benchmark's helpers)


def ensure_nginx() -> str:
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if nginx:
        return nginx
    hb.log("nginx is missing: installing it from the distribution (apt-get install -y nginx-light or nginx)")
    sudo = [] if os.geteuid() == 0 else (["sudo", "-n"] if shutil.which("sudo") else [])
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if subprocess.run(sudo + ["apt-get", "install", "-y", "nginx"], env=env).returncode != 0:
        subprocess.run(sudo + ["apt-get", "update"], env=env, check=True)
        subprocess.run(sudo + ["apt-get", "install", "-y", "nginx"], env=env, check=True)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(nginx):
        sys.exit("nginx is still missing after apt-get install")
    return nginx


NGINX_CONF = """
worker_processes %(workers)d;
pid %(tmp)s/nginx.pid;
error_log %(tmp)s/nginx-error.log warn;
daemon off;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path %(tmp)s/nginx-body;
  proxy_temp_path %(tmp)s/nginx-proxy;
  fastcgi_temp_path %(tmp)s/nginx-fastcgi;
  uwsgi_temp_path %(tmp)s/nginx-uwsgi;
  scgi_temp_path %(tmp)s/nginx-scgi;
  upstream up { server %(upstream)s; keepalive 128; }
  server {
    listen %(listen)s;
    location /api/ {
      proxy_pass http://up/v1/token/;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "";
      proxy_set_header X-Api-Key "%(key)s";
    }
  }
}
"""


def nginx_pids(master: int) -> dict[str, int]:
    """nginx's master and its workers (their CPU is not in the master's)."""
    pids = {"nginx master": master}
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(master)], capture_output=True, text=True).stdout
    for i, pid in enumerate(out.split()):
        pids[f"nginx worker {i}"] = int(pid)
    return pids


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except FileNotFoundError:
        raise RuntimeError(f"process {pid} is gone")
    return 0


def upload(sidecar_url: str, conn_path: str, gib: float, pid: int) -> dict:
    """Streams `gib` GiB through the sidecar (curl, chunked from a pipe) while
    sampling the sidecar's resident memory."""
    curl = shutil.which("curl")
    if not curl:
        return {"skipped": "curl is missing"}
    total = int(gib * (1 << 30))
    idle = rss_kib(pid)
    peak = [idle]
    done = threading.Event()

    gone = []

    def sample():
        while not done.is_set():
            try:
                peak[0] = max(peak[0], rss_kib(pid))
            except RuntimeError as e:
                gone.append(str(e))
                return
            time.sleep(0.02)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    started = time.monotonic()
    # The bare upstream answers any body on its token route; the sidecar
    # streams (the length is unknown: chunked, never kept for a replay).
    # -T - streams stdin chunked (--data-binary @- would read it all first).
    # The upstream answers the length it received; -w adds the status.
    p = subprocess.Popen([curl, "-sS", "-w", " %{http_code}",
                          "-X", "POST", "-T", "-", sidecar_url + conn_path],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    chunk = b"\0" * (1 << 20)
    sent = 0
    assert p.stdin is not None
    try:
        while sent < total:
            p.stdin.write(chunk)
            sent += len(chunk)
        p.stdin.close()
    except BrokenPipeError:
        pass
    assert p.stdout is not None
    out = p.stdout.read()
    p.wait(timeout=600)
    elapsed = time.monotonic() - started
    done.set()
    t.join()
    if gone:
        raise RuntimeError(f"the sidecar died during the upload: {gone[0]}")
    size, _, code = out.decode().rpartition(" ")
    if code != "200" or int(size or 0) != total:
        raise RuntimeError(f"the upload did not arrive whole: {out[:200]!r}")
    return {"status": code, "bytes_received_upstream": int(size), "seconds": round(elapsed, 2),
            "idle_rss_mib": idle / 1024, "peak_rss_mib": peak[0] / 1024}


def main() -> int:
    ap = argparse.ArgumentParser(description="nexus sidecar vs nginx under wrk, same upstream.")
    ap.add_argument("--repo", type=Path, default=HERE.parent.parent)
    ap.add_argument("--target-dir", type=Path)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="wrk -t")
    ap.add_argument("--connections", type=int, default=32, help="wrk -c")
    ap.add_argument("--duration", type=float, default=6, help="wrk -d, seconds")
    ap.add_argument("--upload-gib", type=float, default=1.0, help="GiB streamed for the memory check (0: none)")
    ap.add_argument("--workers", type=int, default=0,
                    help="sidecar SIDECAR_WORKERS and nginx worker_processes (default: the CPU count)")
    ap.add_argument("--host", default="127.0.0.1")
    args = ap.parse_args()
    hb.check_loopback(args.host)

    def on_signal(signum, frame):
        raise KeyboardInterrupt
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)

    repo = args.repo.resolve()
    target_dir = (args.target_dir or repo / "target").resolve()
    wrk = hb.ensure_wrk()
    nginx = ensure_nginx()
    if not args.no_build:
        hb.build(repo, target_dir)
        argv = ["cargo", "build", "--release", "-p", "nexus-sidecar", "--example", "hyper_proxy",
                "--target-dir", str(target_dir)]
        hb.log(f"$ (cd {repo} && {' '.join(argv)})")
        subprocess.run(argv, cwd=repo, check=True)
    bins = {"nexus": target_dir / "release" / "nexus", "bare": target_dir / "release" / "examples" / "bare",
            "floor": target_dir / "release" / "examples" / "hyper_proxy"}
    procs = hb.Procs()
    tmp = Path(tempfile.mkdtemp(prefix="nexus-sidecar-bench-"))
    host = args.host
    try:
        upstream = hb.start_bare(procs, bins, host, tmp, 1024, None)
        upstream_addr = upstream.url.removeprefix("http://")
        # A `nexus up` whose gateway hands the sidecar its credential.
        targets = hb.start_up(procs, bins, host, tmp, 1, False)
        gateway = targets[0]
        conn = gateway.ids[0]
        agent_key = gateway.header[1].removeprefix("Bearer ")
        routes = tmp / "routes.toml"
        routes.write_text(f'[routes.api]\nupstream = "{upstream.url}/v1/token"\nconnection = "{conn}"\n')
        sport = hb.free_port(host)
        workers = args.workers or os.cpu_count() or 1
        argv = [str(bins["nexus"]), "sidecar", "--gateway-url", gateway.url, "--sidecar-workers", str(workers),
                "--sidecar-addr", f"{host}:{sport}", "--sidecar-routes-file", str(routes)]
        hb.log(f"$ AGENT_KEY=... NEXUS_LOG=warn {' '.join(argv)}")
        sidecar = procs.start("sidecar", argv, hb.clean_env(AGENT_KEY=agent_key), tmp, tmp / "sidecar.log")
        hb.wait_ready(f"http://{host}:{sport}/_nexus/ready", sidecar, tmp / "sidecar.log")
        nport = hb.free_port(host)
        conf = tmp / "nginx.conf"
        conf.write_text(NGINX_CONF % {"workers": workers, "tmp": tmp, "upstream": upstream_addr,
                                      "listen": f"{host}:{nport}", "key": "weather-key-0000-" + "x" * 40})
        ng = procs.start("nginx", [nginx, "-c", str(conf), "-p", str(tmp)], hb.clean_env(), tmp, tmp / "nginx.log")
        time.sleep(0.5)
        hb.wait_ready(f"http://{host}:{nport}/api/{conn}", ng, tmp / "nginx-error.log")

        fl = procs.start("floor", [str(bins["floor"]), f"{host}:0", f"{upstream.url}/v1/token", str(workers)],
                         hb.clean_env(), tmp, tmp / "floor.log", stdout=subprocess.PIPE)
        floor_url = "http://" + hb.read_line(fl, "listening on ")
        hb.wait_ready(f"{floor_url}/api/{conn}", fl, tmp / "floor.log")

        head = ("X-Bench", "1")
        direct = hb.Target("direct", upstream.url, "/v1/token/", head, dict(upstream.pids), [conn])
        side = hb.Target("sidecar", f"http://{host}:{sport}", "/api/", head, {"sidecar": sidecar.pid}, [conn])
        ngx = hb.Target("nginx", f"http://{host}:{nport}", "/api/", head, nginx_pids(ng.pid), [conn])
        floor = hb.Target("floor", floor_url, "/api/", head, {"floor": fl.pid}, [conn])
        order = [direct, side, ngx, floor]
        for t in order:
            hb.prepare(t, [conn], tmp)
            hb.run_wrk(wrk, t, args.threads, args.connections, 2)  # warm-up
        results = []
        for rnd in range(1, args.rounds + 1):
            for t in (order if rnd % 2 else list(reversed(order))):
                hb.wait_idle(60, 5)
                r = hb.run_wrk(wrk, t, args.threads, args.connections, args.duration)
                r["round"] = rnd
                results.append(r)
                if r["failed"]:
                    hb.loud(f"{t.name}: errors {r['errors']}")
                hb.log(f"  round {rnd} {t.name:8} {r['rps']:9.0f} req/s  p50 {r['p50_ms']:.3f} ms  "
                       f"p99 {r['p99_ms']:.3f} ms  CPU {r['cpu_us_per_req']:.1f} µs/req")
        med = {}
        for t in order:
            good = [r for r in results if r["target"] == t.name and not r["failed"]]
            med[t.name] = {k: statistics.median(r[k] for r in good)
                           for k in ("rps", "p50_ms", "p99_ms", "cpu_us_per_req")} if good else None
        hb.log(f"\n== medians of {args.rounds} alternating rounds, {workers} proxy worker(s), wrk -t{args.threads} -c{args.connections} "
               f"-d{args.duration:g}s; commit {hb.git_commit(repo)}")
        for n, m in med.items():
            if m is None:
                hb.log(f"{n:8} FAILED")
                continue
            added = m["p50_ms"] - med["direct"]["p50_ms"] if med.get("direct") else float("nan")
            hb.log(f"{n:8} {m['rps']:9.0f} req/s  p50 {m['p50_ms']:.3f} ms  p99 {m['p99_ms']:.3f} ms  "
                   f"proxy CPU {m['cpu_us_per_req']:.1f} µs/req  added p50 {added * 1000:.0f} µs")
        if med.get("sidecar") and med.get("nginx"):
            s, n = med["sidecar"], med["nginx"]
            hb.log(f"sidecar/nginx: req/s {100 * s['rps'] / n['rps']:.1f}%, p99 {s['p99_ms'] / n['p99_ms']:.2f}×, "
                   f"CPU/req {s['cpu_us_per_req'] / n['cpu_us_per_req']:.2f}×")
        if med.get("floor") and med.get("nginx"):
            f, n = med["floor"], med["nginx"]
            hb.log(f"floor/nginx: req/s {100 * f['rps'] / n['rps']:.1f}%, p99 {f['p99_ms'] / n['p99_ms']:.2f}×, "
                   f"CPU/req {f['cpu_us_per_req'] / n['cpu_us_per_req']:.2f}×")
        if args.upload_gib > 0:
            u = upload(side.url, f"/api/{conn}", args.upload_gib, sidecar.pid)
            hb.log(f"\n== {args.upload_gib:g} GiB streamed through the sidecar: {u}")
        return 0
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
