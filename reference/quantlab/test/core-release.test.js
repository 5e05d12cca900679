// ConfigCheck and SelfTest, run as real processes against a real moto S3 server.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { PutObjectCommand } from '@aws-sdk/client-s3';
import { archiveEnv, createBucket, motoClient, startMoto } from './helpers/moto.js';
import { freePort, jsonLines, runNode } from './helpers/proc.js';

const TOKEN = 'release-test-token-0123456789';
const STEPS = ['s3_reachable', 'index_readable', 'audit_spool', 'observer_auth'];
let moto;
let work;
let bucketCount = 0;

before(async () => {
  moto = await startMoto();
  work = fs.mkdtempSync(path.join(os.tmpdir(), 'core-release-'));
});
after(async () => {
  await moto?.stop();
  fs.rmSync(work, { recursive: true, force: true });
});

/** A new bucket; optionally with a replay_runs/_index.json body. */
async function bucketWith(indexBody) {
  bucketCount += 1;
  const bucket = `core-release-${process.pid}-${bucketCount}`;
  await createBucket(moto.endpoint, bucket);
  if (indexBody !== undefined) {
    const client = motoClient(moto.endpoint);
    try {
      await client.send(new PutObjectCommand({ Bucket: bucket, Key: 'replay_runs/_index.json', Body: indexBody }));
    } finally {
      client.destroy();
    }
  }
  return bucket;
}

/** The env of a healthy host: token, spool and state in the test folder, archiving on. */
function hostEnv(bucket, extra = {}) {
  return {
    OBSERVER_TOKEN: TOKEN,
    AUDIT_SPOOL_DIR: path.join(work, 'audit'),
    QUANTLAB_STATE_DIR: path.join(work, 'state'),
    ...(bucket ? archiveEnv(moto.endpoint, bucket) : {}),
    ...extra,
  };
}

const configCheck = (env) => runNode('core/release/ConfigCheck.js', [], { env });
const selfTest = (env) => runNode('core/release/SelfTest.js', [], { env, timeoutMs: 30_000 });

/** Assert no secret of env appears in a process's output. */
function assertNoSecrets(env, ...outputs) {
  for (const name of ['OBSERVER_TOKEN', 'RUN_ARCHIVE_S3_ACCESS_KEY', 'RUN_ARCHIVE_S3_SECRET_KEY']) {
    if (!env[name]) continue;
    for (const out of outputs) assert.ok(!out.includes(env[name]), `${name} leaked: ${out}`);
  }
}

/** The self_test step lines on stdout, by step name. */
function passedSteps(stdout) {
  return jsonLines(stdout).filter((l) => l.event === 'self_test' && l.step);
}

/** The single error line on stderr. */
function errorLine(stderr) {
  const lines = jsonLines(stderr).filter((l) => l.event === 'self_test');
  assert.equal(lines.length, 1, stderr);
  assert.equal(lines[0].status, 'error');
  assert.equal(typeof lines[0].duration_ms, 'number');
  return lines[0];
}

test('ConfigCheck without env: OBSERVER_TOKEN is required, exit 1', async () => {
  const { code, stdout, stderr } = await configCheck({});
  assert.equal(code, 1);
  assert.equal(stderr, '[config] OBSERVER_TOKEN is required\n');
  assert.equal(stdout, '');
});

test('ConfigCheck with a token and archiving off passes', async () => {
  const env = { OBSERVER_TOKEN: TOKEN };
  const { code, stdout, stderr } = await configCheck(env);
  assert.equal(code, 0, stderr);
  assert.equal(stdout, '{"event":"config_check","status":"ok"}\n');
  assertNoSecrets(env, stdout, stderr);
});

test('ConfigCheck with archiving on names each missing RUN_ARCHIVE_S3_* variable', async () => {
  const all = await configCheck({ OBSERVER_TOKEN: TOKEN, RUN_ARCHIVE_ENABLED: 'true' });
  assert.equal(all.code, 1);
  assert.equal(all.stderr, [
    '[config] RUN_ARCHIVE_S3_BUCKET is required',
    '[config] RUN_ARCHIVE_S3_ENDPOINT is required',
    '[config] RUN_ARCHIVE_S3_ACCESS_KEY is required',
    '[config] RUN_ARCHIVE_S3_SECRET_KEY is required',
    '',
  ].join('\n'));

  const env = { ...archiveEnv('http://127.0.0.1:1', 'b-x'), RUN_ARCHIVE_S3_SECRET_KEY: '  ' };
  const some = await configCheck(env);
  assert.equal(some.code, 1);
  assert.equal(some.stderr, '[config] OBSERVER_TOKEN is required\n[config] RUN_ARCHIVE_S3_SECRET_KEY is required\n');
  assertNoSecrets(env, some.stdout, some.stderr);

  const full = await configCheck({ OBSERVER_TOKEN: TOKEN, ...archiveEnv('http://127.0.0.1:1', 'b-x') });
  assert.equal(full.code, 0, full.stderr);
  assert.equal(full.stdout, '{"event":"config_check","status":"ok"}\n');
});

test('SelfTest passes every step against a reachable bucket without an index', async () => {
  const env = hostEnv(await bucketWith());
  const { code, stdout, stderr } = await selfTest(env);
  assert.equal(code, 0, stderr);
  const steps = passedSteps(stdout);
  assert.deepEqual(steps.map((s) => [s.step, s.status]), STEPS.map((s) => [s, 'ok']));
  assert.equal(steps[1].present, false);
  const final = jsonLines(stdout).at(-1);
  assert.equal(final.event, 'self_test');
  assert.equal(final.status, 'ok');
  assert.equal(typeof final.duration_ms, 'number');
  assertNoSecrets(env, stdout, stderr);
  // The spool probe leaves nothing behind.
  const day = fs.readdirSync(env.AUDIT_SPOOL_DIR);
  assert.equal(day.length, 1);
  assert.match(day[0], /^date=\d{8}$/);
  assert.deepEqual(fs.readdirSync(path.join(env.AUDIT_SPOOL_DIR, day[0])), []);
});

test('SelfTest reads a valid index (present:true)', async () => {
  const env = hostEnv(await bucketWith('{"runs":[]}'));
  const { code, stdout, stderr } = await selfTest(env);
  assert.equal(code, 0, stderr);
  const index = passedSteps(stdout).find((s) => s.step === 'index_readable');
  assert.equal(index.present, true);
});

test('SelfTest with archiving off skips the S3 steps and passes', async () => {
  const { code, stdout, stderr } = await selfTest(hostEnv(null));
  assert.equal(code, 0, stderr);
  assert.deepEqual(passedSteps(stdout).map((s) => [s.step, s.status]), [
    ['s3_reachable', 'skipped'], ['index_readable', 'skipped'], ['audit_spool', 'ok'], ['observer_auth', 'ok'],
  ]);
});

test('SelfTest fails s3_reachable when nothing listens at the endpoint', async () => {
  const env = hostEnv('any-bucket', { RUN_ARCHIVE_S3_ENDPOINT: `http://127.0.0.1:${await freePort()}` });
  const { code, stdout, stderr } = await selfTest(env);
  assert.equal(code, 1);
  assert.deepEqual(passedSteps(stdout), []);
  assert.match(errorLine(stderr).error, /^s3_reachable: .*ECONNREFUSED/);
  assertNoSecrets(env, stdout, stderr);
});

test('SelfTest fails s3_reachable when the S3 server has stopped', async () => {
  const stopped = await startMoto();
  await createBucket(stopped.endpoint, 'was-there');
  await stopped.stop();
  const env = hostEnv('was-there', { RUN_ARCHIVE_S3_ENDPOINT: stopped.endpoint });
  const { code, stderr } = await selfTest(env);
  assert.equal(code, 1);
  assert.match(errorLine(stderr).error, /^s3_reachable: cannot list bucket was-there/);
});

test('SelfTest fails s3_reachable for a missing bucket', async () => {
  const { code, stderr } = await selfTest(hostEnv('bucket-never-created'));
  assert.equal(code, 1);
  assert.match(errorLine(stderr).error, /^s3_reachable: .*NoSuchBucket/);
});

test('SelfTest fails index_readable on an index that is not JSON', async () => {
  const env = hostEnv(await bucketWith('{"runs": [ truncated'));
  const { code, stdout, stderr } = await selfTest(env);
  assert.equal(code, 1);
  assert.deepEqual(passedSteps(stdout).map((s) => s.step), ['s3_reachable']);
  assert.match(errorLine(stderr).error, /^index_readable: replay_runs\/_index\.json is not valid JSON/);
  assert.equal(jsonLines(stdout).filter((l) => l.status === 'ok' && !l.step).length, 0, 'no final ok line');
});

test('SelfTest fails audit_spool when the spool folder cannot be written', async () => {
  const blocker = path.join(work, 'not-a-dir');
  fs.writeFileSync(blocker, 'a file where the spool folder should be');
  const env = hostEnv(await bucketWith(), { AUDIT_SPOOL_DIR: path.join(blocker, 'audit') });
  const { code, stdout, stderr } = await selfTest(env);
  assert.equal(code, 1);
  assert.deepEqual(passedSteps(stdout).map((s) => s.step), ['s3_reachable', 'index_readable']);
  assert.match(errorLine(stderr).error, /^audit_spool: cannot write in .*ENOTDIR.*AUDIT_SPOOL_DIR writable/);
});

test('SelfTest fails observer_auth when OBSERVER_TOKEN is missing', async () => {
  const env = hostEnv(await bucketWith(), { OBSERVER_TOKEN: '' });
  const { code, stdout, stderr } = await selfTest(env);
  assert.equal(code, 1);
  assert.deepEqual(passedSteps(stdout).map((s) => s.step), ['s3_reachable', 'index_readable', 'audit_spool']);
  assert.match(errorLine(stderr).error, /^observer_auth: OBSERVER_TOKEN is not set/);
});
