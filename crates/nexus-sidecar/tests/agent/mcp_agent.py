#!/usr/bin/env python3
"""An MCP client built with the official Python MCP SDK that knows only the
sidecar's URL (argv[1]): it initializes, lists the tools and calls the first
one, then prints one JSON line: {"tools": [...], "text": "..."}, or
{"elicitation": {"url": ..., "message": ...}} when Nexus needs a person
(URL-mode elicitation, -32042), or {"error": ...}. It holds no credential."""

import asyncio
import json
import sys

from mcp import ClientSession
from mcp.client.streamable_http import streamablehttp_client
from mcp.shared.exceptions import McpError
from mcp.types import URL_ELICITATION_REQUIRED


async def run(url):
    async with streamablehttp_client(url) as (read, write, _):
        async with ClientSession(read, write) as session:
            try:
                await session.initialize()
                listed = await session.list_tools()
                names = [t.name for t in listed.tools]
                result = await session.call_tool(names[0], {})
                text = " ".join(c.text for c in result.content if c.type == "text")
                return {"tools": names, "text": text}
            except McpError as e:
                if e.error.code == URL_ELICITATION_REQUIRED:
                    first = (e.error.data or {})["elicitations"][0]
                    return {"elicitation": {"url": first["url"], "message": e.error.message,
                                            "id": first["elicitationId"]}}
                return {"error": {"code": e.error.code, "message": e.error.message}}


print(json.dumps(asyncio.run(run(sys.argv[1]))), flush=True)
