#!/usr/bin/env node
// Go-live canary (CONTRACT section 5): one live run for the duration, then checks that its
// archive and audit entries exist. PASS on stdout, FAIL on stderr; exit 0 / 1.
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { AuditWriter, DEFAULT_SPOOL_DIR } from '../core/audit/AuditWriter.js';
import { archiveKeys } from '../core/archive/RunArchiveWriter.js';
import { envBool, envStr, loadDotEnv } from '../core/lib/env.js';
import { logError, logEvent } from '../core/lib/log.js';
import { archiveSettings, s3ErrorMessage } from '../core/lib/s3.js';
import { buildRun, flushAudit, parseFlagsOrUsage, runOptions, stopOnSignals } from '../core/live/liveCli.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const SCRIPT = 'tools/run-canary-live.js';
const DEFAULT_CANARY_SECONDS = 30;

/** A canary verdict that is not PASS. */
class CanaryFail extends Error {}

/**
 * The archive check: the three objects of the run exist (local folder for --mock, else S3).
 * @param {object} options
 * @param {any} archive the writer the run used
 * @param {string} runId
 * @param {Record<string,string|undefined>} env
 * @returns {Promise<string>} archive_dir for the PASS line
 */
async function checkArchive(options, archive, runId, env) {
  if (!options.mock && !archiveSettings(env).enabled) throw new CanaryFail('RUN_ARCHIVE_ENABLED=0 (archive check skipped)');
  const keys = archiveKeys(runId);
  let present;
  try {
    present = await archive.exists(runId);
  } catch (err) {
    throw new CanaryFail(`Archive check failed: ${s3ErrorMessage(err)}`);
  }
  const missing = Object.entries(present).filter(([, ok]) => !ok).map(([name]) => keys[name].slice(keys.prefix.length));
  if (missing.length > 0) throw new CanaryFail(`Archive objects missing for live run: ${missing.join(', ')}`);
  if (options.mock) return path.join(path.resolve(options.archiveDir), keys.prefix);
  return `s3://${archiveSettings(env).bucket}/${keys.prefix}`;
}

/**
 * The audit check: the spool folder of the start date holds an entry about the run.
 * @param {string} runId
 * @param {Date} startedAt
 * @param {Record<string,string|undefined>} env
 * @returns {Promise<string>} audit_dir for the PASS line
 */
async function checkAudit(runId, startedAt, env) {
  const spoolDir = envStr('AUDIT_SPOOL_DIR', '', env).trim() || DEFAULT_SPOOL_DIR;
  const entries = await AuditWriter.findRunEntries(spoolDir, runId, startedAt).catch(() => []);
  if (entries.length === 0) throw new CanaryFail('Audit entries not found for live run');
  return AuditWriter.dayDir(spoolDir, startedAt);
}

/**
 * @param {Record<string,string|undefined>} env
 * @returns {Promise<number>} exit code
 */
async function main(env) {
  const flags = parseFlagsOrUsage(SCRIPT, process.argv.slice(2));
  if (flags === null) return 1;
  loadDotEnv(path.join(ROOT, 'core', '.env'), env);
  if (!flags.mock && !envBool('CORE_LIVE_WS_ENABLED', false, env)) throw new CanaryFail('CORE_LIVE_WS_ENABLED=0 (live WS disabled)');
  const options = runOptions(flags, { env, defaultDurationSeconds: DEFAULT_CANARY_SECONDS });
  const { run, audit, archive } = await buildRun(options, env);
  stopOnSignals(run);
  const result = await run.run();
  try {
    const archiveDir = await checkArchive(options, archive, result.live_run_id, env);
    const auditDir = await checkAudit(result.live_run_id, new Date(result.started_at), env);
    logEvent({
      event: 'canary_live', status: 'PASS', live_run_id: result.live_run_id, stop_reason: result.stop_reason,
      emitted_event_count: result.emitted_event_count, decision_count: result.decision_count,
      archive_dir: archiveDir, audit_dir: auditDir,
    });
    return 0;
  } finally {
    // The verdict is out; the audit copies to S3 may still be in flight.
    await flushAudit(audit);
  }
}

main(process.env).then(
  (code) => process.exit(code),
  (err) => {
    logError({ event: 'canary_live', status: 'FAIL', error: err instanceof Error ? err.message : String(err) });
    process.exit(1);
  },
);
