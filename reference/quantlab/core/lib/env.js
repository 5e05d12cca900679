// Environment helpers shared by every twin entry point.
// QuantLab reads its configuration from the process environment only; these helpers
// give every module the same parsing rules (CONTRACT section 2).
import fs from 'node:fs';

/** Names whose values must never reach a log, an audit entry or an archive object. */
export const SECRET_ENV_NAMES = Object.freeze([
  'OBSERVER_TOKEN',
  'RUN_ARCHIVE_S3_ACCESS_KEY',
  'RUN_ARCHIVE_S3_SECRET_KEY',
]);

const TRUE_VALUES = new Set(['1', 'true', 'yes']);

/**
 * Read a boolean variable: '1', 'true' or 'yes' (any case, trimmed) is on.
 * @param {string} name
 * @param {boolean} dflt value when the variable is unset or empty
 * @param {Record<string,string|undefined>} [env]
 * @returns {boolean}
 */
export function envBool(name, dflt, env = process.env) {
  const raw = env[name];
  if (raw === undefined || raw === null) return dflt;
  const value = String(raw).trim().toLowerCase();
  if (value === '') return dflt;
  return TRUE_VALUES.has(value);
}

/**
 * Read an integer variable; unset, empty or not an integer gives the default.
 * @param {string} name
 * @param {number} dflt
 * @param {Record<string,string|undefined>} [env]
 * @returns {number}
 */
export function envInt(name, dflt, env = process.env) {
  const raw = env[name];
  if (raw === undefined || raw === null) return dflt;
  const value = String(raw).trim();
  if (!/^[-+]?\d+$/.test(value)) return dflt;
  const parsed = Number.parseInt(value, 10);
  return Number.isSafeInteger(parsed) ? parsed : dflt;
}

/**
 * Read a string variable (unset gives the default; the value is returned as set).
 * @param {string} name
 * @param {string} [dflt]
 * @param {Record<string,string|undefined>} [env]
 * @returns {string}
 */
export function envStr(name, dflt = '', env = process.env) {
  const raw = env[name];
  if (raw === undefined || raw === null) return dflt;
  return String(raw);
}

/**
 * Parse one dotenv line into [key, value], or null for blanks, comments and junk.
 * @param {string} line
 * @returns {[string, string] | null}
 */
function parseDotEnvLine(line) {
  const trimmed = line.trim();
  if (trimmed === '' || trimmed.startsWith('#')) return null;
  const body = trimmed.startsWith('export ') ? trimmed.slice(7).trim() : trimmed;
  const eq = body.indexOf('=');
  if (eq <= 0) return null;
  const key = body.slice(0, eq).trim();
  if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(key)) return null;
  let value = body.slice(eq + 1).trim();
  const quote = value[0];
  if ((quote === '"' || quote === "'") && value.length >= 2 && value.endsWith(quote)) {
    value = value.slice(1, -1);
    if (quote === '"') value = value.replace(/\\n/g, '\n');
  } else {
    // An unquoted value may carry a trailing comment, as dotenv allows.
    const hash = value.indexOf(' #');
    if (hash >= 0) value = value.slice(0, hash).trim();
  }
  return [key, value];
}

/**
 * Load KEY=VALUE lines from a dotenv file into env, like the dotenv package:
 * a variable already set is never overridden, and a missing file is fine.
 * @param {string} file
 * @param {Record<string,string|undefined>} [env]
 * @returns {string[]} the names that were set from the file
 */
export function loadDotEnv(file, env = process.env) {
  let text;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (err) {
    if (err && err.code === 'ENOENT') return [];
    throw err;
  }
  const loaded = [];
  for (const line of text.split(/\r?\n/)) {
    const pair = parseDotEnvLine(line);
    if (!pair) continue;
    const [key, value] = pair;
    if (env[key] !== undefined) continue;
    env[key] = value;
    loaded.push(key);
  }
  return loaded;
}
