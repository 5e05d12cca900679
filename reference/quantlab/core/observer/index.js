// Observer entry point: `node core/observer/index.js`. Listens on OBSERVER_PORT (default 9150)
// on all interfaces; SIGTERM or SIGINT closes it and exits 0.
import { AuditWriter } from '../audit/AuditWriter.js';
import { envStr } from '../lib/env.js';
import { logError, logEvent } from '../lib/log.js';
import { RunRegistry } from '../state/RunRegistry.js';
import { createObserver } from './server.js';

const DEFAULT_PORT = 9150;
const SHUTDOWN_GRACE_MS = 3_000;

/**
 * OBSERVER_PORT as a number, or null when it is not a port.
 * @param {Record<string,string|undefined>} env
 * @returns {number|null}
 */
function observerPort(env) {
  const raw = envStr('OBSERVER_PORT', '', env).trim();
  if (raw === '') return DEFAULT_PORT;
  if (!/^\d+$/.test(raw)) return null;
  const port = Number(raw);
  return port <= 65_535 ? port : null;
}

/**
 * Close the server, give open requests and audit uploads a short grace, then exit 0.
 * @param {import('node:http').Server} server
 * @param {AuditWriter} audit
 * @param {string} signal
 */
async function shutdown(server, audit, signal) {
  logEvent({ event: 'observer_stopping', signal });
  const force = setTimeout(() => server.closeAllConnections(), SHUTDOWN_GRACE_MS);
  await new Promise((resolve) => {
    server.close(() => resolve());
    server.closeIdleConnections();
  });
  clearTimeout(force);
  await Promise.race([audit.flush(), new Promise((r) => setTimeout(r, SHUTDOWN_GRACE_MS).unref())]);
  logEvent({ event: 'observer_stopped', signal });
  process.exit(0);
}

function main(env = process.env) {
  const port = observerPort(env);
  if (port === null) {
    process.stderr.write('[config] OBSERVER_PORT must be a port number from 0 to 65535\n');
    process.exit(1);
  }
  const token = envStr('OBSERVER_TOKEN', '', env);
  if (token === '') {
    logError({ event: 'observer_token_missing', message: 'OBSERVER_TOKEN is empty: every request will get 401; set it in the observer env file' });
  }
  const audit = AuditWriter.fromEnv(env, { actor: 'observer' });
  const server = createObserver({ token, registry: RunRegistry.fromEnv(env), audit });
  server.on('error', (err) => {
    logError({ event: 'observer_error', error: `${err.code || err.message}: cannot listen on port ${port}; free the port or set OBSERVER_PORT` });
    process.exit(1);
  });
  let stopping = false;
  for (const signal of ['SIGTERM', 'SIGINT']) {
    process.on(signal, () => {
      if (stopping) return;
      stopping = true;
      shutdown(server, audit, signal).catch(() => process.exit(1));
    });
  }
  server.listen(port, '0.0.0.0', () => {
    logEvent({ event: 'observer_listening', port: server.address().port });
  });
}

main();
