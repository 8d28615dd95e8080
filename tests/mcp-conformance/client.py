#!/usr/bin/env python3
"""Client command of the official MCP conformance suite (client mode).

The suite starts one scenario (an OAuth-protected MCP server and its
authorization server on loopback) and runs `client.py <server-url>`. Here
the client under test is Nexus, used as its users would:

1. the MCP server is registered by its URL alone (`POST /providers/mcp`, with
   the scenario's pre-registered client when it gives one);
2. a sidecar is started with one `kind = "mcp"` route to it;
3. the official Python MCP SDK, knowing only the sidecar's URL, initializes,
   lists tools and calls one. When Nexus needs a person it answers with a
   URL-mode elicitation (-32042); this script then plays the person: it
   opens the connect link, presses Connect (or Reconnect), and the suite's
   authorization server approves without asking; then the call is retried.

A person is sent at most MAX_CONSENTS times in a row; a server that keeps
refusing after that is an error (the suite's retry-limit scenario expects a
client that stops).

Environment: NEXUS_BROKER_URL, NEXUS_API_KEY (admin), NEXUS_GATEWAY_URL,
NEXUS_BIN (the nexus binary); MCP_CONFORMANCE_SCENARIO and
MCP_CONFORMANCE_CONTEXT come from the suite.
"""

import asyncio
import html.parser
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse

import requests
from mcp import ClientSession
from mcp.client.streamable_http import streamablehttp_client
from mcp.shared.exceptions import McpError
from mcp.types import URL_ELICITATION_REQUIRED

MAX_CONSENTS = 3


def log(*args):
    print(*args, file=sys.stderr, flush=True)


class Forms(html.parser.HTMLParser):
    """The forms of a page: action and their inputs' names and values."""

    def __init__(self):
        super().__init__()
        self.forms = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form":
            self.forms.append({"action": a.get("action", ""), "fields": {}})
        elif tag == "input" and self.forms and a.get("name"):
            self.forms[-1]["fields"][a["name"]] = a.get("value", "")


def consent(link):
    """What a person does with the link: open it, press the first Connect or
    Reconnect, approve at the authorization server (the suite's approves by
    itself), and land on Nexus's callback page."""
    browser = requests.Session()
    page = browser.get(link, timeout=30)
    page.raise_for_status()
    parser = Forms()
    parser.feed(page.text)
    starts = [f for f in parser.forms if f["action"].endswith("/connect/start")]
    if not starts:
        raise RuntimeError(f"the connect page offers nothing to connect: {page.text[:500]}")
    done = browser.post(
        urllib.parse.urljoin(page.url, starts[0]["action"]),
        data=starts[0]["fields"],
        timeout=30,
    )
    hops = " -> ".join(urllib.parse.urlsplit(r.url).path for r in done.history + [done])
    if done.status_code != 200:
        raise RuntimeError(f"consent ended with HTTP {done.status_code} ({hops}): {done.text[:500]}")
    log(f"consented: {hops}")


async def use_tools(url):
    """Initialize, list tools, call the first one: the tool's answer, or the
    link of a URL-mode elicitation."""
    async with streamablehttp_client(url) as (read, write, _):
        async with ClientSession(read, write) as session:
            try:
                await session.initialize()
                tools = await session.list_tools()
                log("tools:", [t.name for t in tools.tools])
                result = await session.call_tool(tools.tools[0].name, {})
                return ("result", result)
            except McpError as e:
                if e.error.code != URL_ELICITATION_REQUIRED:
                    raise
                elicitations = (e.error.data or {}).get("elicitations") or []
                urls = [x["url"] for x in elicitations if x.get("mode") == "url"]
                if not urls:
                    raise
                log(f"elicitation: {e.error.message}")
                return ("elicitation", urls[0])


async def agent(url):
    consents = 0
    while True:
        kind, value = await use_tools(url)
        if kind == "result":
            log("tool result:", value.content)
            return 0
        if consents == MAX_CONSENTS:
            log(f"still refused after {consents} consents in a row: giving up")
            return 1
        consents += 1
        consent(value)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    server_url = sys.argv[1]
    scenario = os.environ.get("MCP_CONFORMANCE_SCENARIO", "scenario")
    context = json.loads(os.environ.get("MCP_CONFORMANCE_CONTEXT") or "{}")
    broker = os.environ["NEXUS_BROKER_URL"]
    admin = {"x-api-key": os.environ["NEXUS_API_KEY"]}
    tag = re.sub(r"[^a-z0-9]+", "-", scenario.lower()).strip("-") + "-" + secrets.token_hex(3)
    provider, workspace = f"conf-{tag}", f"ws-{tag}"

    body = {"url": server_url, "name": provider}
    if context.get("client_id"):
        body["client_id"] = context["client_id"]
        if context.get("client_secret"):
            body["client_secret"] = context["client_secret"]
    added = requests.post(f"{broker}/providers/mcp", json=body, headers=admin, timeout=60)
    log(f"POST /providers/mcp -> {added.status_code} {added.text[:300]}")
    if added.status_code != 201:
        return 1
    key = requests.post(
        f"{broker}/agent-keys",
        json={"name": tag, "workspaces": [workspace]},
        headers=admin,
        timeout=30,
    )
    key.raise_for_status()

    with tempfile.TemporaryDirectory() as tmp:
        routes = os.path.join(tmp, "routes.toml")
        with open(routes, "w") as f:
            f.write(
                f'[routes.mcp]\nkind = "mcp"\nupstream = "{server_url}"\n'
                f'workspace = "{workspace}"\nprovider = "{provider}"\n'
            )
        port = free_port()
        env = {
            "PATH": os.environ.get("PATH", ""),
            "GATEWAY_URL": os.environ["NEXUS_GATEWAY_URL"],
            "AGENT_KEY": key.json()["key"],
            "SIDECAR_ADDR": f"127.0.0.1:{port}",
            "SIDECAR_ROUTES_FILE": routes,
            "SIDECAR_WORKERS": "1",
            "NEXUS_LOG": "warn",
        }
        sidecar = subprocess.Popen([os.environ["NEXUS_BIN"], "sidecar"], env=env)
        try:
            base = f"http://127.0.0.1:{port}"
            for _ in range(100):
                try:
                    if requests.get(f"{base}/_nexus/health", timeout=1).ok:
                        break
                except requests.ConnectionError:
                    pass
                if sidecar.poll() is not None:
                    log("the sidecar exited")
                    return 1
                time.sleep(0.1)
            return asyncio.run(agent(f"{base}/mcp"))
        finally:
            sidecar.terminate()
            sidecar.wait(timeout=10)


if __name__ == "__main__":
    sys.exit(main())
