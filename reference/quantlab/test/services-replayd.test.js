// replayd as a real process: health, auth, archive listing from a real moto bucket, bad config, SIGTERM.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { PutObjectCommand } from '@aws-sdk/client-s3';
import { archiveEnv, createBucket, motoClient, startMoto } from './helpers/moto.js';
import { freePort, runNode, spawnNode } from './helpers/proc.js';

const SCRIPT = 'services/replayd/server.js';
const TOKEN = 'replayd-test-token-5f1c2a';

/** GET a route with a deadline; resolves {status, body}. */
async function getJson(url, token) {
  const headers = token ? { authorization: `Bearer ${token}` } : {};
  const res = await fetch(url, { headers, signal: AbortSignal.timeout(5_000) });
  return { status: res.status, body: await res.json() };
}

/** Start replayd on a port from the OS and return it with its base URL. */
async function startReplayd(t, env = {}) {
  const proc = spawnNode(SCRIPT, [], { env: { REPLAYD_PORT: '0', REPLAYD_TOKEN: TOKEN, ...env } });
  t.after(() => proc.stop('SIGKILL'));
  const line = await proc.waitForLine((o) => o.event === 'replayd_listening');
  return { proc, base: `http://127.0.0.1:${line.port}` };
}

test('replayd answers /health, guards /replay/runs and stops cleanly on SIGTERM', async (t) => {
  const { proc, base } = await startReplayd(t);

  const health = await getJson(`${base}/health`);
  assert.equal(health.status, 200);
  assert.equal(health.body.status, 'ok');
  assert.equal(health.body.service, 'replayd');
  assert.equal(health.body.archive_enabled, false);

  const anonymous = await getJson(`${base}/replay/runs`);
  assert.equal(anonymous.status, 401);
  assert.equal(anonymous.body.error, 'UNAUTHORIZED');
  assert.equal((await getJson(`${base}/replay/runs`, 'wrong-token')).status, 401);

  const disabled = await getJson(`${base}/replay/runs`, TOKEN);
  assert.equal(disabled.status, 503);
  assert.equal(disabled.body.error, 'ARCHIVE_DISABLED');
  assert.match(disabled.body.message, /RUN_ARCHIVE_ENABLED=1/);

  const started = Date.now();
  const exit = await proc.stop('SIGTERM');
  assert.deepEqual(exit, { code: 0, signal: null });
  assert.ok(Date.now() - started < 1_000, `took ${Date.now() - started} ms to stop`);
  await proc.waitForLine((o) => o.event === 'replayd_stopped' && o.signal === 'SIGTERM', 100);
  assert.ok(!proc.stdout().includes(TOKEN), 'the token leaked into the log');
});

test('replayd exits 2 with one [config] line on bad config, without printing secrets', async () => {
  const badPort = await runNode(SCRIPT, [], { env: { REPLAYD_PORT: 'ninety' }, timeoutMs: 10_000 });
  assert.equal(badPort.code, 2);
  assert.match(badPort.stderr, /^\[config\] REPLAYD_PORT must be a port number from 0 to 65535 \(got "ninety"\)[^\n]*\n$/);

  const tooBig = await runNode(SCRIPT, [], { env: { REPLAYD_PORT: '70000' }, timeoutMs: 10_000 });
  assert.equal(tooBig.code, 2);

  const secret = 'replayd-secret-value-91ab';
  const noBucket = await runNode(SCRIPT, [], {
    env: { REPLAYD_PORT: '0', RUN_ARCHIVE_ENABLED: 'true', RUN_ARCHIVE_S3_SECRET_KEY: secret, RUN_ARCHIVE_S3_ACCESS_KEY: 'ak' },
    timeoutMs: 10_000,
  });
  assert.equal(noBucket.code, 2);
  assert.match(noBucket.stderr, /^\[config\] RUN_ARCHIVE_S3_BUCKET, RUN_ARCHIVE_S3_ENDPOINT are required when RUN_ARCHIVE_ENABLED=1;[^\n]*\n$/);
  assert.ok(!(noBucket.stdout + noBucket.stderr).includes(secret));
});

test('replayd lists and reads the runs archived in a real S3 bucket', async (t) => {
  const moto = await startMoto();
  t.after(() => moto.stop());
  const bucket = 'replayd-archive';
  await createBucket(moto.endpoint, bucket);
  const s3 = motoClient(moto.endpoint);
  t.after(() => s3.destroy());
  const put = (Key, Body) => s3.send(new PutObjectCommand({ Bucket: bucket, Key, Body }));
  const manifest = { replay_run_id: 'run-a', seed: 7, stop_reason: 'STREAM_END' };
  await put('replay_runs/replay_run_id=run-a/manifest.json', JSON.stringify(manifest));
  await put('replay_runs/replay_run_id=run-a/decisions.jsonl', '{"cursor":1}\n');
  await put('replay_runs/replay_run_id=run-a/stats.json', '{"decision_count":1}');
  await put('replay_runs/replay_run_id=run-b/manifest.json', '{"replay_run_id":"run-b"}');
  await put('replay_runs/_index.json', '{}');
  await put('audit/date=20240101/part-1-x.jsonl', '{}\n');

  const env = archiveEnv(moto.endpoint, bucket);
  const { proc, base } = await startReplayd(t, env);

  const health = await getJson(`${base}/health`);
  assert.equal(health.body.archive_enabled, true);
  assert.equal(health.body.bucket, bucket);

  const listed = await getJson(`${base}/replay/runs`, TOKEN);
  assert.equal(listed.status, 200);
  assert.equal(listed.body.count, 2);
  const [a, b] = listed.body.runs;
  assert.equal(a.replay_run_id, 'run-a');
  assert.deepEqual(a.objects, ['decisions.jsonl', 'manifest.json', 'stats.json']);
  assert.equal(a.complete, true);
  assert.equal(b.replay_run_id, 'run-b');
  assert.equal(b.complete, false);

  const one = await getJson(`${base}/replay/runs/run-a`, TOKEN);
  assert.equal(one.status, 200);
  assert.deepEqual(one.body.manifest, manifest);
  assert.deepEqual(one.body.stats, { decision_count: 1 });
  assert.equal((await getJson(`${base}/replay/runs/no-such-run`, TOKEN)).status, 404);

  await proc.stop('SIGTERM');
  const output = proc.stdout() + proc.stderr();
  for (const secret of [env.RUN_ARCHIVE_S3_SECRET_KEY, env.RUN_ARCHIVE_S3_ACCESS_KEY, TOKEN]) {
    assert.ok(!output.includes(secret), 'a secret leaked into the log');
  }
});

test('replayd reports an unreachable archive as 502 with what to check', async (t) => {
  // A port the OS just freed: nobody listens, so the connection is refused at once.
  const closed = `http://127.0.0.1:${await freePort()}`;
  const { proc, base } = await startReplayd(t, { ...archiveEnv(closed, 'nowhere'), REPLAYD_S3_TIMEOUT_MS: '3000' });
  const res = await getJson(`${base}/replay/runs`, TOKEN);
  assert.ok([502, 504].includes(res.status), `status ${res.status}`);
  assert.equal(res.body.error, 'ARCHIVE_UNREACHABLE');
  assert.match(res.body.message, /RUN_ARCHIVE_S3_\*/);
  await proc.stop('SIGTERM');
});
