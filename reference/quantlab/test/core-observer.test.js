// The observer API, run as its real entry point (node core/observer/index.js) on a port from the OS.
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { pathToFileURL } from 'node:url';
import { AuditWriter } from '../core/audit/AuditWriter.js';
import { createObserver } from '../core/observer/server.js';
import { RunRegistry } from '../core/state/RunRegistry.js';
import { TWIN_ROOT, spawnNode } from './helpers/proc.js';

const TOKEN = `obs-${crypto.randomBytes(12).toString('hex')}`;
const UNAUTHORIZED = { error: 'UNAUTHORIZED', message: 'Bearer token required' };
const REGISTRY_URL = pathToFileURL(path.join(TWIN_ROOT, 'core/state/RunRegistry.js')).href;

let work;
let observer;
let base;
let registry;

/** Start `node core/observer/index.js` on an OS port and wait for its listening line. */
async function startObserver(env) {
  const proc = spawnNode('core/observer/index.js', [], { env: { OBSERVER_PORT: '0', ...env } });
  const line = await proc.waitForLine((o) => o.event === 'observer_listening', 10_000);
  return { proc, port: line.port, base: `http://127.0.0.1:${line.port}` };
}

before(async () => {
  work = fs.mkdtempSync(path.join(os.tmpdir(), 'core-observer-'));
  const env = {
    OBSERVER_TOKEN: TOKEN,
    QUANTLAB_STATE_DIR: path.join(work, 'state'),
    AUDIT_SPOOL_DIR: path.join(work, 'audit'),
  };
  registry = new RunRegistry({ dir: env.QUANTLAB_STATE_DIR });
  observer = await startObserver(env);
  base = observer.base;
});

after(async () => {
  await observer?.proc.stop('SIGKILL');
  fs.rmSync(work, { recursive: true, force: true });
});

/**
 * One request with a deadline; resolves {status, body}.
 * @param {string} url
 * @param {{method?:string, token?:string|null, headers?:object}} [opts]
 */
async function call(url, { method = 'GET', token = TOKEN, headers = {} } = {}) {
  const h = { ...headers };
  if (token !== null) h.authorization = `Bearer ${token}`;
  const res = await fetch(url, { method, headers: h, signal: AbortSignal.timeout(5_000) });
  const text = await res.text();
  return { status: res.status, body: text ? JSON.parse(text) : null, type: res.headers.get('content-type') };
}

test('requests without a valid bearer token get 401 UNAUTHORIZED', async () => {
  const cases = [
    ['no header', `${base}/observer/health`, { token: null }],
    ['wrong token', `${base}/observer/health`, { token: `${TOKEN}x` }],
    ['token without the Bearer prefix', `${base}/observer/runs`, { token: null, headers: { authorization: TOKEN } }],
    ['lower-case scheme', `${base}/observer/runs`, { token: null, headers: { authorization: `bearer ${TOKEN}` } }],
    ['token in the query string', `${base}/observer/health?token=${TOKEN}`, { token: null }],
    ['access_token in the query string', `${base}/observer/health?access_token=${TOKEN}`, { token: null }],
    ['empty bearer', `${base}/observer/health`, { token: '' }],
    ['stop without token', `${base}/observer/runs/any/stop`, { token: null, method: 'POST' }],
  ];
  for (const [name, url, opts] of cases) {
    const { status, body, type } = await call(url, opts);
    assert.equal(status, 401, name);
    assert.deepEqual(body, UNAUTHORIZED, name);
    assert.match(type, /application\/json/, name);
  }
});

test('health answers 200 with the contract shape', async () => {
  const { status, body } = await call(`${base}/observer/health`);
  assert.equal(status, 200);
  assert.deepEqual(Object.keys(body).sort(), [
    'active_runs', 'budget_pressure', 'kill_switch_active', 'kill_switch_reason', 'killed_symbols', 'last_event_age_ms', 'ws_connected',
  ]);
  assert.equal(typeof body.active_runs, 'number');
  assert.equal(typeof body.ws_connected, 'boolean');
  assert.ok(['LOW', 'MED', 'HIGH'].includes(body.budget_pressure));
  assert.equal(body.kill_switch_active, false);
  assert.equal(body.kill_switch_reason, null);
  assert.deepEqual(body.killed_symbols, []);
});

test('runs lists every registry run with the contract fields; health sums the running ones', async () => {
  const id = crypto.randomUUID();
  registry.register({
    live_run_id: id, strategy_id: 'canary', budget_pressure: 'MED', ws_connected: true, last_event_ts: Date.now() - 1_500,
  });
  const { status, body } = await call(`${base}/observer/runs`);
  assert.equal(status, 200);
  const run = body.runs.find((r) => r.live_run_id === id);
  assert.deepEqual(Object.keys(run).sort(), [
    'budget_pressure', 'last_event_ts', 'live_run_id', 'started_at', 'status', 'stop_reason', 'strategy_id',
  ]);
  assert.equal(run.status, 'RUNNING');
  assert.equal(run.strategy_id, 'canary');
  assert.equal(run.stop_reason, null);

  const health = (await call(`${base}/observer/health`)).body;
  assert.ok(health.active_runs >= 1);
  assert.equal(health.ws_connected, true);
  assert.equal(health.budget_pressure, 'MED');
  assert.ok(health.last_event_age_ms >= 1_500 && health.last_event_age_ms < 30_000, String(health.last_event_age_ms));
  registry.update(id, { status: 'STOPPED', stop_reason: 'STREAM_END', ws_connected: false });
});

test('unknown runs and unknown paths get 404 bodies', async () => {
  assert.deepEqual(await call(`${base}/observer/runs/no-such-run/stop`, { method: 'POST' }),
    { status: 404, body: { error: 'RUN_NOT_FOUND' }, type: 'application/json; charset=utf-8' });
  const unknown = await call(`${base}/observer/nope`);
  assert.equal(unknown.status, 404);
  assert.deepEqual(unknown.body, { error: 'NOT_FOUND' });
  const wrongMethod = await call(`${base}/observer/health`, { method: 'DELETE' });
  assert.equal(wrongMethod.status, 404);
  assert.deepEqual(wrongMethod.body, { error: 'NOT_FOUND' });
});

test('the stop path allows 30 requests a minute per client, then 429 (checked before auth)', async () => {
  const url = `${base}/observer/runs/rate-limited-run/stop`;
  for (let i = 0; i < 30; i += 1) {
    const { status } = await call(url, { method: 'POST', token: i % 2 ? TOKEN : null });
    assert.ok(status === 404 || status === 401, `request ${i + 1} got ${status}`);
  }
  for (const token of [TOKEN, null]) {
    const { status, body } = await call(url, { method: 'POST', token });
    assert.equal(status, 429);
    assert.deepEqual(body, { error: 'TOO_MANY_REQUESTS', message: 'Limit 30/min' });
  }
  // Limits are per path: another path is unaffected.
  assert.equal((await call(`${base}/observer/runs/other-run/stop`, { method: 'POST' })).status, 404);
});

test('other paths allow 120 requests a minute per client, then 429', async () => {
  const url = `${base}/observer/limit-probe`;
  const statuses = await Promise.all(Array.from({ length: 120 }, () => call(url, { token: null }).then((r) => r.status)));
  assert.deepEqual([...new Set(statuses)], [401]);
  const { status, body } = await call(url);
  assert.equal(status, 429);
  assert.deepEqual(body, { error: 'TOO_MANY_REQUESTS', message: 'Limit 120/min' });
});

test('a stop reaches a run watching from another process within one second, with an API_CALL audit entry', async (t) => {
  const script = path.join(work, 'watch-run.mjs');
  fs.writeFileSync(script, `import { RunRegistry } from ${JSON.stringify(REGISTRY_URL)};
const registry = RunRegistry.fromEnv();
const id = process.argv[2];
registry.register({ live_run_id: id, strategy_id: 'watcher' });
registry.watchStop(id, (reason) => {
  registry.update(id, { status: 'STOPPED', stop_reason: reason });
  console.log(JSON.stringify({ event: 'stopped', reason, at: Date.now() }));
});
console.log(JSON.stringify({ event: 'watching', id }));
setTimeout(() => process.exit(3), 20000);
`);
  const id = crypto.randomUUID();
  const run = spawnNode(script, [id], { env: { QUANTLAB_STATE_DIR: registry.dir } });
  t.after(() => run.stop('SIGKILL'));
  await run.waitForLine((o) => o.event === 'watching');

  const listed = (await call(`${base}/observer/runs`)).body.runs.find((r) => r.live_run_id === id);
  assert.equal(listed?.status, 'RUNNING', 'the other process\'s run is listed');

  const asked = Date.now();
  const res = await call(`${base}/observer/runs/${id}/stop`, { method: 'POST' });
  assert.deepEqual(res.body, { status: 'ok', id });
  assert.equal(res.status, 200);
  const stopped = await run.waitForLine((o) => o.event === 'stopped', 2_000);
  assert.equal(stopped.reason, 'MANUAL_STOP');
  assert.ok(stopped.at - asked <= 1_000, `stop took ${stopped.at - asked} ms`);

  const after = (await call(`${base}/observer/runs`)).body.runs.find((r) => r.live_run_id === id);
  assert.equal(after.status, 'STOPPED');
  assert.equal(after.stop_reason, 'MANUAL_STOP');

  const entries = await AuditWriter.findRunEntries(path.join(work, 'audit'), id);
  const apiCall = entries.find((e) => e.action === 'API_CALL');
  assert.ok(apiCall, 'an API_CALL entry is in the spool');
  assert.equal(apiCall.target_type, 'run');
  assert.equal(apiCall.target_id, id);
  assert.equal(apiCall.reason, 'MANUAL_STOP');
  assert.deepEqual(apiCall.metadata, { live_run_id: id, path: `/observer/runs/${id}/stop` });
});

test('a RUNNING run whose process died is listed as ERROR', async () => {
  const id = crypto.randomUUID();
  registry.register({ live_run_id: id, pid: 2 ** 22 + 12345 });
  const run = (await call(`${base}/observer/runs`)).body.runs.find((r) => r.live_run_id === id);
  assert.equal(run.status, 'ERROR');
  assert.equal(run.stop_reason, 'ERROR');
});

test('an empty OBSERVER_TOKEN rejects every request', async (t) => {
  const server = createObserver({ token: '', registry, audit: null });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(() => new Promise((resolve) => { server.closeAllConnections(); server.close(resolve); }));
  const url = `http://127.0.0.1:${server.address().port}/observer/health`;
  for (const token of [null, '', 'anything']) {
    const { status, body } = await call(url, { token });
    assert.equal(status, 401);
    assert.deepEqual(body, UNAUTHORIZED);
  }
});

test('the observer binds all interfaces and never logs the token', async () => {
  // /proc/net/tcp lists listening sockets; 00000000:<port> in state 0A is 0.0.0.0 LISTEN.
  const table = fs.readFileSync('/proc/net/tcp', 'utf8');
  const portHex = observer.port.toString(16).toUpperCase().padStart(4, '0');
  assert.match(table, new RegExp(`00000000:${portHex} 00000000:0000 0A`));
  assert.ok(!observer.proc.stdout().includes(TOKEN) && !observer.proc.stderr().includes(TOKEN));
});

test('SIGTERM closes the observer cleanly with exit 0', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'core-observer-term-'));
  try {
    const { proc, base: url } = await startObserver({
      OBSERVER_TOKEN: TOKEN, QUANTLAB_STATE_DIR: path.join(dir, 's'), AUDIT_SPOOL_DIR: path.join(dir, 'a'),
    });
    assert.equal((await call(`${url}/observer/health`)).status, 200);
    const { code, signal } = await proc.stop('SIGTERM', 5_000);
    assert.equal(signal, null);
    assert.equal(code, 0);
    assert.ok(proc.stdout().includes('"event":"observer_stopped"'), proc.stdout());
    await assert.rejects(fetch(`${url}/observer/health`, { signal: AbortSignal.timeout(2_000) }));
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('a bad OBSERVER_PORT is a config error', async () => {
  const proc = spawnNode('core/observer/index.js', [], { env: { OBSERVER_PORT: 'http', OBSERVER_TOKEN: TOKEN } });
  const { code } = await proc.exited;
  assert.equal(code, 1);
  assert.match(proc.stderr(), /OBSERVER_PORT must be a port number/);
});
