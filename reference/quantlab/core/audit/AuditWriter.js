// Audit trail: one JSON line per entry in a local spool, copied to S3 when archiving is on
// (CONTRACT section 7).
import crypto from 'node:crypto';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { envBool, envStr } from '../lib/env.js';
import { redact } from '../lib/log.js';
import { archiveSettings, createS3Client, s3ErrorMessage, s3Sdk } from '../lib/s3.js';

export const DEFAULT_SPOOL_DIR = '/tmp/quantlab-audit';

// Wall-clock nanoseconds at hrtime zero: adding hrtime keeps ts monotonic within the process.
const NS_EPOCH_OFFSET = BigInt(Date.now()) * 1_000_000n - process.hrtime.bigint();
let lastTsNs = 0n;

/**
 * Nanoseconds since the epoch, strictly increasing within this process.
 * @returns {bigint}
 */
export function nowNs() {
  let ts = NS_EPOCH_OFFSET + process.hrtime.bigint();
  if (ts <= lastTsNs) ts = lastTsNs + 1n;
  lastTsNs = ts;
  return ts;
}

/**
 * 'YYYYMMDD' for a date, in UTC.
 * @param {Date} date
 * @returns {string}
 */
export function utcDay(date) {
  return date.toISOString().slice(0, 10).replace(/-/g, '');
}

/**
 * Write a file durably: a .tmp sibling is written and fsynced, then renamed over the target.
 * @param {string} file
 * @param {string} text
 */
async function writeDurably(file, text) {
  const tmp = `${file}.tmp`;
  const handle = await fsp.open(tmp, 'w', 0o640);
  try {
    await handle.writeFile(text, 'utf8');
    await handle.sync();
  } finally {
    await handle.close();
  }
  await fsp.rename(tmp, file);
}

export class AuditWriter {
  /**
   * @param {{spoolDir:string, enabled?:boolean, s3Client?:any, bucket?:string|null, actor?:string, awaitUpload?:boolean}} opts
   *   awaitUpload: when false (default) the S3 copy runs in the background so a slow bucket
   *   never delays the caller (each S3 call is bounded by RUN_ARCHIVE_S3_TIMEOUT_MS); flush() waits for it.
   */
  constructor({ spoolDir, enabled = true, s3Client = null, bucket = null, actor = 'system', awaitUpload = false }) {
    this.spoolDir = spoolDir || DEFAULT_SPOOL_DIR;
    this.enabled = enabled;
    this.s3Client = s3Client;
    this.bucket = bucket;
    this.actor = actor;
    this.awaitUpload = awaitUpload;
    /** @type {Set<Promise<void>>} */
    this.pending = new Set();
  }

  /**
   * Build a writer from AUDIT_ENABLED, AUDIT_SPOOL_DIR and the archive settings.
   * @param {Record<string,string|undefined>} [env]
   * @param {{actor?:string, awaitUpload?:boolean}} [opts]
   * @returns {AuditWriter}
   */
  static fromEnv(env = process.env, { actor = 'system', awaitUpload = false } = {}) {
    const settings = archiveSettings(env);
    const archiving = settings.enabled && settings.bucket !== '';
    return new AuditWriter({
      spoolDir: envStr('AUDIT_SPOOL_DIR', '', env).trim() || DEFAULT_SPOOL_DIR,
      enabled: envBool('AUDIT_ENABLED', true, env),
      s3Client: archiving ? createS3Client(settings) : null,
      bucket: archiving ? settings.bucket : null,
      actor,
      awaitUpload,
    });
  }

  /**
   * The spool folder for a day: <spoolDir>/date=YYYYMMDD (UTC).
   * @param {string} spoolDir
   * @param {Date} [date]
   * @returns {string}
   */
  static dayDir(spoolDir, date = new Date()) {
    return path.join(spoolDir, `date=${utcDay(date)}`);
  }

  /**
   * Write one audit entry to the spool (and start its S3 copy when archiving is on).
   * @param {{action:string, target_type:string, target_id:string, reason?:string|null, metadata?:object, actor?:string}} input
   * @returns {Promise<object|null>} the entry, or null when auditing is disabled
   */
  async write({ action, target_type, target_id, reason = null, metadata = {}, actor }) {
    if (!this.enabled) return null;
    const tsNs = nowNs();
    const entry = {
      audit_id: crypto.randomUUID(),
      ts: tsNs.toString(),
      actor: actor || this.actor,
      action,
      target_type,
      target_id,
      reason,
      metadata: metadata || {},
    };
    // Secrets must never land in the trail, whatever a caller put in metadata.
    const line = redact(JSON.stringify(entry)) + '\n';
    const day = new Date(Number(tsNs / 1_000_000n));
    const dir = AuditWriter.dayDir(this.spoolDir, day);
    const fileName = `part-${entry.ts}-${entry.audit_id}.jsonl`;
    await fsp.mkdir(dir, { recursive: true });
    await writeDurably(path.join(dir, fileName), line);
    if (this.s3Client && this.bucket) {
      const upload = this.upload(`audit/date=${utcDay(day)}/${fileName}`, line);
      if (this.awaitUpload) await upload;
    }
    return JSON.parse(line);
  }

  /**
   * Put one spool line in the bucket; a failure is reported on stderr and is not fatal.
   * @param {string} key
   * @param {string} body
   * @returns {Promise<void>}
   */
  upload(key, body) {
    const { PutObjectCommand } = s3Sdk();
    const task = this.s3Client
      .send(new PutObjectCommand({ Bucket: this.bucket, Key: key, Body: Buffer.from(body, 'utf8'), ContentType: 'application/x-ndjson' }))
      .then(() => undefined)
      .catch((err) => {
        process.stderr.write(redact(`[AUDIT] upload_failed error=${s3ErrorMessage(err)}`) + '\n');
      });
    this.pending.add(task);
    task.finally(() => this.pending.delete(task));
    return task;
  }

  /**
   * Wait for every S3 copy started so far (call before exiting a short-lived process).
   * @returns {Promise<void>}
   */
  async flush() {
    while (this.pending.size > 0) await Promise.allSettled([...this.pending]);
  }

  /**
   * Entries of a day's spool whose target_id or metadata.live_run_id is runId.
   * @param {string} spoolDir
   * @param {string} runId
   * @param {Date} [date]
   * @returns {Promise<object[]>}
   */
  static async findRunEntries(spoolDir, runId, date = new Date()) {
    const dir = AuditWriter.dayDir(spoolDir, date);
    let names;
    try {
      names = await fsp.readdir(dir);
    } catch (err) {
      if (err.code === 'ENOENT') return [];
      throw err;
    }
    const found = [];
    for (const name of names.filter((n) => n.endsWith('.jsonl')).sort()) {
      const text = await fsp.readFile(path.join(dir, name), 'utf8').catch(() => '');
      for (const line of text.split('\n')) {
        const entry = parseLine(line);
        if (entry && (entry.target_id === runId || entry.metadata?.live_run_id === runId)) found.push(entry);
      }
    }
    return found;
  }
}

/**
 * Parse one spool line, or null when it is blank or not JSON.
 * @param {string} line
 * @returns {object|null}
 */
function parseLine(line) {
  if (!line.trim()) return null;
  try {
    return JSON.parse(line);
  } catch {
    return null;
  }
}
