// replayd: lists the live runs archived in S3 (replay_runs/replay_run_id=<id>/...) so they can be replayed.
//
// Env: REPLAYD_PORT (9160), REPLAYD_TOKEN (bearer token for every route but /health; empty admits nobody),
//      REPLAYD_S3_TIMEOUT_MS (10000), RUN_ARCHIVE_ENABLED and RUN_ARCHIVE_S3_* (the archive to read).
// Routes: GET /health, GET /replay/runs, GET /replay/runs/<id>.
import http from 'node:http';
import { envStr } from '../../core/lib/env.js';
import { createS3Client, isNotFound, s3ErrorMessage, s3Sdk } from '../../core/lib/s3.js';
import {
  UNAUTHORIZED, bearerOk, checkedArchiveSettings, exitOnConfigError, exitOnSignal, listen, log, readCount,
  exitOnStartupError, isEntryPoint, readPort, redactAll, sendJson,
} from '../lib/service.js';

const SERVICE = 'replayd';
const RUNS_PREFIX = 'replay_runs/';
const RUN_KEY = /^replay_runs\/replay_run_id=([^/]+)\/([^/]+)$/;
const ARCHIVE_FILES = ['decisions.jsonl', 'manifest.json', 'stats.json'];
const MAX_LISTED_KEYS = 100000;

/**
 * Read and check replayd's settings.
 * @param {Record<string,string|undefined>} env
 */
export function loadConfig(env = process.env) {
  return {
    port: readPort('REPLAYD_PORT', 9160, env),
    token: envStr('REPLAYD_TOKEN', '', env),
    s3TimeoutMs: readCount('REPLAYD_S3_TIMEOUT_MS', env.REPLAYD_S3_TIMEOUT_MS, 10000, { min: 1 }),
    archive: checkedArchiveSettings('/etc/quantlab/replayd.env', env),
  };
}

/**
 * Group archive keys into runs: {replay_run_id, objects, complete, last_modified}.
 * Keys that are not a run's file (such as replay_runs/_index.json) are ignored.
 * @param {{Key:string, LastModified?:Date}[]} objects
 * @returns {object[]}
 */
export function groupRuns(objects) {
  const runs = new Map();
  for (const { Key, LastModified } of objects) {
    const match = RUN_KEY.exec(Key);
    if (!match) continue;
    const [, id, file] = match;
    const run = runs.get(id) || { replay_run_id: id, objects: [], last_modified: null };
    run.objects.push(file);
    const when = LastModified ? new Date(LastModified).toISOString() : null;
    if (when && (!run.last_modified || when > run.last_modified)) run.last_modified = when;
    runs.set(id, run);
  }
  return [...runs.values()]
    .map((run) => ({ ...run, objects: run.objects.sort(), complete: ARCHIVE_FILES.every((f) => run.objects.includes(f)) }))
    .sort((a, b) => a.replay_run_id.localeCompare(b.replay_run_id));
}

/** decodeURIComponent that gives null instead of throwing on a malformed escape. */
function safeDecode(text) {
  try {
    return decodeURIComponent(text);
  } catch {
    return null;
  }
}

/** The archive reader: every call is bounded by the configured timeout. */
class ArchiveReader {
  constructor(settings, timeoutMs) {
    this.client = createS3Client(settings);
    this.bucket = settings.bucket;
    this.timeoutMs = timeoutMs;
  }

  send(command) {
    return this.client.send(command, { abortSignal: AbortSignal.timeout(this.timeoutMs) });
  }

  /** Every object under replay_runs/, following continuation tokens. */
  async listRunObjects() {
    const objects = [];
    let token;
    do {
      const { ListObjectsV2Command } = s3Sdk();
      const page = await this.send(new ListObjectsV2Command({ Bucket: this.bucket, Prefix: RUNS_PREFIX, ContinuationToken: token }));
      objects.push(...(page.Contents || []));
      token = page.IsTruncated ? page.NextContinuationToken : undefined;
    } while (token && objects.length < MAX_LISTED_KEYS);
    return objects;
  }

  /** A run's JSON object, or null when it is absent. */
  async readJson(id, file) {
    try {
      const { GetObjectCommand } = s3Sdk();
      const out = await this.send(new GetObjectCommand({ Bucket: this.bucket, Key: `${RUNS_PREFIX}replay_run_id=${id}/${file}` }));
      return JSON.parse(await out.Body.transformToString());
    } catch (err) {
      if (isNotFound(err)) return null;
      throw err;
    }
  }

  close() {
    this.client.destroy();
  }
}

/**
 * Build the HTTP server (not listening).
 * @param {{token:string, archive:{enabled:boolean, bucket:string}, reader:ArchiveReader|null}} deps
 * @returns {http.Server}
 */
export function createReplayd({ token, archive, reader }) {
  const started = Date.now();
  return http.createServer((req, res) => {
    route(req, res).catch((err) => {
      const timedOut = err?.name === 'TimeoutError' || err?.name === 'AbortError';
      sendJson(res, timedOut ? 504 : 502, {
        error: 'ARCHIVE_UNREACHABLE',
        message: `${redactAll(s3ErrorMessage(err))}; check RUN_ARCHIVE_S3_* in /etc/quantlab/replayd.env, endpoint reachability and bucket permissions.`,
      });
    });
  });

  async function route(req, res) {
    const { pathname } = new URL(req.url, 'http://localhost');
    if (pathname === '/health') {
      if (req.method !== 'GET') return sendJson(res, 405, { error: 'METHOD_NOT_ALLOWED' });
      return sendJson(res, 200, {
        status: 'ok', service: SERVICE, archive_enabled: archive.enabled, bucket: archive.enabled ? archive.bucket : null,
        uptime_ms: Date.now() - started,
      });
    }
    if (!bearerOk(req, token)) return sendJson(res, 401, UNAUTHORIZED);
    if (req.method !== 'GET') return sendJson(res, 405, { error: 'METHOD_NOT_ALLOWED' });
    if (pathname !== '/replay/runs' && !pathname.startsWith('/replay/runs/')) return sendJson(res, 404, { error: 'NOT_FOUND' });
    if (!reader) {
      return sendJson(res, 503, {
        error: 'ARCHIVE_DISABLED',
        message: 'Run archiving is off; set RUN_ARCHIVE_ENABLED=1 and RUN_ARCHIVE_S3_* in /etc/quantlab/replayd.env.',
      });
    }
    if (pathname === '/replay/runs') {
      const runs = groupRuns(await reader.listRunObjects());
      return sendJson(res, 200, { runs, count: runs.length });
    }
    const id = safeDecode(pathname.slice('/replay/runs/'.length));
    if (!id || id.includes('/')) return sendJson(res, 404, { error: 'NOT_FOUND' });
    const manifest = await reader.readJson(id, 'manifest.json');
    if (!manifest) return sendJson(res, 404, { error: 'RUN_NOT_FOUND' });
    return sendJson(res, 200, { replay_run_id: id, manifest, stats: await reader.readJson(id, 'stats.json') });
  }
}

async function main() {
  let config;
  try {
    config = loadConfig();
  } catch (err) {
    exitOnConfigError(err);
  }
  const reader = config.archive.enabled ? new ArchiveReader(config.archive, config.s3TimeoutMs) : null;
  const server = createReplayd({ token: config.token, archive: config.archive, reader });
  exitOnSignal({ service: SERVICE, server, cleanup: () => reader?.close() });
  const port = await listen(server, config.port);
  log({ event: 'replayd_listening', port, archive_enabled: config.archive.enabled });
}

if (isEntryPoint(import.meta.url)) main().catch((err) => exitOnStartupError(SERVICE, err, 'REPLAYD_PORT'));
