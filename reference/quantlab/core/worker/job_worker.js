// Job worker: runs JSON job files dropped in <QUANTLAB_STATE_DIR>/jobs, with retries and backoff.
//
// Usage: node core/worker/job_worker.js [--poll_ms 2000] [--max_retries 3] [--backoff_ms 2000]
// Env:   WORKER_HEALTH_PORT (9161), WORKER_TOKEN (bearer token for GET /jobs; empty admits nobody),
//        QUANTLAB_STATE_DIR (/tmp/quantlab-state), AUDIT_* and RUN_ARCHIVE_* (for audit jobs).
//
// A job is <jobs>/<name>.json: {"type": "noop"|"sleep"|"audit"|"fail", ...}. Writers should write
// a .tmp file and rename it, so the worker never reads half a job. The worker claims a job by
// renaming it into running/, then moves it to done/ or failed/ with its outcome. A failed attempt
// is retried up to max_retries times, waiting backoff_ms, then twice that, and so on.
// One worker per jobs folder: on start, jobs left in running/ by a crash go back to the queue.
import fsp from 'node:fs/promises';
import http from 'node:http';
import path from 'node:path';
import { AuditWriter } from '../audit/AuditWriter.js';
import { envStr } from '../lib/env.js';
import {
  ConfigError, UNAUTHORIZED, bearerOk, checkedArchiveSettings, exitOnConfigError, exitOnSignal, exitOnStartupError,
  isEntryPoint, listen, log, logErr, readCount, readPort, sendJson, sleep,
} from '../../services/lib/service.js';

const SERVICE = 'worker';
const FLAGS = { poll_ms: 2000, max_retries: 3, backoff_ms: 2000 };
const MAX_BACKOFF_MS = 300000;
const AUDIT_UPLOAD_WAIT_MS = 5000;

/** A job error that retrying cannot fix (bad JSON, unknown type). */
class PermanentJobError extends Error {}

/**
 * Parse `--name value` / `--name=value` flags.
 * @param {string[]} argv
 * @returns {{poll_ms:number, max_retries:number, backoff_ms:number}}
 */
export function parseFlags(argv) {
  const raw = {};
  for (let i = 0; i < argv.length; i += 1) {
    const match = /^--([a-z_]+)(?:=(.*))?$/.exec(argv[i]);
    if (!match || !(match[1] in FLAGS)) {
      throw new ConfigError(`unknown argument "${argv[i]}"; usage: job_worker.js [--poll_ms N] [--max_retries N] [--backoff_ms N].`);
    }
    const value = match[2] !== undefined ? match[2] : argv[(i += 1)];
    if (value === undefined || value === '') throw new ConfigError(`--${match[1]} needs a value, such as --${match[1]} ${FLAGS[match[1]]}.`);
    raw[match[1]] = value;
  }
  return {
    poll_ms: readCount('--poll_ms', raw.poll_ms, FLAGS.poll_ms, { min: 1 }),
    max_retries: readCount('--max_retries', raw.max_retries, FLAGS.max_retries),
    backoff_ms: readCount('--backoff_ms', raw.backoff_ms, FLAGS.backoff_ms),
  };
}

/**
 * Read and check the worker's settings.
 * @param {string[]} argv
 * @param {Record<string,string|undefined>} env
 */
export function loadConfig(argv, env = process.env) {
  const stateDir = envStr('QUANTLAB_STATE_DIR', '', env).trim() || '/tmp/quantlab-state';
  checkedArchiveSettings('/etc/quantlab/worker.env', env);
  return {
    ...parseFlags(argv),
    port: readPort('WORKER_HEALTH_PORT', 9161, env),
    token: envStr('WORKER_TOKEN', '', env),
    jobsDir: path.join(stateDir, 'jobs'),
  };
}

/** What each job type does. Each gets the job and an AbortSignal that fires on shutdown. */
const HANDLERS = {
  async noop() {
    return { ok: true };
  },
  async sleep(job, signal) {
    const ms = Number(job.ms ?? 1000);
    if (!Number.isFinite(ms) || ms < 0) throw new PermanentJobError('sleep job needs "ms" >= 0');
    if (!(await sleep(ms, signal))) throw signal.reason || new Error('aborted');
    return { slept_ms: ms };
  },
  async audit(job, signal) {
    if (!job.action || !job.target_id) throw new PermanentJobError('audit job needs "action" and "target_id"');
    const writer = AuditWriter.fromEnv(process.env, { actor: 'worker' });
    const entry = await writer.write({
      action: job.action, target_type: job.target_type || 'job', target_id: job.target_id,
      reason: job.reason ?? null, metadata: job.metadata || {},
    });
    // The spool copy is durable already; the S3 copy gets a bounded wait because the client has no
    // timeout of its own, and a failed copy is reported by the writer, not retried here.
    await Promise.race([writer.flush(), sleep(AUDIT_UPLOAD_WAIT_MS, signal)]);
    return { audit_id: entry ? entry.audit_id : null };
  },
  // A deliberately failing job for drills: fails its first `fail_times` attempts (every attempt when absent).
  async fail(job, _signal, attempt) {
    const failTimes = job.fail_times ?? Infinity;
    if (attempt <= failTimes) throw new Error(job.message || `fail job attempt ${attempt}`);
    return { succeeded_on_attempt: attempt };
  },
};

/** The worker: a poll loop over the jobs folder plus a health server. */
export class JobWorker {
  constructor({ jobsDir, poll_ms, max_retries, backoff_ms }) {
    this.dirs = {
      pending: jobsDir,
      running: path.join(jobsDir, 'running'),
      done: path.join(jobsDir, 'done'),
      failed: path.join(jobsDir, 'failed'),
    };
    this.pollMs = poll_ms;
    this.maxRetries = max_retries;
    this.backoffMs = backoff_ms;
    this.abort = new AbortController();
    this.current = null;
    this.counts = { done: 0, failed: 0, retries: 0 };
    this.loopDone = null;
  }

  /** Create the folders and requeue jobs a crash left in running/. */
  async prepare() {
    for (const dir of Object.values(this.dirs)) await fsp.mkdir(dir, { recursive: true });
    for (const name of await jsonFiles(this.dirs.running)) {
      await fsp.rename(path.join(this.dirs.running, name), path.join(this.dirs.pending, name));
      log({ event: 'job_requeued', job: name });
    }
  }

  start() {
    this.loopDone = this.loop();
  }

  /** Abort the job or wait in progress; an interrupted job goes back to the queue. */
  async stop() {
    this.abort.abort(new Error('worker stopping'));
    await this.loopDone;
  }

  async loop() {
    const { signal } = this.abort;
    while (!signal.aborted) {
      const [name] = await jsonFiles(this.dirs.pending);
      if (name) await this.runOne(name, signal);
      else await sleep(this.pollMs, signal);
    }
  }

  /** Claim one job, run it with retries, file the outcome. */
  async runOne(name, signal) {
    const running = path.join(this.dirs.running, name);
    try {
      await fsp.rename(path.join(this.dirs.pending, name), running);
    } catch (err) {
      if (err.code === 'ENOENT') return; // someone removed it between listing and claiming
      throw err;
    }
    this.current = name;
    try {
      await this.attempts(name, running, signal);
    } finally {
      this.current = null;
    }
  }

  async attempts(name, running, signal) {
    let job;
    try {
      job = JSON.parse(await fsp.readFile(running, 'utf8'));
      if (!job || typeof job !== 'object' || Array.isArray(job)) throw new Error('not a JSON object');
    } catch (err) {
      return this.finish(name, running, { job_file: name }, 'failed', { error: `invalid job file: ${err.message}`, attempts: 0 });
    }
    const id = String(job.id ?? name.replace(/\.json$/, ''));
    let attempt = Number(job.attempts || 0);
    for (;;) {
      attempt += 1;
      try {
        const handler = Object.hasOwn(HANDLERS, job.type) ? HANDLERS[job.type] : null;
        if (!handler) throw new PermanentJobError(`unknown job type "${job.type}" (known: ${Object.keys(HANDLERS).join(', ')})`);
        const result = await handler(job, signal, attempt);
        log({ event: 'job_done', job_id: id, type: job.type, attempts: attempt });
        return this.finish(name, running, job, 'done', { attempts: attempt, result });
      } catch (err) {
        if (signal.aborted) return this.requeue(name, running, job, attempt - 1);
        const retriesLeft = this.maxRetries - (attempt - 1);
        if (err instanceof PermanentJobError || retriesLeft <= 0) {
          logErr({ event: 'job_failed', job_id: id, type: job.type, attempts: attempt, error: err.message });
          return this.finish(name, running, job, 'failed', { attempts: attempt, error: err.message });
        }
        const backoffMs = Math.min(this.backoffMs * 2 ** (attempt - 1), MAX_BACKOFF_MS);
        this.counts.retries += 1;
        log({ event: 'job_retry', job_id: id, type: job.type, attempt, error: err.message, backoff_ms: backoffMs });
        if (!(await sleep(backoffMs, signal))) return this.requeue(name, running, job, attempt);
      }
    }
  }

  /** Write the outcome next to the job and remove it from running/. */
  async finish(name, running, job, status, outcome) {
    const record = { ...job, ...outcome, status, finished_at: new Date().toISOString() };
    await writeJson(path.join(this.dirs[status], name), record);
    await fsp.rm(running, { force: true });
    this.counts[status] += 1;
  }

  /** Put an interrupted job back in the queue, remembering the attempts already spent. */
  async requeue(name, running, job, attemptsSpent) {
    await writeJson(running, { ...job, attempts: attemptsSpent });
    await fsp.rename(running, path.join(this.dirs.pending, name));
    log({ event: 'job_requeued', job: name, attempts: attemptsSpent });
  }

  /** Numbers for /health. */
  async status() {
    return {
      pending: (await jsonFiles(this.dirs.pending)).length,
      current_job: this.current,
      done: this.counts.done,
      failed: this.counts.failed,
      retries: this.counts.retries,
    };
  }

  /** File names per folder, for GET /jobs. */
  async listing() {
    const out = {};
    for (const [key, dir] of Object.entries(this.dirs)) out[key] = await jsonFiles(dir);
    return out;
  }
}

/** Sorted *.json names in a folder (a missing folder is empty). */
async function jsonFiles(dir) {
  try {
    return (await fsp.readdir(dir)).filter((n) => n.endsWith('.json')).sort();
  } catch (err) {
    if (err.code === 'ENOENT') return [];
    throw err;
  }
}

/** Write JSON through a .tmp file and a rename, so readers never see half a file. */
async function writeJson(file, value) {
  await fsp.writeFile(`${file}.tmp`, JSON.stringify(value, null, 2) + '\n');
  await fsp.rename(`${file}.tmp`, file);
}

/**
 * The health server: GET /health (open), GET /jobs (bearer token).
 * @param {JobWorker} worker
 * @param {{token:string, poll_ms:number, max_retries:number, backoff_ms:number, jobsDir:string}} config
 */
function createHealthServer(worker, config) {
  return http.createServer((req, res) => {
    const { pathname } = new URL(req.url, 'http://localhost');
    const reply = async () => {
      if (pathname === '/health') {
        return sendJson(res, 200, {
          status: 'ok', service: SERVICE, jobs_dir: config.jobsDir, poll_ms: config.poll_ms,
          max_retries: config.max_retries, backoff_ms: config.backoff_ms, ...(await worker.status()),
        });
      }
      if (!bearerOk(req, config.token)) return sendJson(res, 401, UNAUTHORIZED);
      if (pathname === '/jobs' && req.method === 'GET') return sendJson(res, 200, await worker.listing());
      return sendJson(res, 404, { error: 'NOT_FOUND' });
    };
    reply().catch((err) => sendJson(res, 500, { error: 'INTERNAL', message: err.message }));
  });
}

async function main() {
  let config;
  try {
    config = loadConfig(process.argv.slice(2));
  } catch (err) {
    exitOnConfigError(err);
  }
  const worker = new JobWorker(config);
  await worker.prepare();
  const server = createHealthServer(worker, config);
  exitOnSignal({ service: SERVICE, server, cleanup: () => worker.stop() });
  const port = await listen(server, config.port);
  log({
    event: 'worker_listening', port, jobs_dir: config.jobsDir,
    poll_ms: config.poll_ms, max_retries: config.max_retries, backoff_ms: config.backoff_ms,
  });
  worker.start();
  worker.loopDone.catch((err) => {
    logErr({ event: 'worker_error', error: err.message });
    process.exit(1);
  });
}

if (isEntryPoint(import.meta.url)) main().catch((err) => exitOnStartupError(SERVICE, err, 'WORKER_HEALTH_PORT'));
