// JSON-line logging with secret redaction: no secret ever reaches stdout or stderr.
import { SECRET_ENV_NAMES } from './env.js';

/**
 * Replace every non-empty secret value (see SECRET_ENV_NAMES) in text with '***'.
 * @param {unknown} text
 * @param {Record<string,string|undefined>} [env]
 * @returns {string}
 */
export function redact(text, env = process.env) {
  let out = String(text);
  // Longest first, so a secret that contains another is masked whole.
  const secrets = SECRET_ENV_NAMES
    .map((name) => env[name])
    .filter((value) => typeof value === 'string' && value !== '')
    .sort((a, b) => b.length - a.length);
  for (const secret of secrets) out = out.split(secret).join('***');
  return out;
}

/**
 * Serialise a value as JSON, turning Errors and bigints into printable values.
 * @param {unknown} obj
 * @returns {string}
 */
function toJsonLine(obj) {
  return JSON.stringify(obj, (_key, value) => {
    if (typeof value === 'bigint') return value.toString();
    if (value instanceof Error) return value.message;
    return value;
  });
}

/**
 * Write one redacted JSON line.
 * @param {object} obj
 * @param {NodeJS.WritableStream} [stream]
 */
export function logEvent(obj, stream = process.stdout) {
  stream.write(redact(toJsonLine(obj)) + '\n');
}

/**
 * Write one redacted JSON line on stderr.
 * @param {object} obj
 */
export function logError(obj) {
  logEvent(obj, process.stderr);
}
