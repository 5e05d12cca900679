// AuditWriter and RunArchiveWriter against a real moto S3 server.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { pathToFileURL } from 'node:url';
import { GetObjectCommand, ListObjectsV2Command } from '@aws-sdk/client-s3';
import { AuditWriter, utcDay } from '../core/audit/AuditWriter.js';
import { LocalArchiveWriter, RunArchiveWriter, archiveKeys } from '../core/archive/RunArchiveWriter.js';
import { archiveSettings, createS3Client } from '../core/lib/s3.js';
import { archiveEnv, createBucket, motoClient, startMoto } from './helpers/moto.js';
import { TWIN_ROOT, runNode } from './helpers/proc.js';

const PART_NAME = /^part-(\d{19})-([0-9a-f-]{36})\.jsonl$/;
let moto;
let bucketCount = 0;

before(async () => { moto = await startMoto(); });
after(async () => { await moto?.stop(); });

/** A new bucket and an S3 client built the way QuantLab builds it. */
async function freshBucket(t) {
  bucketCount += 1;
  const bucket = `core-audit-${process.pid}-${bucketCount}`;
  await createBucket(moto.endpoint, bucket);
  const client = createS3Client(archiveSettings(archiveEnv(moto.endpoint, bucket)));
  t.after(() => client.destroy());
  return { bucket, client };
}

function tempDir(t) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'core-audit-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** Every key under a prefix, with its body. */
async function readObjects(bucket, prefix) {
  const client = motoClient(moto.endpoint);
  try {
    const listed = await client.send(new ListObjectsV2Command({ Bucket: bucket, Prefix: prefix }));
    const out = {};
    for (const { Key } of listed.Contents || []) {
      const got = await client.send(new GetObjectCommand({ Bucket: bucket, Key }));
      out[Key] = await got.Body.transformToString('utf8');
    }
    return out;
  } finally {
    client.destroy();
  }
}

test('an audit entry is one fsynced line in <spool>/date=YYYYMMDD/part-<ts_ns>-<audit_id>.jsonl', async (t) => {
  const spoolDir = tempDir(t);
  const audit = new AuditWriter({ spoolDir, actor: 'tester' });
  const before = BigInt(Date.now()) * 1_000_000n;
  const entry = await audit.write({
    action: 'RUN_START', target_type: 'run', target_id: 'run-a', metadata: { live_run_id: 'run-a' },
  });
  assert.deepEqual(Object.keys(entry), ['audit_id', 'ts', 'actor', 'action', 'target_type', 'target_id', 'reason', 'metadata']);
  assert.equal(typeof entry.ts, 'string');
  const tsNs = BigInt(entry.ts);
  assert.ok(tsNs >= before - 5_000_000n && tsNs < before + 5_000_000_000n, `ts ${entry.ts} is not now in ns`);
  assert.equal(entry.actor, 'tester');
  assert.equal(entry.reason, null);

  const day = `date=${utcDay(new Date(Number(tsNs / 1_000_000n)))}`;
  const files = fs.readdirSync(path.join(spoolDir, day));
  assert.deepEqual(files, [`part-${entry.ts}-${entry.audit_id}.jsonl`]);
  assert.match(files[0], PART_NAME);
  const text = fs.readFileSync(path.join(spoolDir, day, files[0]), 'utf8');
  assert.equal(text.split('\n').length, 2, 'one line and a newline');
  assert.deepEqual(JSON.parse(text), entry);
  assert.equal(AuditWriter.dayDir(spoolDir, new Date('2024-02-29T23:59:59Z')), path.join(spoolDir, 'date=20240229'));
});

test('audit ts is unique and increasing across many writes', async (t) => {
  const audit = new AuditWriter({ spoolDir: tempDir(t) });
  const entries = await Promise.all(Array.from({ length: 40 }, (_, i) => audit.write({
    action: 'X', target_type: 'run', target_id: `r${i}`,
  })));
  const ts = entries.map((e) => BigInt(e.ts));
  assert.equal(new Set(ts.map(String)).size, ts.length);
  const sorted = [...ts].sort((a, b) => (a < b ? -1 : 1));
  assert.deepEqual(ts, sorted);
});

test('a disabled writer writes nothing', async (t) => {
  const spoolDir = tempDir(t);
  const audit = AuditWriter.fromEnv({ AUDIT_ENABLED: 'false', AUDIT_SPOOL_DIR: spoolDir });
  assert.equal(await audit.write({ action: 'X', target_type: 'run', target_id: 'r' }), null);
  assert.deepEqual(fs.readdirSync(spoolDir), []);
  assert.equal(AuditWriter.fromEnv({}).spoolDir, '/tmp/quantlab-audit');
  assert.equal(AuditWriter.fromEnv({}).enabled, true);
});

test('findRunEntries matches target_id or metadata.live_run_id', async (t) => {
  const spoolDir = tempDir(t);
  const audit = new AuditWriter({ spoolDir });
  await audit.write({ action: 'RUN_START', target_type: 'run', target_id: 'run-x' });
  await audit.write({ action: 'BUDGET_EXCEEDED', target_type: 'budget', target_id: 'max_events', metadata: { live_run_id: 'run-x' } });
  await audit.write({ action: 'RUN_START', target_type: 'run', target_id: 'run-y' });
  fs.writeFileSync(path.join(AuditWriter.dayDir(spoolDir), 'part-junk.jsonl'), 'not json\n');
  const found = await AuditWriter.findRunEntries(spoolDir, 'run-x');
  assert.deepEqual(found.map((e) => e.action).sort(), ['BUDGET_EXCEEDED', 'RUN_START']);
  assert.deepEqual(await AuditWriter.findRunEntries(spoolDir, 'run-x', new Date('2001-01-01')), []);
});

test('with archiving on each entry is copied to audit/date=YYYYMMDD/<same name>', async (t) => {
  const { bucket } = await freshBucket(t);
  const spoolDir = tempDir(t);
  const audit = AuditWriter.fromEnv({ ...archiveEnv(moto.endpoint, bucket), AUDIT_SPOOL_DIR: spoolDir });
  const entry = await audit.write({ action: 'RUN_STOP', target_type: 'run', target_id: 'run-s3', reason: 'STREAM_END' });
  await audit.flush();
  const day = utcDay(new Date(Number(BigInt(entry.ts) / 1_000_000n)));
  const name = `part-${entry.ts}-${entry.audit_id}.jsonl`;
  const objects = await readObjects(bucket, 'audit/');
  assert.deepEqual(Object.keys(objects), [`audit/date=${day}/${name}`]);
  assert.equal(objects[`audit/date=${day}/${name}`], fs.readFileSync(path.join(spoolDir, `date=${day}`, name), 'utf8'));
});

test('a failed upload prints [AUDIT] upload_failed, keeps the spool line and leaks no secret', async (t) => {
  const spoolDir = tempDir(t);
  const script = path.join(spoolDir, 'write.mjs');
  const writerUrl = pathToFileURL(path.join(TWIN_ROOT, 'core/audit/AuditWriter.js')).href;
  fs.writeFileSync(script, `import { AuditWriter } from ${JSON.stringify(writerUrl)};
const audit = AuditWriter.fromEnv();
const entry = await audit.write({ action: 'API_CALL', target_type: 'run', target_id: 'r', metadata: { note: process.env.OBSERVER_TOKEN } });
await audit.flush();
process.stdout.write(JSON.stringify(entry));`);
  const env = {
    ...archiveEnv(moto.endpoint, 'no-such-bucket-here'),
    AUDIT_SPOOL_DIR: spoolDir,
    OBSERVER_TOKEN: 'observer-secret-value',
  };
  const { code, stdout, stderr } = await runNode(script, [], { env });
  assert.equal(code, 0, stderr);
  assert.match(stderr, /^\[AUDIT\] upload_failed error=.*NoSuchBucket/m);
  const entry = JSON.parse(stdout);
  assert.equal(entry.metadata.note, '***', 'a secret in metadata is redacted in the trail');
  for (const secret of [env.OBSERVER_TOKEN, env.RUN_ARCHIVE_S3_SECRET_KEY, env.RUN_ARCHIVE_S3_ACCESS_KEY]) {
    assert.ok(!stderr.includes(secret) && !stdout.includes(secret));
  }
  const files = fs.readdirSync(AuditWriter.dayDir(spoolDir));
  assert.equal(files.filter((f) => PART_NAME.test(f)).length, 1);
  assert.ok(!files.some((f) => f.endsWith('.tmp')));
});

const RUN = {
  replay_run_id: 'c0ffee00-0000-4000-8000-000000000001',
  seed: 7,
  manifest_id: 'live',
  parquet_path: 'live',
  started_at: '2024-01-01T00:00:00.000Z',
  finished_at: '2024-01-01T00:00:05.000Z',
  stop_reason: 'BUDGET_EXCEEDED',
  decisions: [
    { cursor: 1, ts_event: 1704067200000, decision: { symbol: 'BTCUSDT', side: 'BUY', qty: 1 } },
    { cursor: 2, ts_event: 1704067201000, decision: { symbol: 'ETHUSDT', side: 'SELL', qty: 2 } },
  ],
  stats: { emitted_event_count: 6, duration_ms: 5000, decision_count: 2, extra: { z: 1, a: 2 } },
};

/** The archive bodies every writer must produce for RUN. */
function expectedBodies() {
  return {
    manifest: '{"finished_at":"2024-01-01T00:00:05.000Z","manifest_id":"live","parquet_path":"live","replay_run_id":"c0ffee00-0000-4000-8000-000000000001","seed":7,"started_at":"2024-01-01T00:00:00.000Z","stop_reason":"BUDGET_EXCEEDED"}',
    decisions:
      '{"cursor":1,"decision":{"qty":1,"side":"BUY","symbol":"BTCUSDT"},"replay_run_id":"c0ffee00-0000-4000-8000-000000000001","ts_event":1704067200000}\n'
      + '{"cursor":2,"decision":{"qty":2,"side":"SELL","symbol":"ETHUSDT"},"replay_run_id":"c0ffee00-0000-4000-8000-000000000001","ts_event":1704067201000}\n',
    stats: '{"decision_count":2,"duration_ms":5000,"emitted_event_count":6,"extra":{"a":2,"z":1}}',
  };
}

test('archiveKeys follows replay_runs/replay_run_id=<id>/', () => {
  assert.deepEqual(archiveKeys('abc'), {
    prefix: 'replay_runs/replay_run_id=abc/',
    manifest: 'replay_runs/replay_run_id=abc/manifest.json',
    decisions: 'replay_runs/replay_run_id=abc/decisions.jsonl',
    stats: 'replay_runs/replay_run_id=abc/stats.json',
  });
});

test('RunArchiveWriter puts three canonical objects and HeadObject finds them', async (t) => {
  const { bucket, client } = await freshBucket(t);
  const writer = new RunArchiveWriter({ s3Client: client, bucket });
  assert.deepEqual(await writer.exists(RUN.replay_run_id), { manifest: false, decisions: false, stats: false });
  const keys = await writer.write(RUN);
  assert.deepEqual(keys, archiveKeys(RUN.replay_run_id));
  const objects = await readObjects(bucket, keys.prefix);
  const expected = expectedBodies();
  assert.deepEqual(objects, { [keys.manifest]: expected.manifest, [keys.decisions]: expected.decisions, [keys.stats]: expected.stats });
  assert.deepEqual(await writer.exists(RUN.replay_run_id), { manifest: true, decisions: true, stats: true });
});

test('a run without decisions still gets an (empty) decisions.jsonl', async (t) => {
  const { bucket, client } = await freshBucket(t);
  const writer = new RunArchiveWriter({ s3Client: client, bucket });
  await writer.write({ ...RUN, replay_run_id: 'empty-run', decisions: [] });
  const objects = await readObjects(bucket, archiveKeys('empty-run').prefix);
  assert.equal(objects[archiveKeys('empty-run').decisions], '');
});

test('a write to a missing bucket rejects (the run then ends as ERROR)', async (t) => {
  const { client } = await freshBucket(t);
  const writer = new RunArchiveWriter({ s3Client: client, bucket: 'bucket-that-is-missing' });
  await assert.rejects(writer.write(RUN), /bucket/i);
});

test('LocalArchiveWriter writes the same files under <dir>/replay_runs/', async (t) => {
  const dir = tempDir(t);
  const writer = new LocalArchiveWriter({ dir });
  const keys = await writer.write(RUN);
  const expected = expectedBodies();
  for (const name of ['manifest', 'decisions', 'stats']) {
    assert.equal(fs.readFileSync(path.join(dir, keys[name]), 'utf8'), expected[name], name);
  }
  assert.deepEqual(await writer.exists(RUN.replay_run_id), { manifest: true, decisions: true, stats: true });
  assert.deepEqual(await writer.exists('other'), { manifest: false, decisions: false, stats: false });
  await assert.rejects(writer.write({ ...RUN, replay_run_id: '../escape' }), /invalid replay_run_id/);
});
