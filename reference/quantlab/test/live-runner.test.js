// tools/run-live.js, the long live run behind quantlab-live.service: refusal when live ingest is off,
// stops through the observer and SIGTERM, junk frames, and the reconnect policy, all in real processes.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { RunRegistry } from '../core/state/RunRegistry.js';
import { startExchange } from './helpers/exchange.js';
import { auditEntries, findLine, liveArgs, liveEnv, RUN_LIVE, s3Text, startObserver, waitFor, workspace } from './helpers/live.js';
import { archiveEnv, createBucket, startMoto } from './helpers/moto.js';
import { runNode, spawnNode } from './helpers/proc.js';

let moto;
before(async () => { moto = await startMoto(); });
after(async () => { if (moto) await moto.stop(); });

/**
 * Start run-live.js against a local exchange and wait until it has taken events.
 * @param {import('node:test').TestContext} t
 * @param {object} ws workspace
 * @param {object} exchange
 * @param {{env?:object, args?:string[]}} [opts]
 */
async function startLive(t, ws, exchange, { env = {}, args = [] } = {}) {
  const child = spawnNode(RUN_LIVE, liveArgs(args), { env: ws.env({ ...liveEnv(exchange.url), ...env }) });
  t.after(() => child.stop('SIGKILL'));
  const start = await child.waitForLine((o) => o.event === 'live_run_start', 10_000);
  return { child, runId: start.live_run_id };
}

test('run-live: live ingest off ends the run as ERROR with CORE_LIVE_WS_DISABLED', async (t) => {
  const ws = workspace(t);
  const exchange = await startExchange();
  t.after(() => exchange.close());
  const env = ws.env({ ...liveEnv(exchange.url), CORE_LIVE_WS_ENABLED: '0' });
  const out = await runNode(RUN_LIVE, liveArgs(), { env });
  assert.equal(out.code, 1);
  const error = findLine(out.stderr, (o) => o.event === 'live_run_error');
  assert.equal(error.error, 'CORE_LIVE_WS_DISABLED');
  assert.match(error.live_run_id, /^[0-9a-f-]{36}$/);
  const record = new RunRegistry({ dir: ws.state }).get(error.live_run_id);
  assert.deepEqual([record.status, record.stop_reason, record.error], ['ERROR', 'ERROR', 'CORE_LIVE_WS_DISABLED']);
  const stop = (await auditEntries(ws.spool, error.live_run_id)).find((e) => e.action === 'RUN_STOP');
  assert.equal(stop.reason, 'ERROR');
  assert.equal(exchange.connections.length, 0);
});

test('run-live: a stop through the observer ends a run in another process within one second', async (t) => {
  const ws = workspace(t);
  const exchange = await startExchange({ rate: 30 });
  t.after(() => exchange.close());
  const { child, runId } = await startLive(t, ws, exchange);
  const observer = await startObserver(t, ws);
  // Steady state, as an operator sees it: the run is listed, connected and taking events.
  await waitFor(async () => {
    const { body } = await observer.request('GET', '/observer/health');
    return body.ws_connected && body.active_runs === 1 && body.last_event_age_ms !== null;
  }, 10_000, 'a connected run on /observer/health');
  const { body: runs } = await observer.request('GET', '/observer/runs');
  const listed = runs.runs.find((r) => r.live_run_id === runId);
  assert.equal(listed.status, 'RUNNING');
  assert.equal(listed.strategy_id, 'canary-strategy');

  const stopAt = Date.now();
  const stop = await observer.request('POST', `/observer/runs/${runId}/stop`);
  assert.deepEqual(stop, { status: 200, body: { status: 'ok', id: runId } });
  const end = await child.waitForLine((o) => o.event === 'live_run_end', 5_000);
  assert.ok(Date.now() - stopAt < 1000, `stopped after ${Date.now() - stopAt} ms`);
  assert.equal(end.stop_reason, 'MANUAL_STOP');
  assert.equal((await child.exited).code, 0);
  const { body: after } = await observer.request('GET', '/observer/runs');
  const record = after.runs.find((r) => r.live_run_id === runId);
  assert.deepEqual([record.status, record.stop_reason], ['STOPPED', 'MANUAL_STOP']);
  const actions = (await auditEntries(ws.spool, runId)).map((e) => `${e.action}:${e.reason}`);
  assert.deepEqual([actions[0], actions.at(-1)], ['RUN_START:null', 'RUN_STOP:MANUAL_STOP']);
  assert.ok(actions.includes('API_CALL:MANUAL_STOP'));
});

test('run-live: SIGTERM ends the run cleanly as MANUAL_STOP, archived to S3', async (t) => {
  const ws = workspace(t);
  const exchange = await startExchange({ rate: 30 });
  t.after(() => exchange.close());
  const bucket = 'run-live-sigterm';
  await createBucket(moto.endpoint, bucket);
  const { child, runId } = await startLive(t, ws, exchange, { env: archiveEnv(moto.endpoint, bucket) });
  await child.waitForLine((o) => o.event === 'live_ws_connected', 10_000);
  await waitFor(() => new RunRegistry({ dir: ws.state }).get(runId)?.last_event_ts, 5_000, 'events');
  const { code, signal } = await child.stop('SIGTERM', 5_000);
  assert.deepEqual({ code, signal }, { code: 0, signal: null }, child.stderr());
  const manifest = JSON.parse(await s3Text(moto.endpoint, bucket, `replay_runs/replay_run_id=${runId}/manifest.json`));
  assert.equal(manifest.stop_reason, 'MANUAL_STOP');
  const stats = JSON.parse(await s3Text(moto.endpoint, bucket, `replay_runs/replay_run_id=${runId}/stats.json`));
  assert.ok(stats.emitted_event_count > 0);
  const record = new RunRegistry({ dir: ws.state }).get(runId);
  assert.deepEqual([record.status, record.stop_reason, record.ws_connected], ['STOPPED', 'MANUAL_STOP', false]);
});

test('run-live: junk frames are ignored and counted', async (t) => {
  const ws = workspace(t);
  const exchange = await startExchange({ rate: 50, junkEvery: 3 });
  t.after(() => exchange.close());
  const env = ws.env({ ...liveEnv(exchange.url), PROMOTION_GUARDS_ENABLED: '0' });
  const out = await runNode(RUN_LIVE, liveArgs(['--duration-seconds', '1.5']), { env });
  assert.equal(out.code, 0, out.stderr);
  const end = findLine(out.stdout, (o) => o.event === 'live_run_end');
  assert.equal(end.stop_reason, 'STREAM_END');
  assert.ok(end.junk_frame_count >= 5, `junk ${end.junk_frame_count}`);
  assert.ok(end.emitted_event_count >= 20, `events ${end.emitted_event_count}`);
  assert.equal(exchange.connections.length, 1, 'junk does not drop the connection');
});

test('run-live: after dropped connections it reconnects at 2 s, then 4 s (with jitter)', async (t) => {
  const ws = workspace(t);
  const exchange = await startExchange({ dropOnConnect: true });
  t.after(() => exchange.close());
  const { child, runId } = await startLive(t, ws, exchange);
  await waitFor(() => exchange.connections.length >= 3, 12_000, 'two reconnects');
  const [first, second, third] = exchange.connections.map((c) => c.openedAt);
  const gaps = [second - first, third - second];
  assert.ok(gaps[0] >= 1900 && gaps[0] <= 2400 + 300, `first reconnect after ${gaps[0]} ms`);
  assert.ok(gaps[1] >= 3900 && gaps[1] <= 4800 + 300, `second reconnect after ${gaps[1]} ms`);
  const drops = child.stdout().split('\n').filter((l) => l.includes('"live_ws_disconnected"')).map((l) => JSON.parse(l));
  assert.ok(drops.length >= 2);
  assert.ok(drops[0].reconnect_in_ms >= 2000 && drops[0].reconnect_in_ms <= 2400, JSON.stringify(drops[0]));
  assert.ok(drops[1].reconnect_in_ms >= 4000 && drops[1].reconnect_in_ms <= 4800, JSON.stringify(drops[1]));
  // Each connection opens before the exchange cuts it, so ws_connected flips briefly; it settles on false.
  const registry = new RunRegistry({ dir: ws.state });
  await waitFor(() => registry.get(runId)?.ws_connected === false, 2_000, 'ws_connected false');
  assert.equal(registry.get(runId).status, 'RUNNING');
  const { code } = await child.stop('SIGTERM');
  assert.equal(code, 0);
});
