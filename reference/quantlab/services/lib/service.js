// Plumbing shared by the twin's small HTTP services (replayd, worker, console-ui):
// config errors, ports, bearer auth, JSON replies, logging and a clean SIGTERM.
import crypto from 'node:crypto';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { envStr } from '../../core/lib/env.js';
import { redact } from '../../core/lib/log.js';
import { archiveSettings } from '../../core/lib/s3.js';
import { sendJson } from '../../core/lib/http.js';

export { sendJson };

/** Exit code of every service (and of the compact job) when its configuration is wrong. */
export const CONFIG_EXIT_CODE = 2;

/** Service tokens: secrets too, though the shared redactor does not know them. */
export const SERVICE_TOKEN_NAMES = Object.freeze(['REPLAYD_TOKEN', 'WORKER_TOKEN', 'CONSOLE_TOKEN']);

/** A configuration mistake the operator must fix; the message is one sentence. */
export class ConfigError extends Error {
  constructor(message) {
    super(message);
    this.name = 'ConfigError';
  }
}

/**
 * Mask every known secret (shared ones and service tokens) in text.
 * @param {unknown} text
 * @param {Record<string,string|undefined>} [env]
 * @returns {string}
 */
export function redactAll(text, env = process.env) {
  let out = redact(text, env);
  for (const name of SERVICE_TOKEN_NAMES) {
    const value = env[name];
    if (value) out = out.split(value).join('***');
  }
  return out;
}

/**
 * One JSON line on stdout with every secret masked.
 * @param {object} obj
 */
export function log(obj) {
  process.stdout.write(redactAll(JSON.stringify(obj)) + '\n');
}

/**
 * One JSON line on stderr with every secret masked.
 * @param {object} obj
 */
export function logErr(obj) {
  process.stderr.write(redactAll(JSON.stringify(obj)) + '\n');
}

/**
 * Read a listen port: unset or empty gives the default; 0 asks the OS for a free port.
 * @param {string} name
 * @param {number} dflt
 * @param {Record<string,string|undefined>} [env]
 * @returns {number}
 * @throws {ConfigError} when the value is not an integer from 0 to 65535
 */
export function readPort(name, dflt, env = process.env) {
  const raw = envStr(name, '', env).trim();
  if (raw === '') return dflt;
  const port = /^\d+$/.test(raw) ? Number(raw) : NaN;
  if (!Number.isInteger(port) || port > 65535) {
    throw new ConfigError(`${name} must be a port number from 0 to 65535 (got "${raw}"); fix it in the service's env file.`);
  }
  return port;
}

/**
 * Read a positive integer setting (flags and tuning knobs).
 * @param {string} label how the operator wrote it (flag or env name)
 * @param {string|undefined} raw
 * @param {number} dflt
 * @param {{min?:number}} [opts]
 * @returns {number}
 */
export function readCount(label, raw, dflt, { min = 0 } = {}) {
  if (raw === undefined || String(raw).trim() === '') return dflt;
  const text = String(raw).trim();
  if (!/^\d+$/.test(text) || Number(text) < min || !Number.isSafeInteger(Number(text))) {
    throw new ConfigError(`${label} must be a whole number >= ${min} (got "${text}").`);
  }
  return Number(text);
}

/**
 * Archive settings, checked: when RUN_ARCHIVE_ENABLED is on, all four RUN_ARCHIVE_S3_* must be set.
 * @param {string} envFile where the operator sets them (named in the error)
 * @param {Record<string,string|undefined>} [env]
 * @returns {ReturnType<typeof archiveSettings>}
 */
export function checkedArchiveSettings(envFile, env = process.env) {
  const settings = archiveSettings(env);
  if (!settings.enabled) return settings;
  const missing = [
    ['RUN_ARCHIVE_S3_BUCKET', settings.bucket],
    ['RUN_ARCHIVE_S3_ENDPOINT', settings.endpoint],
    ['RUN_ARCHIVE_S3_ACCESS_KEY', settings.accessKeyId],
    ['RUN_ARCHIVE_S3_SECRET_KEY', settings.secretAccessKey],
  ].filter(([, value]) => !value).map(([name]) => name);
  if (missing.length > 0) {
    throw new ConfigError(
      `${missing.join(', ')} ${missing.length === 1 ? 'is' : 'are'} required when RUN_ARCHIVE_ENABLED=1; ` +
      `set ${missing.length === 1 ? 'it' : 'them'} in ${envFile} or set RUN_ARCHIVE_ENABLED=0.`,
    );
  }
  return settings;
}

/**
 * Print the one-line `[config] ...` message and exit with CONFIG_EXIT_CODE.
 * Anything that is not a ConfigError is rethrown: it is a bug, not a setting.
 * @param {unknown} err
 */
export function exitOnConfigError(err) {
  if (!(err instanceof ConfigError)) throw err;
  process.stderr.write(`[config] ${redactAll(err.message)}\n`);
  process.exit(CONFIG_EXIT_CODE);
}

/**
 * True when the request carries `Authorization: Bearer <token>`; an empty token admits nobody.
 * @param {import('node:http').IncomingMessage} req
 * @param {string} token
 * @returns {boolean}
 */
export function bearerOk(req, token) {
  if (!token) return false;
  const header = req.headers.authorization || '';
  const match = /^Bearer (.+)$/.exec(header);
  if (!match) return false;
  const given = Buffer.from(match[1]);
  const want = Buffer.from(token);
  // Constant-time compare so response timing does not leak the token.
  return given.length === want.length && crypto.timingSafeEqual(given, want);
}


/** The 401 body, worded like the observer's. */
export const UNAUTHORIZED = Object.freeze({ error: 'UNAUTHORIZED', message: 'Bearer token required' });

/**
 * Listen on all interfaces (as QuantLab's services do) and resolve the bound port.
 * @param {import('node:http').Server} server
 * @param {number} port
 * @returns {Promise<number>}
 */
export function listen(server, port) {
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, '0.0.0.0', () => {
      server.off('error', reject);
      resolve(server.address().port);
    });
  });
}

/**
 * On SIGTERM or SIGINT: run cleanup, close the server and its connections, log
 * `{"event":"<service>_stopped","signal":...}` and exit 0. A cleanup that hangs is cut
 * short so the process always ends well inside systemd's TimeoutStopSec.
 * @param {{service:string, server?:import('node:http').Server, cleanup?:() => Promise<void>|void, graceMs?:number}} opts
 */
export function exitOnSignal({ service, server, cleanup = async () => {}, graceMs = 800 }) {
  let stopping = false;
  const stop = async (signal) => {
    if (stopping) return;
    stopping = true;
    const deadline = setTimeout(() => finish(signal, 'grace period over'), graceMs);
    deadline.unref();
    try {
      await cleanup();
    } catch (err) {
      logErr({ event: `${service}_cleanup_error`, error: err?.message || String(err) });
    }
    if (server) {
      server.closeAllConnections?.();
      await new Promise((resolve) => server.close(() => resolve()));
    }
    finish(signal);
  };
  let finished = false;
  const finish = (signal, note) => {
    if (finished) return;
    finished = true;
    log({ event: `${service}_stopped`, signal, ...(note ? { note } : {}) });
    process.exit(0);
  };
  process.once('SIGTERM', () => stop('SIGTERM'));
  process.once('SIGINT', () => stop('SIGINT'));
}

/**
 * Wait ms milliseconds unless the signal aborts first (resolves false then).
 * @param {number} ms
 * @param {AbortSignal} [signal]
 * @returns {Promise<boolean>} true when the full time passed
 */
export function sleep(ms, signal) {
  return new Promise((resolve) => {
    if (signal?.aborted) return resolve(false);
    const onAbort = () => {
      clearTimeout(timer);
      resolve(false);
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve(true);
    }, ms);
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

/**
 * True when the module at moduleUrl is the script node was started with (not an import).
 * @param {string} moduleUrl import.meta.url of the caller
 * @returns {boolean}
 */
export function isEntryPoint(moduleUrl) {
  return Boolean(process.argv[1]) && pathToFileURL(path.resolve(process.argv[1])).href === moduleUrl;
}

/**
 * Report a failure to start (a busy port, most often) as one JSON line on stderr and exit 1.
 * @param {string} service
 * @param {any} err
 * @param {string} portEnv the variable that picks the port
 */
export function exitOnStartupError(service, err, portEnv) {
  const error = err?.code === 'EADDRINUSE'
    ? `port ${err.port} is already in use; stop the other process or set ${portEnv} to a free port.`
    : err?.message || String(err);
  logErr({ event: `${service}_error`, error });
  process.exit(1);
}
