// RunRegistry: records shared between processes, dead runs, stop requests.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { pathToFileURL } from 'node:url';
import { RunRegistry, isValidRunId } from '../core/state/RunRegistry.js';
import { TWIN_ROOT, runNode, spawnNode } from './helpers/proc.js';

const REGISTRY_URL = pathToFileURL(path.join(TWIN_ROOT, 'core/state/RunRegistry.js')).href;

/** A fresh registry in a temp folder, removed after the test. */
function tempRegistry(t) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'core-registry-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  return new RunRegistry({ dir });
}

test('register, get, update and list a run', (t) => {
  const registry = tempRegistry(t);
  const stored = registry.register({ live_run_id: 'run-1', strategy_id: 'canary' });
  assert.equal(stored.status, 'RUNNING');
  assert.equal(stored.pid, process.pid);
  assert.equal(stored.budget_pressure, 'LOW');
  assert.ok(fs.existsSync(path.join(registry.dir, 'runs', 'run-1.json')));

  registry.update('run-1', { last_event_ts: 123, ws_connected: true });
  const got = registry.get('run-1');
  assert.equal(got.last_event_ts, 123);
  assert.equal(got.ws_connected, true);
  assert.equal(got.strategy_id, 'canary');
  assert.deepEqual(registry.list().map((r) => r.live_run_id), ['run-1']);
  assert.equal(registry.get('missing'), null);
  assert.equal(registry.update('missing', { status: 'STOPPED' }), null);
});

test('a RUNNING run whose process is gone reads as ERROR', async (t) => {
  const registry = tempRegistry(t);
  const script = `import { RunRegistry } from ${JSON.stringify(REGISTRY_URL)};
new RunRegistry({ dir: process.argv[2] }).register({ live_run_id: 'gone-1' });`;
  const file = path.join(registry.dir, 'register.mjs');
  fs.writeFileSync(file, script);
  const { code, stderr } = await runNode(file, [registry.dir], { timeoutMs: 10_000 });
  assert.equal(code, 0, stderr);

  const [run] = registry.list();
  assert.equal(run.live_run_id, 'gone-1');
  assert.equal(run.status, 'ERROR');
  assert.equal(run.stop_reason, 'ERROR');
  // The correction is persisted for every other reader.
  const onDisk = JSON.parse(fs.readFileSync(path.join(registry.dir, 'runs', 'gone-1.json'), 'utf8'));
  assert.equal(onDisk.status, 'ERROR');
});

test('a STOPPED run keeps its status and stop reason', (t) => {
  const registry = tempRegistry(t);
  registry.register({ live_run_id: 'done-1', pid: 999_999_999 });
  registry.update('done-1', { status: 'STOPPED', stop_reason: 'BUDGET_EXCEEDED' });
  const run = registry.get('done-1');
  assert.equal(run.status, 'STOPPED');
  assert.equal(run.stop_reason, 'BUDGET_EXCEEDED');
});

test('requestStop is false for unknown and unsafe ids', (t) => {
  const registry = tempRegistry(t);
  assert.equal(registry.requestStop('nope'), false);
  for (const bad of ['..', '../x', 'a/b', '', 'a b']) {
    assert.equal(isValidRunId(bad), false, bad);
    assert.equal(registry.requestStop(bad), false, bad);
    assert.equal(registry.get(bad), null, bad);
  }
  assert.throws(() => registry.register({ live_run_id: '../evil' }), /invalid live_run_id/);
});

test('requestStop reaches watchStop once, with its reason', async (t) => {
  const registry = tempRegistry(t);
  registry.register({ live_run_id: 'w-1' });
  assert.equal(registry.stopRequested('w-1'), null);
  const calls = [];
  const stopped = new Promise((resolve) => {
    const unwatch = registry.watchStop('w-1', (reason) => { calls.push(reason); resolve(); }, 20);
    t.after(unwatch);
  });
  const asked = Date.now();
  assert.equal(registry.requestStop('w-1', 'KILL_SWITCH'), true);
  await stopped;
  assert.ok(Date.now() - asked < 1_000);
  assert.equal(registry.stopRequested('w-1'), 'KILL_SWITCH');
  await new Promise((r) => setTimeout(r, 60)); // two more poll periods: no second call
  assert.deepEqual(calls, ['KILL_SWITCH']);
});

test('registering a run again clears its old stop request', (t) => {
  const registry = tempRegistry(t);
  registry.register({ live_run_id: 'again-1' });
  registry.requestStop('again-1');
  registry.register({ live_run_id: 'again-1' });
  assert.equal(registry.stopRequested('again-1'), null);
});

test('another process sees a run registered here and its updates', async (t) => {
  const registry = tempRegistry(t);
  registry.register({ live_run_id: 'shared-1', strategy_id: 's' });
  const file = path.join(registry.dir, 'list.mjs');
  fs.writeFileSync(file, `import { RunRegistry } from ${JSON.stringify(REGISTRY_URL)};
const r = RunRegistry.fromEnv();
process.stdout.write(JSON.stringify(r.list()));`);
  const child = spawnNode(file, [], { env: { QUANTLAB_STATE_DIR: registry.dir } });
  t.after(() => child.stop('SIGKILL'));
  const { code } = await child.exited;
  assert.equal(code, 0, child.stderr());
  const runs = JSON.parse(child.stdout());
  assert.equal(runs.length, 1);
  assert.equal(runs[0].live_run_id, 'shared-1');
  assert.equal(runs[0].status, 'RUNNING');
});

test('fromEnv defaults to /tmp/quantlab-state', () => {
  assert.equal(RunRegistry.fromEnv({}).dir, '/tmp/quantlab-state');
  assert.equal(RunRegistry.fromEnv({ QUANTLAB_STATE_DIR: '/x/y' }).dir, '/x/y');
});
