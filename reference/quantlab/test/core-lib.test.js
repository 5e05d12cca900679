// Shared library: env parsing, dotenv loading, redaction and canonical JSON.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { PassThrough } from 'node:stream';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { SECRET_ENV_NAMES, envBool, envInt, envStr, loadDotEnv } from '../core/lib/env.js';
import { logEvent, redact } from '../core/lib/log.js';
import net from 'node:net';
import { ListObjectsV2Command } from '@aws-sdk/client-s3';
import { archiveSettings, canonicalJson, createS3Client, s3TimeoutMs } from '../core/lib/s3.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

test('envBool: 1, true and yes (any case, trimmed) are on; anything else is off', () => {
  for (const value of ['1', 'true', 'TRUE', ' yes ', 'Yes']) assert.equal(envBool('X', false, { X: value }), true, value);
  for (const value of ['0', 'false', 'no', 'on', 'enabled', '2']) assert.equal(envBool('X', true, { X: value }), false, value);
  assert.equal(envBool('X', true, {}), true);
  assert.equal(envBool('X', true, { X: '' }), true);
  assert.equal(envBool('X', false, { X: '  ' }), false);
});

test('envInt and envStr fall back to the default', () => {
  assert.equal(envInt('N', 7, { N: '42' }), 42);
  assert.equal(envInt('N', 7, { N: ' -3 ' }), -3);
  for (const bad of ['', 'abc', '1.5', '12x']) assert.equal(envInt('N', 7, { N: bad }), 7, bad);
  assert.equal(envInt('N', 7, {}), 7);
  assert.equal(envStr('S', 'd', {}), 'd');
  assert.equal(envStr('S', 'd', { S: 'v' }), 'v');
});

test('loadDotEnv reads KEY=VALUE lines and never overrides a set variable', (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'core-lib-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const file = path.join(dir, '.env');
  fs.writeFileSync(file, [
    '# a comment',
    'PLAIN=one',
    'QUOTED="two words"',
    "SINGLE='three'",
    'export EXPORTED=four',
    'ALREADY=from-file',
    'TRAILING=five # comment',
    'not a pair',
    '',
  ].join('\n'));
  const env = { ALREADY: 'from-process' };
  const loaded = loadDotEnv(file, env);
  assert.deepEqual(env, {
    ALREADY: 'from-process', PLAIN: 'one', QUOTED: 'two words', SINGLE: 'three', EXPORTED: 'four', TRAILING: 'five',
  });
  assert.ok(!loaded.includes('ALREADY'));
  assert.deepEqual(loadDotEnv(path.join(dir, 'missing.env'), env), []);
});

test('redact masks every secret value, and logEvent writes one redacted JSON line', async () => {
  assert.deepEqual(SECRET_ENV_NAMES, ['OBSERVER_TOKEN', 'RUN_ARCHIVE_S3_ACCESS_KEY', 'RUN_ARCHIVE_S3_SECRET_KEY']);
  const env = { OBSERVER_TOKEN: 'tok-123', RUN_ARCHIVE_S3_ACCESS_KEY: 'AKIA999', RUN_ARCHIVE_S3_SECRET_KEY: '' };
  assert.equal(redact('a tok-123 b AKIA999 c tok-123', env), 'a *** b *** c ***');
  assert.equal(redact('nothing secret', env), 'nothing secret');

  const previous = process.env.OBSERVER_TOKEN;
  process.env.OBSERVER_TOKEN = 'live-token-value';
  try {
    const stream = new PassThrough();
    let out = '';
    stream.on('data', (chunk) => { out += chunk; });
    logEvent({ event: 'x', error: 'bad token live-token-value', n: 10n }, stream);
    assert.equal(out, '{"event":"x","error":"bad token ***","n":"10"}\n');
  } finally {
    if (previous === undefined) delete process.env.OBSERVER_TOKEN; else process.env.OBSERVER_TOKEN = previous;
  }
});

test('canonicalJson sorts keys at every depth and keeps array order', () => {
  const text = canonicalJson({ b: 1, a: { d: [3, { z: 1, y: 2 }], c: null }, skipped: undefined });
  assert.equal(text, '{"a":{"c":null,"d":[3,{"y":2,"z":1}]},"b":1}');
  assert.equal(canonicalJson([{ b: 1, a: 2 }]), '[{"a":2,"b":1}]');
});

test('archiveSettings reads the RUN_ARCHIVE_* variables', () => {
  assert.deepEqual(archiveSettings({}), { enabled: false, bucket: '', endpoint: '', accessKeyId: '', secretAccessKey: '' });
  const s = archiveSettings({
    RUN_ARCHIVE_ENABLED: 'yes', RUN_ARCHIVE_S3_BUCKET: 'b', RUN_ARCHIVE_S3_ENDPOINT: 'http://h',
    RUN_ARCHIVE_S3_ACCESS_KEY: 'a', RUN_ARCHIVE_S3_SECRET_KEY: 's',
  });
  assert.deepEqual(s, { enabled: true, bucket: 'b', endpoint: 'http://h', accessKeyId: 'a', secretAccessKey: 's' });
});

test('s3TimeoutMs: a positive integer of ms, else 3000', () => {
  assert.equal(s3TimeoutMs({}), 3000);
  assert.equal(s3TimeoutMs({ RUN_ARCHIVE_S3_TIMEOUT_MS: '750' }), 750);
  assert.equal(s3TimeoutMs({ RUN_ARCHIVE_S3_TIMEOUT_MS: '0' }), 3000);
  assert.equal(s3TimeoutMs({ RUN_ARCHIVE_S3_TIMEOUT_MS: 'soon' }), 3000);
});

test('createS3Client: a call to an S3 that accepts and never answers fails within the bound', async () => {
  const sockets = [];
  const server = net.createServer((socket) => sockets.push(socket)); // a black hole: reads nothing, answers nothing
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  try {
    const client = createS3Client({ endpoint: `http://127.0.0.1:${server.address().port}`, accessKeyId: 'a', secretAccessKey: 'b' }, 400);
    const started = Date.now();
    await assert.rejects(client.send(new ListObjectsV2Command({ Bucket: 'b', MaxKeys: 1 })),
      (err) => err.name === 'S3Timeout' && /did not answer within 400 ms/.test(err.message));
    assert.ok(Date.now() - started < 3000, `took ${Date.now() - started} ms`);
  } finally {
    for (const socket of sockets) socket.destroy();
    server.close();
  }
});

test('the S3 SDK is loaded on the first S3 call, not by importing the modules that may call it', () => {
  // A fresh process: this file's own import of the SDK would hide a module that loads it on import.
  const script = `
    import { createRequire } from 'node:module';
    import { AuditWriter } from './core/audit/AuditWriter.js';
    import { RunArchiveWriter } from './core/archive/RunArchiveWriter.js';
    import { createObserver } from './core/observer/server.js';
    import { s3Sdk } from './core/lib/s3.js';
    const loaded = () => Object.keys(createRequire(import.meta.url).cache).some((file) => file.includes('client-s3'));
    const before = loaded();
    const sdk = s3Sdk();
    console.log(JSON.stringify({ before, after: loaded(), same: sdk === s3Sdk(), client: typeof sdk.S3Client }));`;
  const out = execFileSync(process.execPath, ['--input-type=module', '-e', script], { cwd: ROOT, encoding: 'utf8', timeout: 30000 });
  assert.deepEqual(JSON.parse(out), { before: false, after: true, same: true, client: 'function' });
});
