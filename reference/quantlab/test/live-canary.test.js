// The canary as operators run it (CONTRACT section 5): real processes, a local exchange behind the
// harness preload, a real moto bucket, a real audit spool, and the observer for the registry view.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { startExchange } from './helpers/exchange.js';
import {
  auditEntries, CANARY, findLine, liveArgs, liveEnv, localArchive, s3Exists, s3Keys, s3Text, startObserver, workspace,
} from './helpers/live.js';
import { archiveEnv, createBucket, MOTO_SECRET_KEY, startMoto } from './helpers/moto.js';
import { runNode, spawnNode, TWIN_ROOT } from './helpers/proc.js';

let moto;
before(async () => { moto = await startMoto(); });
after(async () => { if (moto) await moto.stop(); });

/**
 * @param {{stdout:string}} out
 * @returns {object} the PASS line
 */
function passLine(out) {
  const line = findLine(out.stdout, (o) => o.event === 'canary_live');
  assert.ok(line, `no canary_live line on stdout:\n${out.stdout}\n${out.stderr}`);
  assert.equal(line.status, 'PASS', JSON.stringify(line));
  return line;
}

/**
 * @param {{code:number|null, stderr:string, stdout:string}} out
 * @param {string} error
 */
function assertFail(out, error) {
  assert.equal(out.code, 1, `exit code; stderr:\n${out.stderr}`);
  const line = findLine(out.stderr, (o) => o.event === 'canary_live');
  assert.deepEqual(line, { event: 'canary_live', status: 'FAIL', error });
  assert.equal(findLine(out.stdout, (o) => o.event === 'canary_live'), undefined, 'no verdict on stdout');
}

/**
 * The stop reason is the same in the canary line, /observer/runs, the manifest and RUN_STOP.
 * @param {import('node:test').TestContext} t
 * @param {object} ws workspace
 * @param {object} line PASS line
 * @param {string} reason
 */
async function assertStopReasonEverywhere(t, ws, line, reason) {
  assert.equal(line.stop_reason, reason);
  const observer = await startObserver(t, ws);
  const { status, body } = await observer.request('GET', '/observer/runs');
  assert.equal(status, 200);
  const run = body.runs.find((r) => r.live_run_id === line.live_run_id);
  assert.equal(run.status, 'STOPPED');
  assert.equal(run.stop_reason, reason);
  assert.equal(localArchive(ws.archive, line.live_run_id, 'manifest.json').stop_reason, reason);
  const stop = (await auditEntries(ws.spool, line.live_run_id)).find((e) => e.action === 'RUN_STOP');
  assert.equal(stop.reason, reason);
  assert.equal(stop.metadata.stop_reason, reason);
}

test('canary --mock: PASS with a local archive and audit lines', async (t) => {
  const ws = workspace(t);
  const out = await runNode(CANARY, liveArgs(['--mock', '--archive-dir', ws.archive, '--seed', '7']), { env: ws.env() });
  assert.equal(out.code, 0, out.stderr);
  const line = passLine(out);
  assert.match(line.live_run_id, /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
  assert.equal(line.stop_reason, 'STREAM_END');
  assert.equal(line.emitted_event_count, 20);
  assert.ok(line.decision_count >= 10, `decisions ${line.decision_count}`);
  assert.equal(line.archive_dir, path.join(ws.archive, 'replay_runs', `replay_run_id=${line.live_run_id}`) + path.sep);
  assert.deepEqual(fs.readdirSync(line.archive_dir).sort(), ['decisions.jsonl', 'manifest.json', 'stats.json']);
  const manifest = localArchive(ws.archive, line.live_run_id, 'manifest.json');
  assert.deepEqual(Object.keys(manifest), ['finished_at', 'manifest_id', 'parquet_path', 'replay_run_id', 'seed', 'started_at', 'stop_reason']);
  assert.equal(manifest.seed, '7');
  const decisions = localArchive(ws.archive, line.live_run_id, 'decisions.jsonl');
  assert.equal(decisions.length, line.decision_count);
  assert.ok(decisions.every((d) => d.replay_run_id === line.live_run_id && ['BUY', 'SELL'].includes(d.decision.side)));
  assert.equal(localArchive(ws.archive, line.live_run_id, 'stats.json').emitted_event_count, 20);
  assert.match(line.audit_dir, /date=\d{8}$/);
  const entries = await auditEntries(ws.spool, line.live_run_id);
  assert.deepEqual(entries.map((e) => e.action), ['RUN_START', 'RUN_STOP']);
  assert.equal(entries[0].target_type, 'run');
  assert.equal(entries[0].metadata.live_run_id, line.live_run_id);
  assert.ok(fs.readdirSync(line.audit_dir).length >= 2);
});

test('canary live: PASS through the preload against a local exchange, archive and audit in S3', async (t) => {
  const ws = workspace(t);
  const exchange = await startExchange({ rate: 40 });
  t.after(() => exchange.close());
  const bucket = 'canary-live-pass';
  await createBucket(moto.endpoint, bucket);
  const env = ws.env({ ...liveEnv(exchange.url), ...archiveEnv(moto.endpoint, bucket) });
  const child = spawnNode(CANARY, liveArgs(['--duration-seconds', '3']), { env });
  t.after(() => child.stop('SIGKILL'));
  const line = await child.waitForLine((o) => o.event === 'canary_live', 20_000);
  const printedAt = Date.now();
  const { code } = await child.exited;
  assert.equal(code, 0, child.stderr());
  assert.equal(line.status, 'PASS', JSON.stringify(line));
  assert.equal(line.stop_reason, 'STREAM_END');
  assert.ok(line.emitted_event_count > 20, `events ${line.emitted_event_count}`);
  assert.ok(line.decision_count >= 10, `decisions ${line.decision_count}`);
  const prefix = `replay_runs/replay_run_id=${line.live_run_id}/`;
  assert.equal(line.archive_dir, `s3://${bucket}/${prefix}`);

  // The verdict comes quickly after the run's end (start + duration).
  const start = findLine(child.stdout(), (o) => o.event === 'live_run_start');
  const entries = await auditEntries(ws.spool, line.live_run_id);
  const runStartMs = Number(BigInt(entries[0].ts) / 1_000_000n);
  assert.ok(start && printedAt - (runStartMs + 3000) < 500, `verdict ${printedAt - runStartMs - 3000} ms after the run's end`);

  assert.equal(exchange.connections.length, 1);
  assert.match(exchange.connections[0].path, /^\/stream\?streams=btcusdt@bookTicker\/btcusdt@aggTrade\/btcusdt@markPrice@1s\/ethusdt@bookTicker/);
  for (const name of ['manifest.json', 'decisions.jsonl', 'stats.json']) {
    assert.ok(await s3Exists(moto.endpoint, bucket, prefix + name), name);
  }
  const manifest = JSON.parse(await s3Text(moto.endpoint, bucket, `${prefix}manifest.json`));
  assert.equal(manifest.stop_reason, 'STREAM_END');
  assert.equal(manifest.replay_run_id, line.live_run_id);
  const stats = JSON.parse(await s3Text(moto.endpoint, bucket, `${prefix}stats.json`));
  assert.equal(stats.emitted_event_count, line.emitted_event_count);
  assert.equal(stats.decision_count, line.decision_count);

  // Every spool entry of the run was copied to audit/date=YYYYMMDD/<same file name>.
  const day = path.basename(line.audit_dir);
  const auditKeys = await s3Keys(moto.endpoint, bucket, `audit/${day}/`);
  const spoolFiles = fs.readdirSync(line.audit_dir).filter((f) => f.endsWith('.jsonl'));
  assert.ok(spoolFiles.length >= 2);
  for (const file of spoolFiles) assert.ok(auditKeys.includes(`audit/${day}/${file}`), file);
  assert.deepEqual([entries[0].action, entries.at(-1).action], ['RUN_START', 'RUN_STOP']);
  assert.ok(!child.stdout().includes(MOTO_SECRET_KEY) && !child.stderr().includes(MOTO_SECRET_KEY), 'secret in output');
});

test('canary FAIL: live WS disabled, before any connection', async (t) => {
  const ws = workspace(t);
  const exchange = await startExchange();
  t.after(() => exchange.close());
  const env = ws.env(liveEnv(exchange.url));
  delete env.CORE_LIVE_WS_ENABLED;
  for (const value of [undefined, '0', 'off']) {
    const out = await runNode(CANARY, liveArgs(['--duration-seconds', '2']), { env: { ...env, CORE_LIVE_WS_ENABLED: value } });
    assertFail(out, 'CORE_LIVE_WS_ENABLED=0 (live WS disabled)');
  }
  assert.equal(exchange.connections.length, 0);
  assert.equal(fs.existsSync(path.join(ws.state, 'runs')), false, 'no run was registered');
});

test('canary FAIL: archiving off, after the run', async (t) => {
  const ws = workspace(t);
  const exchange = await startExchange();
  t.after(() => exchange.close());
  const out = await runNode(CANARY, liveArgs(['--duration-seconds', '1']), { env: ws.env({ ...liveEnv(exchange.url), RUN_ARCHIVE_ENABLED: '0' }) });
  assertFail(out, 'RUN_ARCHIVE_ENABLED=0 (archive check skipped)');
  assert.equal(exchange.connections.length, 1, 'the run itself happened');
});

test('canary FAIL: archive bucket unreachable logs live_archive_error and the run ends as ERROR', async (t) => {
  const ws = workspace(t);
  const exchange = await startExchange();
  t.after(() => exchange.close());
  const env = ws.env({ ...liveEnv(exchange.url), ...archiveEnv(moto.endpoint, 'no-such-bucket') });
  const out = await runNode(CANARY, liveArgs(['--duration-seconds', '1']), { env });
  assert.equal(out.code, 1);
  const archiveError = findLine(out.stderr, (o) => o.event === 'live_archive_error');
  assert.ok(archiveError && archiveError.live_run_id && /NoSuchBucket/.test(archiveError.error), out.stderr);
  const fail = findLine(out.stderr, (o) => o.event === 'canary_live');
  assert.equal(fail.status, 'FAIL');
  assert.match(fail.error, /^Archive (objects missing for live run|check failed)/);
  const observer = await startObserver(t, ws);
  const { body } = await observer.request('GET', '/observer/runs');
  assert.equal(body.runs.find((r) => r.live_run_id === archiveError.live_run_id).status, 'ERROR');
  assert.ok(!out.stderr.includes(MOTO_SECRET_KEY));
});

test('canary FAIL: audit entries missing (AUDIT_ENABLED=0)', async (t) => {
  const ws = workspace(t);
  const out = await runNode(CANARY, liveArgs(['--mock', '--archive-dir', ws.archive]), { env: ws.env({ AUDIT_ENABLED: '0' }) });
  assertFail(out, 'Audit entries not found for live run');
});

test('canary: a missing required flag prints a usage line and exits 1', async (t) => {
  const ws = workspace(t);
  for (const drop of ['--exchange', '--symbols', '--strategy', '--dataset-parquet', '--dataset-meta']) {
    const args = liveArgs(['--mock']);
    args.splice(args.indexOf(drop), 2);
    const out = await runNode(CANARY, args, { env: ws.env() });
    assert.equal(out.code, 1);
    assert.match(out.stderr, new RegExp(`^Usage: node tools/run-canary-live\\.js --exchange .*\\(missing ${drop}\\)\\n$`));
    assert.equal(out.stdout, '');
  }
});

test('canary: max_events budget stops the run with BUDGET_EXCEEDED everywhere', async (t) => {
  const ws = workspace(t);
  const out = await runNode(CANARY, liveArgs(['--mock', '--archive-dir', ws.archive]), { env: ws.env({ RUN_BUDGET_MAX_EVENTS: '5' }) });
  assert.equal(out.code, 0, out.stderr);
  const line = passLine(out);
  await assertStopReasonEverywhere(t, ws, line, 'BUDGET_EXCEEDED');
  assert.equal(line.emitted_event_count, 6);
  const logged = findLine(out.stdout, (o) => o.event === 'budget_exceeded');
  assert.equal(logged.reason, 'max_events 6');
  const entry = (await auditEntries(ws.spool, line.live_run_id)).find((e) => e.action === 'BUDGET_EXCEEDED');
  assert.equal(entry.reason, 'max_events 6');
  assert.deepEqual([entry.metadata.budget, entry.metadata.value], ['max_events', 6]);
});

test('canary: max_decision_rate budget stops the run with BUDGET_EXCEEDED everywhere', async (t) => {
  const ws = workspace(t);
  const out = await runNode(CANARY, liveArgs(['--mock', '--archive-dir', ws.archive]), { env: ws.env({ RUN_BUDGET_MAX_DECISIONS_PER_MIN: '3' }) });
  const line = passLine(out);
  await assertStopReasonEverywhere(t, ws, line, 'BUDGET_EXCEEDED');
  const entry = (await auditEntries(ws.spool, line.live_run_id)).find((e) => e.action === 'BUDGET_EXCEEDED');
  assert.deepEqual([entry.reason, entry.metadata.budget, entry.metadata.value], ['max_decision_rate 4', 'max_decision_rate', 4]);
  assert.equal(line.decision_count, 4);
});

test('canary: max_duration budget stops a live run with BUDGET_EXCEEDED everywhere', async (t) => {
  const ws = workspace(t);
  const exchange = await startExchange();
  t.after(() => exchange.close());
  const env = ws.env({ ...liveEnv(exchange.url), RUN_BUDGET_MAX_RUN_SECONDS: '1', PROMOTION_GUARDS_ENABLED: '0' });
  // A live run archives to S3; --archive-dir is only for --mock, so check the manifest in moto.
  const bucket = 'canary-duration';
  await createBucket(moto.endpoint, bucket);
  const started = Date.now();
  const out = await runNode(CANARY, liveArgs(['--duration-seconds', '4']), { env: { ...env, ...archiveEnv(moto.endpoint, bucket) } });
  const line = passLine(out);
  assert.equal(line.stop_reason, 'BUDGET_EXCEEDED');
  assert.ok(Date.now() - started < 3800, 'stopped by the budget, not the duration');
  const entry = (await auditEntries(ws.spool, line.live_run_id)).find((e) => e.action === 'BUDGET_EXCEEDED');
  assert.equal(entry.metadata.budget, 'max_duration');
  assert.ok(entry.metadata.value > 1 && entry.metadata.value < 2, `value ${entry.metadata.value}`);
  assert.match(entry.reason, /^max_duration 1\.\d+$/);
  const manifest = JSON.parse(await s3Text(moto.endpoint, bucket, `replay_runs/replay_run_id=${line.live_run_id}/manifest.json`));
  assert.equal(manifest.stop_reason, 'BUDGET_EXCEEDED');
  const observer = await startObserver(t, ws);
  const { body } = await observer.request('GET', '/observer/runs');
  assert.equal(body.runs.find((r) => r.live_run_id === line.live_run_id).stop_reason, 'BUDGET_EXCEEDED');
  const stop = (await auditEntries(ws.spool, line.live_run_id)).find((e) => e.action === 'RUN_STOP');
  assert.equal(stop.metadata.stop_reason, 'BUDGET_EXCEEDED');
});

test('canary: a losing strategy trips the loss_streak guard (PROMOTION_GUARD_FAIL everywhere)', async (t) => {
  const ws = workspace(t);
  // Mock prices only rise, so a strategy that sells first and buys back loses on every round trip.
  const strategy = path.join(ws.dir, 'short-strategy.mjs');
  fs.writeFileSync(strategy, [
    'export class ShortStrategy {',
    '  constructor() { this.n = new Map(); }',
    '  onEvent(event) {',
    '    const n = (this.n.get(event.symbol) || 0) + 1;',
    '    this.n.set(event.symbol, n);',
    "    return { symbol: event.symbol, side: n % 2 ? 'SELL' : 'BUY', qty: 0.01 };",
    '  }',
    '}',
  ].join('\n'));
  const out = await runNode(CANARY, liveArgs(['--mock', '--archive-dir', ws.archive], strategy), { env: ws.env({ PROMOTION_GUARD_LOSS_STREAK: '2' }) });
  const line = passLine(out);
  await assertStopReasonEverywhere(t, ws, line, 'PROMOTION_GUARD_FAIL');
  const logged = findLine(out.stdout, (o) => o.event === 'promotion_guard_fail');
  assert.equal(logged.guard, 'loss_streak');
  const entry = (await auditEntries(ws.spool, line.live_run_id)).find((e) => e.action === 'GUARD_FAIL');
  assert.equal(entry.metadata.guard, 'loss_streak');
  assert.ok(line.emitted_event_count < 20);
});

test('canary: too few decisions at the end fail the min_decisions guard', async (t) => {
  const ws = workspace(t);
  const out = await runNode(CANARY, liveArgs(['--mock', '--archive-dir', ws.archive]), { env: ws.env({ PROMOTION_GUARD_MIN_DECISIONS: '50' }) });
  const line = passLine(out);
  await assertStopReasonEverywhere(t, ws, line, 'PROMOTION_GUARD_FAIL');
  const entry = (await auditEntries(ws.spool, line.live_run_id)).find((e) => e.action === 'GUARD_FAIL');
  assert.deepEqual([entry.metadata.guard, entry.metadata.value], ['min_decisions', line.decision_count]);
});

test('canary loads core/.env without overriding variables already set', async (t) => {
  const ws = workspace(t);
  // A checkout of its own (links to the real modules), so the test never writes the twin's core/.env.
  const root = path.join(ws.dir, 'checkout');
  fs.mkdirSync(path.join(root, 'core'), { recursive: true });
  fs.mkdirSync(path.join(root, 'tools'));
  for (const dir of fs.readdirSync(path.join(TWIN_ROOT, 'core'), { withFileTypes: true }).filter((d) => d.isDirectory())) {
    fs.symlinkSync(path.join(TWIN_ROOT, 'core', dir.name), path.join(root, 'core', dir.name));
  }
  fs.symlinkSync(path.join(TWIN_ROOT, 'node_modules'), path.join(root, 'node_modules'));
  fs.symlinkSync(path.join(TWIN_ROOT, 'strategies'), path.join(root, 'strategies'));
  fs.copyFileSync(path.join(TWIN_ROOT, CANARY), path.join(root, CANARY));
  fs.writeFileSync(path.join(root, 'core', '.env'), '# canary settings\nRUN_BUDGET_MAX_EVENTS=5\nAUDIT_ENABLED="0"\n');
  const out = await runNode(CANARY, liveArgs(['--mock', '--archive-dir', ws.archive]), { cwd: root, env: ws.env({ AUDIT_ENABLED: '1' }) });
  const line = passLine(out);
  assert.equal(line.stop_reason, 'BUDGET_EXCEEDED', 'RUN_BUDGET_MAX_EVENTS came from core/.env');
  assert.ok((await auditEntries(ws.spool, line.live_run_id)).length > 0, 'AUDIT_ENABLED=1 from the process won');
});
