// `node core/release/ConfigCheck.js`: exits 0 when the required configuration is present
// (CONTRACT section 4). Values are never printed, only the names of missing variables.
import { fileURLToPath } from 'node:url';
import { envStr } from '../lib/env.js';
import { archiveSettings } from '../lib/s3.js';
import { logEvent } from '../lib/log.js';

export const ARCHIVE_VARS = Object.freeze([
  'RUN_ARCHIVE_S3_BUCKET',
  'RUN_ARCHIVE_S3_ENDPOINT',
  'RUN_ARCHIVE_S3_ACCESS_KEY',
  'RUN_ARCHIVE_S3_SECRET_KEY',
]);

/**
 * The names of required variables that are unset or blank, in the order they are reported.
 * @param {Record<string,string|undefined>} [env]
 * @returns {string[]}
 */
export function missingConfig(env = process.env) {
  const required = ['OBSERVER_TOKEN'];
  if (archiveSettings(env).enabled) required.push(...ARCHIVE_VARS);
  return required.filter((name) => envStr(name, '', env).trim() === '');
}

/**
 * Print the result and return the exit code.
 * @param {Record<string,string|undefined>} [env]
 * @returns {number}
 */
export function runConfigCheck(env = process.env) {
  const missing = missingConfig(env);
  for (const name of missing) process.stderr.write(`[config] ${name} is required\n`);
  if (missing.length > 0) return 1;
  logEvent({ event: 'config_check', status: 'ok' });
  return 0;
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  process.exitCode = runConfigCheck();
}
