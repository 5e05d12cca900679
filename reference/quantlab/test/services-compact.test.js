// The compact job (core/compressor/run.py) as a real process under a bare python3 (standard library
// only, site-packages off), folding a real spool into a real moto bucket.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { GetObjectCommand, ListObjectsV2Command } from '@aws-sdk/client-s3';
import { SignatureV4 } from '@smithy/signature-v4';
import { archiveEnv, createBucket, motoClient, motoPython, startMoto } from './helpers/moto.js';
import { TWIN_ROOT, freePort, jsonLines } from './helpers/proc.js';

const RUN_PY = path.join(TWIN_ROOT, 'core', 'compressor', 'run.py');
// The unit runs /usr/bin/python3; -S keeps site-packages out so a third-party import would fail here too.
const PYTHON = process.env.QUANTLAB_COMPACT_PYTHON || (fs.existsSync('/usr/bin/python3') ? '/usr/bin/python3' : motoPython());

/** Run a Python program to completion with a deadline and a minimal environment. */
function runPython(args, env = {}, timeoutMs = 20_000) {
  return new Promise((resolve, reject) => {
    const child = spawn(PYTHON, ['-S', '-B', ...args], {
      env: { PATH: process.env.PATH, LANG: 'C.UTF-8', ...env },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (c) => { stdout += c; });
    child.stderr.setEncoding('utf8').on('data', (c) => { stderr += c; });
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`python ${args.join(' ')} ran over ${timeoutMs} ms\n${stdout}\n${stderr}`));
    }, timeoutMs);
    child.once('error', (err) => { clearTimeout(timer); reject(err); });
    child.once('close', (code) => { clearTimeout(timer); resolve({ code, stdout, stderr }); });
  });
}

function tempDir(t) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ql-compact-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** A spool file as AuditWriter writes it: part-<ts_ns>-<audit_id>.jsonl, one line. */
function writeEntry(spool, day, ts, action) {
  const entry = { audit_id: crypto.randomUUID(), ts: String(ts), actor: 'test', action, target_type: 'run', target_id: 'r1', reason: null, metadata: {} };
  const dir = path.join(spool, `date=${day}`);
  fs.mkdirSync(dir, { recursive: true });
  fs.writeFileSync(path.join(dir, `part-${entry.ts}-${entry.audit_id}.jsonl`), `${JSON.stringify(entry)}\n`);
  return entry;
}

/** YYYYMMDD of a UTC day offset from today. */
function utcDay(offsetDays) {
  return new Date(Date.now() + offsetDays * 86_400_000).toISOString().slice(0, 10).replace(/-/g, '');
}

async function readObject(s3, bucket, key) {
  const out = await s3.send(new GetObjectCommand({ Bucket: bucket, Key: key }));
  return out.Body.transformToString();
}

test('compact folds a day of the audit spool into one object in a real bucket', async (t) => {
  const moto = await startMoto();
  t.after(() => moto.stop());
  const bucket = 'compact-archive';
  await createBucket(moto.endpoint, bucket);
  const s3 = motoClient(moto.endpoint);
  t.after(() => s3.destroy());
  const spool = tempDir(t);
  const env = { ...archiveEnv(moto.endpoint, bucket), AUDIT_SPOOL_DIR: spool, OBSERVER_TOKEN: 'observer-secret-e4a1' };

  // Written out of order on purpose: the object is ordered by ts.
  const late = writeEntry(spool, '20240131', 1706745600000000300n, 'RUN_STOP');
  const early = writeEntry(spool, '20240131', 1706745600000000100n, 'RUN_START');
  const middle = writeEntry(spool, '20240131', 1706745600000000200n, 'API_CALL');
  fs.writeFileSync(path.join(spool, 'date=20240131', 'part-9-half.jsonl.tmp'), '{"half":');
  fs.appendFileSync(path.join(spool, 'date=20240131', `part-${middle.ts}-${middle.audit_id}.jsonl`), 'not json\n');
  writeEntry(spool, '20240201', 1706832000000000000n, 'OTHER_DAY');

  const res = await runPython([RUN_PY, '--mode', 'daily', '--date', '20240131'], env);
  assert.equal(res.code, 0, res.stderr);
  const [summary] = jsonLines(res.stdout);
  assert.equal(summary.status, 'ok');
  assert.equal(summary.uploaded, true);
  assert.equal(summary.files, 3);
  assert.equal(summary.entries, 3);
  assert.equal(summary.skipped_lines, 1);
  assert.equal(summary.key, 'audit_compacted/date=20240131/audit.jsonl');

  const body = await readObject(s3, bucket, 'audit_compacted/date=20240131/audit.jsonl');
  const lines = body.trimEnd().split('\n').map((l) => JSON.parse(l));
  assert.deepEqual(lines, [early, middle, late]);
  const keys = (await s3.send(new ListObjectsV2Command({ Bucket: bucket }))).Contents.map((o) => o.Key);
  assert.deepEqual(keys, ['audit_compacted/date=20240131/audit.jsonl'], 'only the asked day is folded');
  assert.ok(fs.existsSync(path.join(spool, 'date=20240131')), 'the local spool stays for the canary');

  // Running again for the same day rewrites the same object.
  writeEntry(spool, '20240131', 1706745600000000400n, 'LATE_ARRIVAL');
  const again = await runPython([RUN_PY, '--mode', 'daily', '--date', '20240131'], env);
  assert.equal(again.code, 0, again.stderr);
  assert.equal((await readObject(s3, bucket, summary.key)).trimEnd().split('\n').length, 4);

  const output = res.stdout + res.stderr + again.stdout + again.stderr;
  for (const secret of [env.RUN_ARCHIVE_S3_ACCESS_KEY, env.RUN_ARCHIVE_S3_SECRET_KEY, env.OBSERVER_TOKEN]) {
    assert.ok(!output.includes(secret), 'a secret leaked into the output');
  }
});

test('compact picks yesterday (UTC) by default, COMPACT_DATE overrides it, and an empty day exits 0', async (t) => {
  const moto = await startMoto();
  t.after(() => moto.stop());
  const bucket = 'compact-default-day';
  await createBucket(moto.endpoint, bucket);
  const s3 = motoClient(moto.endpoint);
  t.after(() => s3.destroy());
  const spool = tempDir(t);
  const env = { ...archiveEnv(moto.endpoint, bucket), AUDIT_SPOOL_DIR: spool };
  const yesterday = utcDay(-1);
  writeEntry(spool, yesterday, 1n, 'RUN_START');

  const byDefault = await runPython([RUN_PY, '--mode', 'daily'], env);
  assert.equal(byDefault.code, 0, byDefault.stderr);
  assert.equal(jsonLines(byDefault.stdout)[0].date, yesterday);
  assert.equal((await readObject(s3, bucket, `audit_compacted/date=${yesterday}/audit.jsonl`)).split('\n').length, 2);

  const empty = await runPython([RUN_PY, '--mode', 'daily'], { ...env, COMPACT_DATE: '20200101' });
  assert.equal(empty.code, 0, empty.stderr);
  const [summary] = jsonLines(empty.stdout);
  assert.equal(summary.date, '20200101');
  assert.equal(summary.uploaded, false);
  assert.match(summary.message, /^nothing to fold/);
  const keys = (await s3.send(new ListObjectsV2Command({ Bucket: bucket }))).Contents.map((o) => o.Key);
  assert.ok(!keys.includes('audit_compacted/date=20200101/audit.jsonl'));
});

test('compact exits 2 with one [config] line on bad config, never printing secrets', async (t) => {
  const spool = tempDir(t);
  const secret = 'compact-secret-key-0b7e';
  const good = { ...archiveEnv('http://127.0.0.1:1', 'b'), RUN_ARCHIVE_S3_SECRET_KEY: secret, AUDIT_SPOOL_DIR: spool };
  const cases = [
    [['--mode', 'daily'], { ...good, RUN_ARCHIVE_S3_BUCKET: '' }, /^\[config\] RUN_ARCHIVE_S3_BUCKET is required; set it in \/etc\/quantlab\/compact.env\.\n$/],
    [['--mode', 'daily', '--date', '2024-01-31'], good, /^\[config\] --date must be a date written YYYYMMDD/],
    [['--mode', 'daily'], { ...good, COMPACT_DATE: '20241341' }, /^\[config\] COMPACT_DATE must be a date written YYYYMMDD/],
    [['--mode', 'hourly'], good, /^\[config\] argument --mode: invalid choice/],
    [[], good, /^\[config\] the following arguments are required: --mode/],
    [['--mode', 'daily'], { ...good, RUN_ARCHIVE_S3_ENDPOINT: 'minio:9000' }, /^\[config\] RUN_ARCHIVE_S3_ENDPOINT must be an http\(s\) URL/],
  ];
  for (const [args, env, pattern] of cases) {
    const res = await runPython([RUN_PY, ...args], env);
    assert.equal(res.code, 2, `${args.join(' ')}: ${res.stderr}`);
    assert.match(res.stderr, pattern);
    assert.equal(res.stderr.trim().split('\n').length, 1, 'one line');
    assert.ok(!(res.stdout + res.stderr).includes(secret));
  }
});

test('compact exits 1 with a JSON error when the bucket cannot be reached', async (t) => {
  const spool = tempDir(t);
  writeEntry(spool, '20240131', 1n, 'RUN_START');
  const env = { ...archiveEnv(`http://127.0.0.1:${await freePort()}`, 'b'), AUDIT_SPOOL_DIR: spool };
  const res = await runPython([RUN_PY, '--mode', 'daily', '--date', '20240131'], env);
  assert.equal(res.code, 1);
  const [error] = jsonLines(res.stderr);
  assert.equal(error.status, 'error');
  assert.match(error.error, /^PutObject audit_compacted\/date=20240131\/audit.jsonl failed: /);
  assert.ok(!res.stderr.includes(env.RUN_ARCHIVE_S3_SECRET_KEY));
});

/** SHA-256 / HMAC-SHA-256 in the shape the SDK signer expects. */
class NodeSha256 {
  constructor(secret) {
    this.hash = secret ? crypto.createHmac('sha256', secret) : crypto.createHash('sha256');
  }

  update(data) {
    this.hash.update(data);
  }

  async digest() {
    return new Uint8Array(this.hash.digest());
  }
}

test("compact's SigV4 signature matches the AWS SDK's signer for the same request", async () => {
  const endpoint = 'http://127.0.0.1:9000';
  const key = 'audit_compacted/date=20240131/audit.jsonl';
  const body = '{"a":1}\n';
  const probe = [
    'import datetime, json, sys',
    `sys.path.insert(0, ${JSON.stringify(path.dirname(RUN_PY))})`,
    'import run',
    `url = run.object_url(${JSON.stringify(endpoint)}, "my-bucket", ${JSON.stringify(key)})`,
    'now = datetime.datetime(2024, 1, 31, 12, 34, 56, tzinfo=datetime.timezone.utc)',
    `h = run.sigv4_headers("PUT", url, ${JSON.stringify(body)}.encode(), "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", now)`,
    'print(json.dumps({"url": url, **h}))',
  ].join('\n');
  const res = await runPython(['-c', probe]);
  assert.equal(res.code, 0, res.stderr);
  const ours = JSON.parse(res.stdout);
  assert.equal(ours.url, `${endpoint}/my-bucket/audit_compacted/date%3D20240131/audit.jsonl`);

  const signer = new SignatureV4({
    service: 's3', region: 'auto', sha256: NodeSha256, uriEscapePath: false, applyChecksum: true,
    credentials: { accessKeyId: 'AKIDEXAMPLE', secretAccessKey: 'wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY' },
  });
  const signed = await signer.sign({
    method: 'PUT', protocol: 'http:', hostname: '127.0.0.1', port: 9000,
    path: '/my-bucket/audit_compacted/date%3D20240131/audit.jsonl', query: {},
    headers: { host: '127.0.0.1:9000', 'x-amz-content-sha256': ours['x-amz-content-sha256'] }, body,
  }, { signingDate: new Date('2024-01-31T12:34:56Z') });
  assert.equal(ours.authorization, signed.headers.authorization);
});
