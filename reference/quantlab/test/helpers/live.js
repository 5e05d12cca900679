// Shared pieces of the live tests: canary flags, per-test folders and env, the observer as the
// operator uses it, and readers for the audit spool and the archive.
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { GetObjectCommand, HeadObjectCommand, ListObjectsV2Command } from '@aws-sdk/client-s3';
import { AuditWriter } from '../../core/audit/AuditWriter.js';
import { createObserver } from '../../core/observer/server.js';
import { RunRegistry } from '../../core/state/RunRegistry.js';
import { redirectEnv } from './exchange.js';
import { motoClient } from './moto.js';
import { TWIN_ROOT } from './proc.js';

export const PRELOAD = path.resolve(TWIN_ROOT, '..', '..', 'harness', 'fakes', 'node', 'preload.mjs');
export const CANARY = 'tools/run-canary-live.js';
export const RUN_LIVE = 'tools/run-live.js';
const TOKEN = 'live-test-observer-token';

/**
 * The required canary / run-live flags plus extra ones.
 * @param {string[]} [extra]
 * @param {string} [strategy]
 * @returns {string[]}
 */
export function liveArgs(extra = [], strategy = 'strategies/canary-strategy.js') {
  return ['--exchange', 'binance', '--symbols', 'BTCUSDT,ETHUSDT', '--strategy', strategy,
    '--dataset-parquet', 'live', '--dataset-meta', 'live', ...extra];
}

/**
 * A temp folder for one test (spool, state, archive), removed afterwards.
 * @param {import('node:test').TestContext} t
 * @returns {{dir:string, spool:string, state:string, archive:string, env:(extra?:object) => object}}
 */
export function workspace(t) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ql-live-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const spool = path.join(dir, 'audit');
  const state = path.join(dir, 'state');
  return {
    dir, spool, state, archive: path.join(dir, 'archive'),
    env: (extra = {}) => ({ AUDIT_SPOOL_DIR: spool, QUANTLAB_STATE_DIR: state, ...extra }),
  };
}

/**
 * Env that turns live ingest on and points the hard-coded Binance URL at a local exchange.
 * @param {string} exchangeUrl
 * @returns {Record<string,string>}
 */
export function liveEnv(exchangeUrl) {
  if (!fs.existsSync(PRELOAD)) throw new Error(`harness preload missing at ${PRELOAD}; the live tests need it`);
  return { CORE_LIVE_WS_ENABLED: '1', ...redirectEnv(exchangeUrl, PRELOAD) };
}

/**
 * One line of output that parses as JSON and matches.
 * @param {string} text
 * @param {(o:object) => boolean} match
 * @returns {object|undefined}
 */
export function findLine(text, match) {
  for (const line of text.split('\n')) {
    if (!line.startsWith('{')) continue;
    try {
      const obj = JSON.parse(line);
      if (match(obj)) return obj;
    } catch {
      // not a JSON line
    }
  }
  return undefined;
}

/**
 * Audit entries about a run (spool of today and yesterday, in case the run crossed midnight UTC).
 * @param {string} spool
 * @param {string} runId
 * @returns {Promise<object[]>}
 */
export async function auditEntries(spool, runId) {
  const today = new Date();
  const yesterday = new Date(today.getTime() - 86_400_000);
  const entries = [...await AuditWriter.findRunEntries(spool, runId, yesterday), ...await AuditWriter.findRunEntries(spool, runId, today)];
  return entries.sort((a, b) => (BigInt(a.ts) < BigInt(b.ts) ? -1 : 1));
}

/**
 * A run's local archive file, parsed.
 * @param {string} archiveDir
 * @param {string} runId
 * @param {string} name manifest.json | stats.json | decisions.jsonl
 * @returns {any}
 */
export function localArchive(archiveDir, runId, name) {
  const text = fs.readFileSync(path.join(archiveDir, 'replay_runs', `replay_run_id=${runId}`, name), 'utf8');
  return name.endsWith('.jsonl') ? text.split('\n').filter(Boolean).map((l) => JSON.parse(l)) : JSON.parse(text);
}

/**
 * An S3 object's text (moto).
 * @param {string} endpoint
 * @param {string} bucket
 * @param {string} key
 * @returns {Promise<string>}
 */
export async function s3Text(endpoint, bucket, key) {
  const client = motoClient(endpoint);
  try {
    const out = await client.send(new GetObjectCommand({ Bucket: bucket, Key: key }), { abortSignal: AbortSignal.timeout(5000) });
    return await out.Body.transformToString();
  } finally {
    client.destroy();
  }
}

/**
 * Keys under a prefix (moto).
 * @param {string} endpoint
 * @param {string} bucket
 * @param {string} prefix
 * @returns {Promise<string[]>}
 */
export async function s3Keys(endpoint, bucket, prefix) {
  const client = motoClient(endpoint);
  try {
    const out = await client.send(new ListObjectsV2Command({ Bucket: bucket, Prefix: prefix }), { abortSignal: AbortSignal.timeout(5000) });
    return (out.Contents || []).map((o) => o.Key);
  } finally {
    client.destroy();
  }
}

/**
 * True when HeadObject finds the key (moto).
 * @param {string} endpoint
 * @param {string} bucket
 * @param {string} key
 * @returns {Promise<boolean>}
 */
export async function s3Exists(endpoint, bucket, key) {
  const client = motoClient(endpoint);
  try {
    await client.send(new HeadObjectCommand({ Bucket: bucket, Key: key }), { abortSignal: AbortSignal.timeout(5000) });
    return true;
  } catch {
    return false;
  } finally {
    client.destroy();
  }
}

/**
 * The observer (core/observer/server.js) on an OS port over a test's state and spool, as an operator
 * reaches it: bearer token, HTTP with a timeout.
 * @param {import('node:test').TestContext} t
 * @param {{state:string, spool:string}} ws
 * @returns {Promise<{request:(method:string, path:string) => Promise<{status:number, body:any}>}>}
 */
export async function startObserver(t, ws) {
  const server = createObserver({
    token: TOKEN,
    registry: new RunRegistry({ dir: ws.state }),
    audit: new AuditWriter({ spoolDir: ws.spool }),
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(() => new Promise((resolve) => { server.closeAllConnections(); server.close(resolve); }));
  const { port } = server.address();
  const request = (method, urlPath) => new Promise((resolve, reject) => {
    const req = http.request({ host: '127.0.0.1', port, method, path: urlPath, timeout: 5000, headers: { authorization: `Bearer ${TOKEN}` } }, (res) => {
      let body = '';
      res.setEncoding('utf8').on('data', (c) => { body += c; }).on('end', () => resolve({ status: res.statusCode, body: JSON.parse(body) }));
    });
    req.on('timeout', () => req.destroy(new Error(`observer ${method} ${urlPath} timed out`)));
    req.on('error', reject);
    req.end();
  });
  return { request };
}

/**
 * Poll until probe() returns a truthy value.
 * @template T
 * @param {() => T|Promise<T>} probe
 * @param {number} timeoutMs
 * @param {string} what
 * @returns {Promise<T>}
 */
export async function waitFor(probe, timeoutMs, what) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await probe();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}
