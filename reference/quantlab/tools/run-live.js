#!/usr/bin/env node
// The long live run behind quantlab-live.service: one run with the canary's flags and no checks.
// It runs until stopped (observer stop, SIGTERM, a budget or a guard); a stop exits 0, an ERROR exits 1.
import { logError } from '../core/lib/log.js';
import { buildRun, flushAudit, parseFlagsOrUsage, runOptions, stopOnSignals } from '../core/live/liveCli.js';

const SCRIPT = 'tools/run-live.js';

/**
 * @param {Record<string,string|undefined>} env
 * @returns {Promise<number>} exit code
 */
async function main(env) {
  const flags = parseFlagsOrUsage(SCRIPT, process.argv.slice(2));
  if (flags === null) return 1;
  const options = runOptions(flags, { env, defaultDurationSeconds: null });
  const { run, audit } = await buildRun(options, env);
  stopOnSignals(run);
  // LiveRun itself logs live_run_error (e.g. CORE_LIVE_WS_DISABLED) and live_archive_error.
  const result = await run.run();
  await flushAudit(audit);
  return result.status === 'ERROR' ? 1 : 0;
}

main(process.env).then(
  (code) => process.exit(code),
  (err) => {
    logError({ event: 'live_run_error', live_run_id: null, error: err instanceof Error ? err.message : String(err) });
    process.exit(1);
  },
);
