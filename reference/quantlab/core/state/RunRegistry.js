// Registry of live runs shared between processes on one host (CONTRACT section 9): the
// observer lists and stops runs that other processes started. One JSON file per run under
// <dir>/runs/, one stop request per run under <dir>/stops/; every write is atomic (tmp + rename).
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { envStr } from '../lib/env.js';

export const DEFAULT_STATE_DIR = '/tmp/quantlab-state';

const RUN_DEFAULTS = Object.freeze({
  strategy_id: null,
  status: 'RUNNING',
  started_at: null,
  last_event_ts: null,
  stop_reason: null,
  budget_pressure: 'LOW',
  ws_connected: false,
  error: null,
});

/**
 * True for ids that are safe as a file name (run ids are UUIDs; URLs can carry anything).
 * @param {unknown} id
 * @returns {boolean}
 */
export function isValidRunId(id) {
  return typeof id === 'string' && id.length <= 200 && /^[A-Za-z0-9_.-]+$/.test(id) && id !== '.' && id !== '..';
}

/**
 * True when a process with this pid exists (EPERM still means it exists).
 * @param {number} pid
 * @returns {boolean}
 */
function pidAlive(pid) {
  if (!Number.isInteger(pid) || pid <= 0) return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return err.code === 'EPERM';
  }
}

/**
 * Write JSON atomically: a unique tmp file renamed over the target.
 * @param {string} file
 * @param {object} value
 */
function writeJsonAtomic(file, value) {
  const tmp = `${file}.${process.pid}.${crypto.randomBytes(4).toString('hex')}.tmp`;
  fs.writeFileSync(tmp, JSON.stringify(value) + '\n', { mode: 0o640 });
  fs.renameSync(tmp, file);
}

/**
 * Read a JSON file, or null when it is missing or unreadable.
 * @param {string} file
 * @returns {any}
 */
function readJson(file) {
  try {
    return JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch {
    return null;
  }
}

export class RunRegistry {
  /** @param {{dir?:string}} [opts] */
  constructor({ dir } = {}) {
    this.dir = dir || DEFAULT_STATE_DIR;
    this.runsDir = path.join(this.dir, 'runs');
    this.stopsDir = path.join(this.dir, 'stops');
  }

  /**
   * A registry at QUANTLAB_STATE_DIR (default /tmp/quantlab-state).
   * @param {Record<string,string|undefined>} [env]
   * @returns {RunRegistry}
   */
  static fromEnv(env = process.env) {
    return new RunRegistry({ dir: envStr('QUANTLAB_STATE_DIR', '', env).trim() || DEFAULT_STATE_DIR });
  }

  /** Create the folders on first write. */
  ensureDirs() {
    fs.mkdirSync(this.runsDir, { recursive: true });
    fs.mkdirSync(this.stopsDir, { recursive: true });
  }

  /**
   * @param {string} id
   * @returns {string}
   */
  runFile(id) {
    return path.join(this.runsDir, `${id}.json`);
  }

  /**
   * @param {string} id
   * @returns {string}
   */
  stopFile(id) {
    return path.join(this.stopsDir, `${id}.json`);
  }

  /**
   * Record a new run (pid defaults to this process) and clear any old stop request for its id.
   * @param {object} run at least {live_run_id}
   * @returns {object} the stored record
   */
  register(run) {
    if (!isValidRunId(run?.live_run_id)) throw new Error(`invalid live_run_id: ${JSON.stringify(run?.live_run_id)}`);
    this.ensureDirs();
    const record = {
      ...RUN_DEFAULTS,
      started_at: new Date().toISOString(),
      pid: process.pid,
      ...run,
      updated_at: new Date().toISOString(),
    };
    fs.rmSync(this.stopFile(run.live_run_id), { force: true });
    writeJsonAtomic(this.runFile(run.live_run_id), record);
    return record;
  }

  /**
   * Merge a patch into a run's record.
   * @param {string} id
   * @param {object} patch
   * @returns {object|null} the new record, or null for an unknown id
   */
  update(id, patch) {
    if (!isValidRunId(id)) return null;
    const current = readJson(this.runFile(id));
    if (!current) return null;
    const record = { ...current, ...patch, live_run_id: id, updated_at: new Date().toISOString() };
    writeJsonAtomic(this.runFile(id), record);
    return record;
  }

  /**
   * One run's record (a RUNNING run whose process died reads as ERROR).
   * @param {string} id
   * @returns {object|null}
   */
  get(id) {
    if (!isValidRunId(id)) return null;
    const record = readJson(this.runFile(id));
    return record ? this.reconcile(record) : null;
  }

  /**
   * Every run, oldest first.
   * @returns {object[]}
   */
  list() {
    let names;
    try {
      names = fs.readdirSync(this.runsDir);
    } catch (err) {
      if (err.code === 'ENOENT') return [];
      throw err;
    }
    const runs = [];
    for (const name of names) {
      if (!name.endsWith('.json')) continue;
      const record = readJson(path.join(this.runsDir, name));
      if (record && isValidRunId(record.live_run_id)) runs.push(this.reconcile(record));
    }
    return runs.sort((a, b) => String(a.started_at).localeCompare(String(b.started_at)));
  }

  /**
   * Mark a RUNNING record whose process is gone as ERROR, persisting the change.
   * @param {object} record
   * @returns {object}
   */
  reconcile(record) {
    if (record.status !== 'RUNNING' || pidAlive(record.pid)) return record;
    const patch = { status: 'ERROR', stop_reason: 'ERROR', ws_connected: false, error: record.error || 'process exited' };
    try {
      return this.update(record.live_run_id, patch) || { ...record, ...patch };
    } catch {
      return { ...record, ...patch };
    }
  }

  /**
   * Ask a run to stop; the run sees it through watchStop().
   * @param {string} id
   * @param {string} [reason]
   * @returns {boolean} false when the id is unknown
   */
  requestStop(id, reason = 'MANUAL_STOP') {
    if (!isValidRunId(id) || !fs.existsSync(this.runFile(id))) return false;
    this.ensureDirs();
    writeJsonAtomic(this.stopFile(id), { live_run_id: id, reason, requested_at: new Date().toISOString() });
    return true;
  }

  /**
   * The pending stop reason for a run, or null.
   * @param {string} id
   * @returns {string|null}
   */
  stopRequested(id) {
    if (!isValidRunId(id)) return null;
    const request = readJson(this.stopFile(id));
    return request ? String(request.reason || 'MANUAL_STOP') : null;
  }

  /**
   * Poll for a stop request; cb(reason) is called once. The poll keeps the process alive
   * until unwatch() is called or the stop arrives.
   * @param {string} id
   * @param {(reason:string) => void} cb
   * @param {number} [intervalMs]
   * @returns {() => void} unwatch
   */
  watchStop(id, cb, intervalMs = 200) {
    let timer = null;
    const unwatch = () => {
      if (timer) clearInterval(timer);
      timer = null;
    };
    const check = () => {
      const reason = this.stopRequested(id);
      if (reason === null || timer === null) return;
      unwatch();
      cb(reason);
    };
    timer = setInterval(check, intervalMs);
    return unwatch;
  }
}
