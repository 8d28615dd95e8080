// An OAuth-protected MCP server (Streamable HTTP, stateless) built with the
// official TypeScript MCP SDK. Its authorization server is the oidc-provider
// peer: the server publishes RFC 9728 protected-resource metadata naming it,
// answers requests without a valid token with a 401 challenge carrying
// `resource_metadata` and `scope`, and checks every token by RFC 7662
// introspection there, so a grant revoked at the provider stops working here
// at once.
//
// Environment: ISSUER (the provider's issuer URL), INTROSPECTION_CLIENT_ID and
// INTROSPECTION_CLIENT_SECRET (a client of the provider, sent with HTTP Basic),
// SCOPE (what tools need; default "calendar.read"), PORT (default 0: free).
// Prints one line when listening: {"ready":true,"url":"http://127.0.0.1:P/mcp"}.
// GET /__stats (no auth) → {"tool_calls":N,"refused":N,"last_subject":S}.

import http from 'node:http';
import { McpServer } from '@modelcontextprotocol/sdk/server/mcp.js';
import { StreamableHTTPServerTransport } from '@modelcontextprotocol/sdk/server/streamableHttp.js';
import { z } from 'zod';

const issuer = process.env.ISSUER;
const clientId = process.env.INTROSPECTION_CLIENT_ID;
const clientSecret = process.env.INTROSPECTION_CLIENT_SECRET;
const scope = process.env.SCOPE || 'calendar.read';
if (!issuer || !clientId || !clientSecret) {
  console.error('ISSUER, INTROSPECTION_CLIENT_ID and INTROSPECTION_CLIENT_SECRET are required');
  process.exit(2);
}

const stats = { tool_calls: 0, refused: 0, last_subject: null };
let base = '';

async function introspect(token) {
  const r = await fetch(`${issuer}/token/introspection`, {
    method: 'POST',
    headers: {
      'content-type': 'application/x-www-form-urlencoded',
      authorization: 'Basic ' + Buffer.from(`${clientId}:${clientSecret}`).toString('base64'),
    },
    body: new URLSearchParams({ token }).toString(),
  });
  if (!r.ok) return null;
  const v = await r.json();
  return v.active ? v : null;
}

function tools(subject) {
  const server = new McpServer({ name: 'nexus-test-calendar', version: '1.0.0' });
  server.registerTool(
    'next_meeting',
    {
      description: 'The next meeting of the person whose account this is',
      inputSchema: { after: z.string().optional() },
    },
    async () => {
      stats.tool_calls += 1;
      stats.last_subject = subject;
      return { content: [{ type: 'text', text: `${subject}: stand-up at 09:30` }] };
    },
  );
  return server;
}

function challenge(res, error) {
  stats.refused += 1;
  const params = [
    error ? `error="${error}"` : null,
    `resource_metadata="${base}/.well-known/oauth-protected-resource/mcp"`,
    `scope="openid ${scope}"`,
  ].filter(Boolean);
  res.writeHead(401, {
    'content-type': 'application/json',
    'www-authenticate': `Bearer ${params.join(', ')}`,
  });
  res.end(JSON.stringify({ error: error || 'invalid_request' }));
}

async function body(req) {
  const chunks = [];
  for await (const c of req) chunks.push(c);
  const text = Buffer.concat(chunks).toString('utf8');
  return text ? JSON.parse(text) : undefined;
}

const server = http.createServer(async (req, res) => {
  try {
    const path = new URL(req.url, base).pathname;
    if (req.method === 'GET' && path === '/.well-known/oauth-protected-resource/mcp') {
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({
        resource: `${base}/mcp`,
        authorization_servers: [issuer],
        scopes_supported: ['openid', scope],
        bearer_methods_supported: ['header'],
      }));
      return;
    }
    if (req.method === 'GET' && path === '/__stats') {
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify(stats));
      return;
    }
    if (path !== '/mcp') {
      res.writeHead(404).end();
      return;
    }
    if (req.method !== 'POST') {
      // Stateless: no stream to resume, no session to end.
      res.writeHead(405, { allow: 'POST' }).end();
      return;
    }
    const m = /^Bearer\s+(\S+)$/i.exec(req.headers.authorization || '');
    if (!m) return challenge(res, null);
    const info = await introspect(m[1]);
    if (!info) return challenge(res, 'invalid_token');
    if (!String(info.scope || '').split(' ').includes(scope)) {
      stats.refused += 1;
      res.writeHead(403, {
        'content-type': 'application/json',
        'www-authenticate': `Bearer error="insufficient_scope", scope="openid ${scope}", resource_metadata="${base}/.well-known/oauth-protected-resource/mcp"`,
      });
      res.end(JSON.stringify({ error: 'insufficient_scope' }));
      return;
    }
    const parsed = await body(req);
    const transport = new StreamableHTTPServerTransport({ sessionIdGenerator: undefined });
    const mcp = tools(info.sub);
    res.on('close', () => {
      transport.close();
      mcp.close();
    });
    await mcp.connect(transport);
    await transport.handleRequest(req, res, parsed);
  } catch (e) {
    console.error('mcp-server:', e);
    if (!res.headersSent) {
      res.writeHead(500, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ jsonrpc: '2.0', error: { code: -32603, message: 'internal error' }, id: null }));
    }
  }
});

server.listen(Number(process.env.PORT || 0), '127.0.0.1', () => {
  base = `http://127.0.0.1:${server.address().port}`;
  console.log(JSON.stringify({ ready: true, url: `${base}/mcp` }));
});

for (const sig of ['SIGTERM', 'SIGINT']) {
  process.on(sig, () => {
    server.closeAllConnections();
    server.close(() => process.exit(0));
  });
}
