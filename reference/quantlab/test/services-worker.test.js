// The job worker as a real process over a real jobs folder: runs jobs, retries with backoff,
// files outcomes in done/ and failed/, bad config, SIGTERM mid-job.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { ListObjectsV2Command } from '@aws-sdk/client-s3';
import { archiveEnv, createBucket, motoClient, startMoto } from './helpers/moto.js';
import { jsonLines, runNode, spawnNode } from './helpers/proc.js';

const SCRIPT = 'core/worker/job_worker.js';
const TOKEN = 'worker-test-token-77d0e3';
const FAST = ['--poll_ms', '20', '--max_retries', '3', '--backoff_ms', '20'];

/** A fresh state folder, removed after the test. */
function tempState(t) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ql-worker-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** Drop a job the way writers should: .tmp then rename. */
function addJob(stateDir, name, job) {
  const dir = path.join(stateDir, 'jobs');
  fs.mkdirSync(dir, { recursive: true });
  fs.writeFileSync(path.join(dir, `${name}.json.tmp`), JSON.stringify(job));
  fs.renameSync(path.join(dir, `${name}.json.tmp`), path.join(dir, `${name}.json`));
}

/** Poll until a file exists, then parse it. */
async function waitForJson(file, timeoutMs = 10_000) {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (fs.existsSync(file)) return JSON.parse(fs.readFileSync(file, 'utf8'));
    await new Promise((r) => setTimeout(r, 20));
  }
  throw new Error(`${file} did not appear within ${timeoutMs} ms`);
}

async function startWorker(t, stateDir, args = FAST, env = {}) {
  const proc = spawnNode(SCRIPT, args, {
    env: { WORKER_HEALTH_PORT: '0', WORKER_TOKEN: TOKEN, QUANTLAB_STATE_DIR: stateDir, AUDIT_SPOOL_DIR: path.join(stateDir, 'audit'), ...env },
  });
  t.after(() => proc.stop('SIGKILL'));
  const line = await proc.waitForLine((o) => o.event === 'worker_listening');
  return { proc, base: `http://127.0.0.1:${line.port}`, line };
}

async function getJson(url, token) {
  const headers = token ? { authorization: `Bearer ${token}` } : {};
  const res = await fetch(url, { headers, signal: AbortSignal.timeout(5_000) });
  return { status: res.status, body: await res.json() };
}

test('worker answers /health, runs jobs into done/ and stops cleanly on SIGTERM', async (t) => {
  const state = tempState(t);
  addJob(state, 'a-noop', { type: 'noop' });
  addJob(state, 'b-audit', { type: 'audit', action: 'JOB_TEST', target_id: 'target-1', metadata: { n: 1 } });
  const { proc, base, line } = await startWorker(t, state);
  assert.deepEqual([line.poll_ms, line.max_retries, line.backoff_ms], [20, 3, 20]);

  const noop = await waitForJson(path.join(state, 'jobs', 'done', 'a-noop.json'));
  assert.equal(noop.status, 'done');
  assert.equal(noop.attempts, 1);
  const audit = await waitForJson(path.join(state, 'jobs', 'done', 'b-audit.json'));
  assert.equal(audit.status, 'done');
  // The audit job really wrote an entry to the spool.
  const spoolDays = fs.readdirSync(path.join(state, 'audit'));
  assert.equal(spoolDays.length, 1);
  const [part] = fs.readdirSync(path.join(state, 'audit', spoolDays[0]));
  const entry = JSON.parse(fs.readFileSync(path.join(state, 'audit', spoolDays[0], part), 'utf8'));
  assert.equal(entry.action, 'JOB_TEST');
  assert.equal(entry.audit_id, audit.result.audit_id);
  assert.deepEqual(fs.readdirSync(path.join(state, 'jobs')).filter((n) => n.endsWith('.json')), []);

  const health = await getJson(`${base}/health`);
  assert.equal(health.status, 200);
  assert.equal(health.body.status, 'ok');
  assert.equal(health.body.service, 'worker');
  assert.equal(health.body.done, 2);
  assert.equal(health.body.pending, 0);

  assert.equal((await getJson(`${base}/jobs`)).status, 401);
  const jobs = await getJson(`${base}/jobs`, TOKEN);
  assert.equal(jobs.status, 200);
  assert.deepEqual(jobs.body.done, ['a-noop.json', 'b-audit.json']);

  const started = Date.now();
  assert.deepEqual(await proc.stop('SIGTERM'), { code: 0, signal: null });
  assert.ok(Date.now() - started < 1_000, `took ${Date.now() - started} ms to stop`);
  await proc.waitForLine((o) => o.event === 'worker_stopped' && o.signal === 'SIGTERM', 100);
});

test('with archiving on, an audit job also lands in the bucket of a real S3 server', async (t) => {
  const moto = await startMoto();
  t.after(() => moto.stop());
  const bucket = 'worker-audit';
  await createBucket(moto.endpoint, bucket);
  const s3 = motoClient(moto.endpoint);
  t.after(() => s3.destroy());
  const state = tempState(t);
  addJob(state, 'audit', { type: 'audit', action: 'JOB_TEST', target_id: 'target-2' });
  const env = archiveEnv(moto.endpoint, bucket);
  const { proc } = await startWorker(t, state, FAST, env);

  const done = await waitForJson(path.join(state, 'jobs', 'done', 'audit.json'));
  const keys = (await s3.send(new ListObjectsV2Command({ Bucket: bucket, Prefix: 'audit/' }))).Contents?.map((o) => o.Key) || [];
  assert.equal(keys.length, 1);
  assert.match(keys[0], new RegExp(`^audit/date=\\d{8}/part-\\d+-${done.result.audit_id}\\.jsonl$`));
  await proc.stop('SIGTERM');
  assert.ok(!(proc.stdout() + proc.stderr()).includes(env.RUN_ARCHIVE_S3_SECRET_KEY));
});

test('worker retries a failing job with backoff, then succeeds or files it in failed/', async (t) => {
  const state = tempState(t);
  addJob(state, 'flaky', { type: 'fail', fail_times: 2, message: 'exchange busy' });
  addJob(state, 'hopeless', { type: 'fail', message: 'always broken' });
  addJob(state, 'unknown', { type: 'teleport' });
  const { proc } = await startWorker(t, state, ['--poll_ms=20', '--max_retries=2', '--backoff_ms=30']);

  const flaky = await waitForJson(path.join(state, 'jobs', 'done', 'flaky.json'));
  assert.equal(flaky.attempts, 3);
  assert.deepEqual(flaky.result, { succeeded_on_attempt: 3 });

  const hopeless = await waitForJson(path.join(state, 'jobs', 'failed', 'hopeless.json'));
  assert.equal(hopeless.status, 'failed');
  assert.equal(hopeless.attempts, 3, 'one attempt plus max_retries retries');
  assert.equal(hopeless.error, 'always broken');

  // Retrying cannot fix an unknown type: it fails at once.
  const unknown = await waitForJson(path.join(state, 'jobs', 'failed', 'unknown.json'));
  assert.equal(unknown.attempts, 1);
  assert.match(unknown.error, /unknown job type "teleport"/);

  await proc.waitForLine((o) => o.event === 'job_failed' && o.job_id === 'hopeless');
  const retries = jsonLines(proc.stdout()).filter((o) => o.event === 'job_retry' && o.job_id === 'hopeless');
  assert.deepEqual(retries.map((r) => r.backoff_ms), [30, 60], 'backoff doubles');
  await proc.stop('SIGTERM');
});

test('a SIGTERM during a job stops within a second and puts the job back in the queue', async (t) => {
  const state = tempState(t);
  addJob(state, 'long', { type: 'sleep', ms: 60_000 });
  const { proc, base } = await startWorker(t, state);
  const deadline = Date.now() + 5_000;
  while ((await getJson(`${base}/health`)).body.current_job !== 'long.json') {
    assert.ok(Date.now() < deadline, 'the sleep job never started');
    await new Promise((r) => setTimeout(r, 20));
  }
  const started = Date.now();
  assert.deepEqual(await proc.stop('SIGTERM'), { code: 0, signal: null });
  assert.ok(Date.now() - started < 1_000, `took ${Date.now() - started} ms to stop`);
  const requeued = JSON.parse(fs.readFileSync(path.join(state, 'jobs', 'long.json'), 'utf8'));
  assert.equal(requeued.type, 'sleep');
  assert.equal(requeued.attempts, 0, 'an interrupted attempt is not counted');
  assert.deepEqual(fs.readdirSync(path.join(state, 'jobs', 'running')), []);
});

test('worker exits 2 with one [config] line on bad flags or config', async (t) => {
  const state = tempState(t);
  const env = { QUANTLAB_STATE_DIR: state, WORKER_HEALTH_PORT: '0' };
  const cases = [
    [['--poll_ms', 'soon'], env, /^\[config\] --poll_ms must be a whole number >= 1 \(got "soon"\)\.\n$/],
    [['--max_retries'], env, /^\[config\] --max_retries needs a value, such as --max_retries 3\.\n$/],
    [['--retries', '3'], env, /^\[config\] unknown argument "--retries"; usage: /],
    [[], { ...env, WORKER_HEALTH_PORT: '-1' }, /^\[config\] WORKER_HEALTH_PORT must be a port number/],
    [[], { ...env, RUN_ARCHIVE_ENABLED: '1', RUN_ARCHIVE_S3_BUCKET: 'b' }, /^\[config\] RUN_ARCHIVE_S3_ENDPOINT, RUN_ARCHIVE_S3_ACCESS_KEY, RUN_ARCHIVE_S3_SECRET_KEY are required/],
  ];
  for (const [args, caseEnv, pattern] of cases) {
    const res = await runNode(SCRIPT, args, { env: caseEnv, timeoutMs: 10_000 });
    assert.equal(res.code, 2, `${args.join(' ')}: ${res.stderr}`);
    assert.match(res.stderr, pattern);
    assert.equal(res.stderr.trim().split('\n').length, 1, 'one line');
  }
});
