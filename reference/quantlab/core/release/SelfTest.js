// `node core/release/SelfTest.js`: checks that the archive bucket, the run index, the audit
// spool and observer auth work, in that order (CONTRACT section 4). Like QuantLab it sets no
// timeout of its own on the S3 calls and keeps the SDK's default retries.
import crypto from 'node:crypto';
import fsp from 'node:fs/promises';
import http from 'node:http';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { AuditWriter, DEFAULT_SPOOL_DIR } from '../audit/AuditWriter.js';
import { envStr } from '../lib/env.js';
import { logError, logEvent, redact } from '../lib/log.js';
import { archiveSettings, createS3Client, isNotFound, s3ErrorMessage, s3Sdk } from '../lib/s3.js';
import { createObserver } from '../observer/server.js';
import { RunRegistry } from '../state/RunRegistry.js';

export const INDEX_KEY = 'replay_runs/_index.json';
const LOCAL_REQUEST_TIMEOUT_MS = 5_000;

/** A step failure whose message is ready for the operator. */
class StepError extends Error {}

/**
 * The archive client and bucket, or null when archiving is off.
 * @param {Record<string,string|undefined>} env
 * @returns {{client:any, bucket:string}|null}
 */
function archiveTarget(env) {
  const settings = archiveSettings(env);
  if (!settings.enabled) return null;
  for (const [name, value] of [['RUN_ARCHIVE_S3_BUCKET', settings.bucket], ['RUN_ARCHIVE_S3_ENDPOINT', settings.endpoint]]) {
    if (!value) throw new StepError(`${name} is required when RUN_ARCHIVE_ENABLED is on; run ConfigCheck and fix the env file`);
  }
  return { client: createS3Client(settings), bucket: settings.bucket };
}

/** Step 1: ListObjectsV2 on the bucket, prefix replay_runs/, one key. */
async function s3Reachable(target) {
  if (!target) return { status: 'skipped', reason: 'RUN_ARCHIVE_ENABLED=0' };
  try {
    const { ListObjectsV2Command } = s3Sdk();
    const out = await target.client.send(new ListObjectsV2Command({ Bucket: target.bucket, Prefix: 'replay_runs/', MaxKeys: 1 }));
    return { bucket: target.bucket, key_count: out.KeyCount ?? (out.Contents || []).length };
  } catch (err) {
    throw new StepError(`s3_reachable: cannot list bucket ${target.bucket} (${s3ErrorMessage(err)}); check RUN_ARCHIVE_S3_ENDPOINT, the bucket and its credentials`);
  }
}

/** Step 2: GET replay_runs/_index.json; absent is fine, anything unreadable fails. */
async function indexReadable(target) {
  if (!target) return { status: 'skipped', reason: 'RUN_ARCHIVE_ENABLED=0' };
  let text;
  try {
    const { GetObjectCommand } = s3Sdk();
    const out = await target.client.send(new GetObjectCommand({ Bucket: target.bucket, Key: INDEX_KEY }));
    text = await out.Body.transformToString('utf8');
  } catch (err) {
    if (isNotFound(err)) return { key: INDEX_KEY, present: false };
    throw new StepError(`index_readable: cannot read ${INDEX_KEY} (${s3ErrorMessage(err)}); check the bucket and its credentials`);
  }
  try {
    JSON.parse(text);
  } catch (err) {
    throw new StepError(`index_readable: ${INDEX_KEY} is not valid JSON (${err.message}); restore or rebuild the run index`);
  }
  return { key: INDEX_KEY, present: true };
}

/** Step 3: create, write, fsync and delete a temporary file in today's spool folder. */
async function auditSpool(env) {
  const spoolDir = envStr('AUDIT_SPOOL_DIR', '', env).trim() || DEFAULT_SPOOL_DIR;
  const dir = AuditWriter.dayDir(spoolDir);
  const file = path.join(dir, `.self-test-${process.pid}-${crypto.randomBytes(4).toString('hex')}.tmp`);
  try {
    await fsp.mkdir(dir, { recursive: true });
    const handle = await fsp.open(file, 'wx', 0o600);
    try {
      await handle.writeFile('{"event":"self_test"}\n');
      await handle.sync();
    } finally {
      await handle.close();
    }
    await fsp.unlink(file);
  } catch (err) {
    await fsp.rm(file, { force: true }).catch(() => {});
    throw new StepError(`audit_spool: cannot write in ${dir} (${err.code || err.message}); make AUDIT_SPOOL_DIR writable for the service user`);
  }
  return { dir };
}

/**
 * GET a local URL with a deadline; resolves the status code.
 * @param {string} url
 * @param {Record<string,string>} headers
 * @returns {Promise<number>}
 */
function localStatus(url, headers) {
  return new Promise((resolve, reject) => {
    const req = http.get(url, { headers, timeout: LOCAL_REQUEST_TIMEOUT_MS, agent: false }, (res) => {
      res.resume();
      resolve(res.statusCode);
    });
    req.on('timeout', () => req.destroy(new Error(`no answer within ${LOCAL_REQUEST_TIMEOUT_MS} ms`)));
    req.on('error', reject);
  });
}

/** Step 4: an observer on an ephemeral port answers 401 without the token and 200 with it. */
async function observerAuth(env) {
  const token = envStr('OBSERVER_TOKEN', '', env);
  if (token.trim() === '') throw new StepError('observer_auth: OBSERVER_TOKEN is not set; set it in the env file (every observer request would get 401)');
  const server = createObserver({ token, registry: RunRegistry.fromEnv(env), audit: null });
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', resolve);
  });
  try {
    const url = `http://127.0.0.1:${server.address().port}/observer/health`;
    const without = await localStatus(url, {});
    const withToken = await localStatus(url, { authorization: `Bearer ${token}` });
    if (without !== 401 || withToken !== 200) {
      throw new StepError(`observer_auth: expected 401 without the token and 200 with it, got ${without} and ${withToken}`);
    }
    return { unauthorized: without, authorized: withToken };
  } catch (err) {
    if (err instanceof StepError) throw err;
    throw new StepError(`observer_auth: the test observer did not answer (${err.message})`);
  } finally {
    server.closeAllConnections();
    await new Promise((resolve) => server.close(resolve));
  }
}

/**
 * Run every step in order; print a line per passed step, then the result line.
 * @param {Record<string,string|undefined>} [env]
 * @returns {Promise<number>} exit code
 */
export async function runSelfTest(env = process.env) {
  const started = Date.now();
  let target = null;
  try {
    target = archiveTarget(env);
    const steps = [
      ['s3_reachable', () => s3Reachable(target)],
      ['index_readable', () => indexReadable(target)],
      ['audit_spool', () => auditSpool(env)],
      ['observer_auth', () => observerAuth(env)],
    ];
    for (const [step, run] of steps) {
      const detail = await run();
      logEvent({ event: 'self_test', step, status: 'ok', ...detail });
    }
    logEvent({ event: 'self_test', status: 'ok', duration_ms: Date.now() - started });
    return 0;
  } catch (err) {
    const message = err instanceof StepError ? err.message : `unexpected error: ${err.message}`;
    logError({ event: 'self_test', status: 'error', error: redact(message, env), duration_ms: Date.now() - started });
    return 1;
  } finally {
    target?.client.destroy();
  }
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  process.exitCode = await runSelfTest();
}
