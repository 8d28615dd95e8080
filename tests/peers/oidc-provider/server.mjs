// Test peer: an independent OpenID Connect provider (panva/oidc-provider)
// for the Rust integration tests. See README.md for the contract.
//
// stdout carries exactly one line (the ready line); everything else goes to
// stderr, so console.log/info/debug are redirected before anything runs.
import * as crypto from 'node:crypto';
import * as http from 'node:http';

console.log = console.error;
console.info = console.error;
console.debug = console.error;

const { default: Provider, interactionPolicy } = await import('oidc-provider');
// The built-in in-memory adapter class, given an unbounded store we can
// enumerate (the stock store is a 1000-entry LRU we cannot list).
const { default: MemoryAdapter } = await import('oidc-provider/lib/adapters/memory_adapter.js');

// ---------------------------------------------------------------- settings

function intEnv(name, dflt) {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return dflt;
  const n = Number(raw);
  if (!Number.isInteger(n) || n < 0) {
    console.error(`invalid ${name}: ${raw}`);
    process.exit(2);
  }
  return n;
}

const PORT = intEnv('PORT', 0);
const ACCESS_TOKEN_TTL = intEnv('ACCESS_TOKEN_TTL', 3600);
const REFRESH_TOKEN_TTL = intEnv('REFRESH_TOKEN_TTL', 86400);
// Milliseconds a refresh answer waits after the refresh was processed (the
// token rotated): a provider's real round trip, the window in which a client
// killed mid-refresh loses the rotated token.
const REFRESH_ANSWER_DELAY_MS = intEnv('REFRESH_ANSWER_DELAY_MS', 0);

const DEFAULT_CLIENTS = [{
  client_id: 'nexus',
  client_secret: 'nexus-secret',
  redirect_uris: ['http://127.0.0.1:8080/auth/callback'],
  token_endpoint_auth_method: 'client_secret_post',
  grant_types: ['authorization_code', 'refresh_token'],
  response_types: ['code'],
  scope: 'openid email profile offline_access calendar.read calendar.write',
}];

let CLIENTS = DEFAULT_CLIENTS;
if (process.env.CLIENTS) {
  try {
    CLIENTS = JSON.parse(process.env.CLIENTS);
    if (!Array.isArray(CLIENTS)) throw new TypeError('CLIENTS must be a JSON array');
  } catch (err) {
    console.error(`invalid CLIENTS: ${err.message}`);
    process.exit(2);
  }
}

// ---------------------------------------------------------------- storage

class ExpiringStore {
  #m = new Map();

  get(key) {
    const e = this.#m.get(key);
    if (!e) return undefined;
    if (e.exp !== undefined && e.exp <= Date.now()) {
      this.#m.delete(key);
      return undefined;
    }
    return e.value;
  }

  set(key, value, { maxAge } = {}) {
    const exp = typeof maxAge === 'number' && Number.isFinite(maxAge) ? Date.now() + maxAge : undefined;
    this.#m.set(key, { value, exp });
    return this;
  }

  has(key) { return this.get(key) !== undefined; }

  delete(key) { return this.#m.delete(key); }

  // live [key, value] pairs whose key starts with prefix
  list(prefix) {
    const out = [];
    for (const key of [...this.#m.keys()]) {
      if (key.startsWith(prefix)) {
        const v = this.get(key);
        if (v !== undefined) out.push([key, v]);
      }
    }
    return out;
  }

  sweep() { for (const key of [...this.#m.keys()]) this.get(key); }
}

const store = new ExpiringStore();
setInterval(() => store.sweep(), 60_000).unref();
const CLOCK_TOLERANCE = 15;

// ---------------------------------------------------------------- accounts

function capitalise(s) { return s.charAt(0).toUpperCase() + s.slice(1); }

function accountFor(id) {
  return {
    accountId: id,
    async claims() {
      return {
        sub: id,
        email: `${id}@example.test`,
        email_verified: true,
        name: capitalise(id),
        picture: `https://example.test/${id}.png`,
        // Accounts named ops-* are in the operators' group (the console's
        // group allow-list is tested with them).
        groups: id.startsWith('ops') ? ['staff', 'nexus-operators'] : ['staff'],
      };
    },
  };
}

function targetAccount(params) {
  return params.login_hint || 'alice';
}

// login is (re)requested whenever the session's account differs from the
// account the request asks for (login_hint, else "alice").
const policy = interactionPolicy.base();
policy.get('login').checks.add(new interactionPolicy.Check(
  'login_hint_mismatch',
  'requested account differs from the session account',
  (ctx) => (ctx.oidc.session.accountId && ctx.oidc.session.accountId !== targetAccount(ctx.oidc.params)
    ? interactionPolicy.Check.REQUEST_PROMPT
    : interactionPolicy.Check.NO_NEED_TO_PROMPT),
));

// ---------------------------------------------------------------- stats

const stats = {
  token_requests: { authorization_code: 0, refresh_token: 0 },
  revocations: 0,
  resource_calls: 0,
  // Refresh tokens presented a second time (oidc-provider then revokes the
  // whole grant): every one is a replay by the client.
  refresh_token_reuse: 0,
  // How many distinct refresh tokens those replays presented: a client whose
  // first replay's refusal was lost (it had timed out) replays the same
  // token again, which kills nothing more.
  refresh_token_reuse_distinct: 0,
  // When a processed refresh's answer was lost (unix ms each).
  refresh_answers_lost: [],
  // Refresh requests answered by an injected fault instead of the provider.
  faults_served: { unavailable: 0, slow: 0 },
};

// Injected faults on refresh requests (POST /__admin/faults), for the soak:
// until `unavailable_until` (unix ms) a 503 without processing; until
// `slow_until` a delay of `slow_ms`, then a 504 without processing (a
// provider that never got to the request before its client gave up).
const faults = { unavailable_until: 0, slow_until: 0, slow_ms: 0 };
// Digests of the refresh tokens replayed (for refresh_token_reuse_distinct).
const replayed = new Set();
const sleep = (ms) => new Promise((resolve) => { setTimeout(resolve, ms); });

// ---------------------------------------------------------------- helpers

const MAX_BODY = 64 * 1024;

async function readRaw(req) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > MAX_BODY) throw new Error('request entity too large');
    chunks.push(chunk);
  }
  return Buffer.concat(chunks).toString('utf8');
}

function json(ctx, status, body) {
  ctx.status = status;
  ctx.type = 'application/json';
  ctx.set('Cache-Control', 'no-store');
  ctx.body = JSON.stringify(body);
}

async function readJson(ctx) {
  const raw = await readRaw(ctx.req);
  if (!raw) return {};
  return JSON.parse(raw);
}

// ---------------------------------------------------------------- start-up

const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
const signingJwk = {
  ...privateKey.export({ format: 'jwk' }),
  kid: crypto.randomBytes(8).toString('hex'),
  alg: 'RS256',
  use: 'sig',
};

let handler = (req, res) => { res.statusCode = 503; res.end(); };
const server = http.createServer((req, res) => handler(req, res));
server.keepAliveTimeout = 5000;

await new Promise((resolve, reject) => {
  server.once('error', reject);
  server.listen(PORT, '127.0.0.1', resolve);
});

const { port } = server.address();
const issuer = `http://127.0.0.1:${port}`;

const configuration = {
  adapter: (model) => new MemoryAdapter(model, store, CLOCK_TOLERANCE),
  clockTolerance: CLOCK_TOLERANCE,
  clients: CLIENTS,
  jwks: { keys: [signingJwk] },
  cookies: { keys: [crypto.randomBytes(32).toString('hex')] },
  scopes: ['openid', 'offline_access', 'email', 'profile', 'groups', 'calendar.read', 'calendar.write'],
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    profile: ['name', 'picture'],
    groups: ['groups'],
  },
  // include scope-requested claims in the id_token too (not only userinfo)
  conformIdTokenClaims: false,
  findAccount: async (ctx, sub) => accountFor(sub),
  pkce: { required: () => true },
  issueRefreshToken: async (ctx, client) => client.grantTypeAllowed('refresh_token'),
  expiresWithSession: async () => false,
  rotateRefreshToken: true,
  interactions: {
    policy,
    url: async (ctx, interaction) => `/interaction/${interaction.uid}`,
  },
  features: {
    devInteractions: { enabled: false },
    userinfo: { enabled: true },
    revocation: { enabled: true, allowedPolicy: async () => true },
    introspection: { enabled: true, allowedPolicy: async () => true },
    resourceIndicators: { enabled: false },
  },
  ttl: {
    AccessToken: () => ACCESS_TOKEN_TTL,
    AuthorizationCode: () => 60,
    IdToken: () => 3600,
    RefreshToken: () => REFRESH_TOKEN_TTL,
    Interaction: () => 3600,
    Session: () => 14 * 24 * 3600,
    Grant: () => Math.max(REFRESH_TOKEN_TTL, ACCESS_TOKEN_TTL, 14 * 24 * 3600),
  },
  renderError: async (ctx, out) => {
    json(ctx, ctx.status && ctx.status >= 400 ? ctx.status : 400, out);
  },
};

let provider;
try {
  provider = new Provider(issuer, configuration);
} catch (err) {
  console.error(`provider configuration error: ${err.stack || err}`);
  process.exit(2);
}

provider.on('server_error', (ctx, err) => console.error('server_error', err));
provider.on('grant.error', (ctx, err) => {
  if (err.error_detail === 'refresh token already used' || err.message === 'refresh token already used') {
    stats.refresh_token_reuse += 1;
    const presented = typeof ctx.req.body === 'string' ? new URLSearchParams(ctx.req.body).get('refresh_token') : null;
    if (presented) {
      replayed.add(crypto.createHash('sha256').update(presented).digest('hex'));
      stats.refresh_token_reuse_distinct = replayed.size;
    }
  }
  console.error('grant.error', err.message, err.error_detail || '');
});
provider.on('authorization.error', (ctx, err) => console.error('authorization.error', err.message, err.error_detail || ''));

// ---------------------------------------------------------------- grants

function grantsFor(sub, clientId) {
  return store.list('Grant:')
    .map(([, payload]) => payload)
    .filter((p) => p.accountId === sub && p.clientId === clientId);
}

async function grantScopes(grantId) {
  const grant = await provider.Grant.find(grantId);
  if (!grant) return null;
  const s = grant.getOIDCScope();
  return s ? s.split(' ') : [];
}

function logoutStoredSession(uid) {
  const jti = store.get(`sessionUid:${uid}`);
  const payload = jti && store.get(`Session:${jti}`);
  if (!payload) return;
  for (const k of ['accountId', 'loginTs', 'amr', 'acr', 'transient', 'authorizations']) delete payload[k];
}

// ---------------------------------------------------------------- middleware

function bearerError(ctx, status, header, error) {
  ctx.status = status;
  ctx.set('WWW-Authenticate', header);
  ctx.type = 'application/json';
  ctx.body = JSON.stringify({ error });
}

provider.use(async (ctx, next) => {
  const { path, method } = ctx;

  // --- stats (count every request that reaches the endpoint)
  if (method === 'POST' && path === '/token') {
    let raw = '';
    try { raw = await readRaw(ctx.req); } catch { /* counted as unknown */ }
    const gt = new URLSearchParams(raw).get('grant_type');
    if (gt === 'authorization_code' || gt === 'refresh_token') stats.token_requests[gt] += 1;
    if (gt === 'refresh_token' && Date.now() < faults.unavailable_until) {
      stats.faults_served.unavailable += 1;
      return json(ctx, 503, { error: 'temporarily_unavailable', error_description: 'injected fault' });
    }
    if (gt === 'refresh_token' && Date.now() < faults.slow_until) {
      stats.faults_served.slow += 1;
      await sleep(faults.slow_ms);
      return json(ctx, 504, { error: 'temporarily_unavailable', error_description: 'injected fault: too slow' });
    }
    ctx.req.body = raw; // oidc-provider parses a pre-read body from req.body
    if (gt !== 'refresh_token') return next();
    // A refresh processed (the token rotated) whose answer never reached
    // the client, which had given up: the client's refresh token is spent.
    let rotated = false;
    ctx.res.once('close', () => {
      if (rotated && !ctx.res.writableFinished) {
        stats.refresh_answers_lost.push(Date.now());
      }
    });
    await next();
    rotated = ctx.status === 200;
    if (REFRESH_ANSWER_DELAY_MS > 0) await sleep(REFRESH_ANSWER_DELAY_MS);
    return undefined;
  }
  if (path === '/token/revocation' && method === 'POST') {
    stats.revocations += 1;
    return next();
  }

  // --- automatic interactions
  if (path.startsWith('/interaction/')) {
    const uid = path.slice('/interaction/'.length);
    let details;
    try {
      details = await provider.interactionDetails(ctx.req, ctx.res);
    } catch (err) {
      return json(ctx, 400, { error: 'invalid_request', error_description: `interaction: ${err.error_description || err.message}` });
    }
    if (details.uid !== uid) {
      return json(ctx, 400, { error: 'invalid_request', error_description: 'interaction uid mismatch' });
    }
    const { params, prompt } = details;
    const accountId = targetAccount(params);

    let grant;
    if (details.grantId) {
      grant = await provider.Grant.find(details.grantId);
      if (grant && (grant.accountId !== accountId || grant.clientId !== params.client_id)) grant = undefined;
    }
    grant ||= new provider.Grant({ accountId, clientId: params.client_id });
    if (grant.rejected) delete grant.rejected;
    if (params.scope) grant.addOIDCScope(params.scope);
    const promptDetails = prompt.details || {};
    if (promptDetails.missingOIDCClaims) grant.addOIDCClaims(promptDetails.missingOIDCClaims);
    if (promptDetails.missingResourceScopes) {
      for (const [indicator, scopes] of Object.entries(promptDetails.missingResourceScopes)) {
        grant.addResourceScope(indicator, scopes.join(' '));
      }
    }
    const grantId = await grant.save();

    const result = { consent: { grantId } };
    if (prompt.name === 'login' || details.session?.accountId !== accountId) {
      result.login = { accountId };
    }
    const returnTo = await provider.interactionResult(ctx.req, ctx.res, result, { mergeWithLastSubmission: false });
    if (details.session?.uid && details.session.accountId && details.session.accountId !== accountId) {
      // Switching accounts inside one browser session: oidc-provider would
      // otherwise answer the resume with an auto-submitting logout HTML form.
      // Log the old account out of the stored session instead.
      logoutStoredSession(details.session.uid);
    }
    ctx.status = 303;
    ctx.redirect(returnTo);
    return undefined;
  }

  // --- admin endpoints
  if (path === '/__admin/stats' && method === 'GET') {
    return json(ctx, 200, stats);
  }
  if (path === '/__admin/faults' && method === 'POST') {
    let body;
    try { body = await readJson(ctx); } catch { return json(ctx, 400, { error: 'invalid_json' }); }
    const now = Date.now();
    if (Number.isFinite(body.unavailable_secs)) faults.unavailable_until = now + body.unavailable_secs * 1000;
    if (Number.isFinite(body.slow_secs)) {
      faults.slow_until = now + body.slow_secs * 1000;
      faults.slow_ms = Number.isFinite(body.slow_ms) ? body.slow_ms : 3000;
    }
    return json(ctx, 200, { ...faults });
  }
  if (path === '/__admin/grants' && method === 'GET') {
    const { sub, client_id: clientId } = ctx.query;
    const out = [];
    for (const p of grantsFor(sub, clientId)) {
      const scopes = await grantScopes(p.jti);
      if (scopes) out.push({ grant_id: p.jti, scopes });
    }
    return json(ctx, 200, { grants: out });
  }
  if (path === '/__admin/revoke-grant' && method === 'POST') {
    let body;
    try { body = await readJson(ctx); } catch { return json(ctx, 400, { error: 'invalid_json' }); }
    const grants = grantsFor(body.sub, body.client_id);
    for (const p of grants) {
      await provider.AccessToken.adapter.revokeByGrantId(p.jti); // removes every token of the grant
      await provider.Grant.adapter.destroy(p.jti);
    }
    return json(ctx, 200, { revoked: grants.length });
  }
  if (path === '/__admin/remove-scope' && method === 'POST') {
    let body;
    try { body = await readJson(ctx); } catch { return json(ctx, 400, { error: 'invalid_json' }); }
    let updated = 0;
    for (const p of grantsFor(body.sub, body.client_id)) {
      const scopes = p.openid?.scope ? p.openid.scope.split(' ') : [];
      if (scopes.includes(body.scope)) {
        p.openid.scope = scopes.filter((s) => s !== body.scope).join(' ');
        updated += 1;
      }
    }
    return json(ctx, 200, { updated });
  }

  // --- scope-enforcing resource API
  if (path === '/api/resource' && method === 'GET') {
    stats.resource_calls += 1;
    const wanted = ctx.query.scope;
    if (typeof wanted !== 'string' || !wanted) {
      return json(ctx, 400, { error: 'invalid_request', error_description: 'scope query parameter required' });
    }
    const m = /^Bearer\s+(\S+)$/i.exec(ctx.get('authorization') || '');
    const at = m ? await provider.AccessToken.find(m[1]) : undefined;
    const grant = at && at.grantId ? await provider.Grant.find(at.grantId) : undefined;
    if (!at || !grant || at.isExpired) {
      return bearerError(ctx, 401, 'Bearer error="invalid_token"', 'invalid_token');
    }
    const tokenScopes = new Set((at.scope || '').split(' '));
    const grantScopeSet = new Set(grant.getOIDCScope().split(' '));
    if (!tokenScopes.has(wanted) || !grantScopeSet.has(wanted)) {
      return bearerError(ctx, 403, `Bearer error="insufficient_scope", scope="${wanted}"`, 'insufficient_scope');
    }
    return json(ctx, 200, { ok: true, sub: at.accountId, scope: wanted });
  }

  return next();
});

handler = provider.callback();

process.stdout.write(`${JSON.stringify({ ready: true, issuer })}\n`);

// ---------------------------------------------------------------- shutdown

let stopping = false;
function shutdown(signal) {
  if (stopping) return;
  stopping = true;
  console.error(`received ${signal}, shutting down`);
  setTimeout(() => process.exit(0), 500).unref();
  server.close(() => process.exit(0));
  server.closeAllConnections();
}
process.on('SIGTERM', () => shutdown('SIGTERM'));
process.on('SIGINT', () => shutdown('SIGINT'));
