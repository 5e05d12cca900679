// Run archive: manifest.json, decisions.jsonl and stats.json per run, in S3 or a local folder
// (CONTRACT section 7). Every object is canonical JSON and passes through redact().
import fsp from 'node:fs/promises';
import path from 'node:path';
import { redact } from '../lib/log.js';
import { canonicalJson, isNotFound, s3Sdk } from '../lib/s3.js';

/**
 * The S3 keys (or relative paths) of one run's archive.
 * @param {string} runId
 * @returns {{prefix:string, manifest:string, decisions:string, stats:string}}
 */
export function archiveKeys(runId) {
  const prefix = `replay_runs/replay_run_id=${runId}/`;
  return {
    prefix,
    manifest: `${prefix}manifest.json`,
    decisions: `${prefix}decisions.jsonl`,
    stats: `${prefix}stats.json`,
  };
}

/**
 * The three archive bodies of a run, ready to write.
 * @param {object} run see TWIN-INTERNALS.md (replay_run_id, seed, ..., decisions, stats)
 * @returns {{manifest:string, decisions:string, stats:string}}
 */
export function archiveBodies(run) {
  const manifest = {
    replay_run_id: run.replay_run_id,
    seed: run.seed ?? null,
    manifest_id: run.manifest_id ?? null,
    parquet_path: run.parquet_path ?? null,
    started_at: run.started_at ?? null,
    finished_at: run.finished_at ?? null,
    stop_reason: run.stop_reason ?? null,
  };
  const decisions = (run.decisions || [])
    .map((d) => canonicalJson({
      replay_run_id: run.replay_run_id,
      cursor: d.cursor ?? null,
      ts_event: d.ts_event ?? null,
      decision: d.decision ?? null,
    }) + '\n')
    .join('');
  return {
    manifest: redact(canonicalJson(manifest)),
    decisions: redact(decisions),
    stats: redact(canonicalJson(run.stats || {})),
  };
}

/**
 * Reject ids that could escape the archive prefix.
 * @param {string} runId
 */
function checkRunId(runId) {
  if (typeof runId !== 'string' || !/^[A-Za-z0-9_.-]+$/.test(runId) || runId === '.' || runId === '..') {
    throw new Error(`invalid replay_run_id: ${JSON.stringify(runId)}`);
  }
}

export class RunArchiveWriter {
  /** @param {{s3Client:any, bucket:string}} opts */
  constructor({ s3Client, bucket }) {
    this.s3Client = s3Client;
    this.bucket = bucket;
  }

  /**
   * Put the three objects; the manifest goes last so its presence means a whole archive.
   * @param {object} run
   * @returns {Promise<{prefix:string, manifest:string, decisions:string, stats:string}>}
   */
  async write(run) {
    checkRunId(run.replay_run_id);
    const keys = archiveKeys(run.replay_run_id);
    const bodies = archiveBodies(run);
    await this.put(keys.decisions, bodies.decisions, 'application/x-ndjson');
    await this.put(keys.stats, bodies.stats, 'application/json');
    await this.put(keys.manifest, bodies.manifest, 'application/json');
    return keys;
  }

  /**
   * @param {string} key
   * @param {string} body
   * @param {string} contentType
   */
  async put(key, body, contentType) {
    // A Buffer gives the SDK a known length, even for an empty decisions file.
    const bytes = Buffer.from(body, 'utf8');
    const { PutObjectCommand } = s3Sdk();
    await this.s3Client.send(new PutObjectCommand({
      Bucket: this.bucket, Key: key, Body: bytes, ContentLength: bytes.length, ContentType: contentType,
    }));
  }

  /**
   * Which archive objects exist (HeadObject each); errors other than "not found" are thrown.
   * @param {string} runId
   * @returns {Promise<{manifest:boolean, decisions:boolean, stats:boolean}>}
   */
  async exists(runId) {
    checkRunId(runId);
    const keys = archiveKeys(runId);
    const out = {};
    for (const name of ['manifest', 'decisions', 'stats']) {
      out[name] = await this.head(keys[name]);
    }
    return out;
  }

  /**
   * @param {string} key
   * @returns {Promise<boolean>}
   */
  async head(key) {
    try {
      const { HeadObjectCommand } = s3Sdk();
      await this.s3Client.send(new HeadObjectCommand({ Bucket: this.bucket, Key: key }));
      return true;
    } catch (err) {
      if (isNotFound(err)) return false;
      throw err;
    }
  }
}

export class LocalArchiveWriter {
  /** @param {{dir:string}} opts */
  constructor({ dir }) {
    this.dir = dir;
  }

  /**
   * Write the three files under <dir>/replay_runs/replay_run_id=<id>/ (manifest last).
   * @param {object} run
   * @returns {Promise<{prefix:string, manifest:string, decisions:string, stats:string}>}
   */
  async write(run) {
    checkRunId(run.replay_run_id);
    const keys = archiveKeys(run.replay_run_id);
    const bodies = archiveBodies(run);
    await fsp.mkdir(path.join(this.dir, keys.prefix), { recursive: true });
    for (const name of ['decisions', 'stats', 'manifest']) {
      const file = path.join(this.dir, keys[name]);
      await fsp.writeFile(`${file}.tmp`, bodies[name], 'utf8');
      await fsp.rename(`${file}.tmp`, file);
    }
    return keys;
  }

  /**
   * @param {string} runId
   * @returns {Promise<{manifest:boolean, decisions:boolean, stats:boolean}>}
   */
  async exists(runId) {
    checkRunId(runId);
    const keys = archiveKeys(runId);
    const out = {};
    for (const name of ['manifest', 'decisions', 'stats']) {
      out[name] = await fsp.access(path.join(this.dir, keys[name])).then(() => true, () => false);
    }
    return out;
  }
}
