// console-ui: a tiny status page for operators, over the health routes of the other services.
// Started by `npm run start` in console-ui/ (quantlab-console-ui.service); no npm dependencies.
//
// Env: CONSOLE_PORT (9162), CONSOLE_TOKEN (needed for every route but /health: a bearer token, or the
//      password of HTTP basic auth so a browser can log in; empty admits nobody), CONSOLE_TITLE,
//      CONSOLE_OBSERVER_URL (http://127.0.0.1:9150) with OBSERVER_TOKEN, CONSOLE_REPLAYD_URL
//      (http://127.0.0.1:9160), CONSOLE_WORKER_URL (http://127.0.0.1:9161), CONSOLE_PROBE_TIMEOUT_MS (1500).
// Routes: GET /health, GET / (HTML), GET /api/status (JSON).
import crypto from 'node:crypto';
import http from 'node:http';
import { envStr } from '../core/lib/env.js';
import {
  ConfigError, UNAUTHORIZED, bearerOk, exitOnConfigError, exitOnSignal, exitOnStartupError, isEntryPoint, listen, log,
  readCount, readPort, sendJson,
} from '../services/lib/service.js';

const SERVICE = 'console-ui';

/**
 * Read a base URL setting; it must be http(s).
 * @param {string} name
 * @param {string} dflt
 * @param {Record<string,string|undefined>} env
 * @returns {string} the URL without a trailing slash
 */
function readUrl(name, dflt, env) {
  const raw = envStr(name, '', env).trim() || dflt;
  let url;
  try {
    url = new URL(raw);
  } catch {
    url = null;
  }
  if (!url || !['http:', 'https:'].includes(url.protocol)) {
    throw new ConfigError(`${name} must be an http(s) URL such as ${dflt} (got "${raw}"); fix it in /etc/quantlab/console.env.`);
  }
  return raw.replace(/\/+$/, '');
}

/**
 * Read and check the console's settings.
 * @param {Record<string,string|undefined>} env
 */
export function loadConfig(env = process.env) {
  return {
    port: readPort('CONSOLE_PORT', 9162, env),
    token: envStr('CONSOLE_TOKEN', '', env),
    title: envStr('CONSOLE_TITLE', '', env).trim() || 'QuantLab console',
    observerToken: envStr('OBSERVER_TOKEN', '', env),
    timeoutMs: readCount('CONSOLE_PROBE_TIMEOUT_MS', env.CONSOLE_PROBE_TIMEOUT_MS, 1500, { min: 1 }),
    targets: {
      observer: readUrl('CONSOLE_OBSERVER_URL', 'http://127.0.0.1:9150', env),
      replayd: readUrl('CONSOLE_REPLAYD_URL', 'http://127.0.0.1:9160', env),
      worker: readUrl('CONSOLE_WORKER_URL', 'http://127.0.0.1:9161', env),
    },
  };
}

/**
 * GET a JSON route with a deadline; never throws.
 * @returns {Promise<{url:string, ok:boolean, status_code:number|null, latency_ms:number, body?:unknown, error?:string}>}
 */
async function probe(url, { headers = {}, timeoutMs }) {
  const started = Date.now();
  try {
    const res = await fetch(url, { headers, signal: AbortSignal.timeout(timeoutMs) });
    const text = await res.text();
    let body;
    try {
      body = JSON.parse(text);
    } catch {
      body = text.slice(0, 200);
    }
    return { url, ok: res.ok, status_code: res.status, latency_ms: Date.now() - started, body };
  } catch (err) {
    const error = err?.name === 'TimeoutError' ? `no answer within ${timeoutMs} ms` : err?.cause?.code || err?.message || String(err);
    return { url, ok: false, status_code: null, latency_ms: Date.now() - started, error };
  }
}

/**
 * Probe every service (in parallel) and fetch the observer's runs.
 * @param {ReturnType<typeof loadConfig>} config
 */
export async function collectStatus(config) {
  const { targets, timeoutMs } = config;
  const auth = config.observerToken ? { authorization: `Bearer ${config.observerToken}` } : {};
  const [observer, runs, replayd, worker] = await Promise.all([
    probe(`${targets.observer}/observer/health`, { headers: auth, timeoutMs }),
    probe(`${targets.observer}/observer/runs`, { headers: auth, timeoutMs }),
    probe(`${targets.replayd}/health`, { timeoutMs }),
    probe(`${targets.worker}/health`, { timeoutMs }),
  ]);
  return {
    generated_at: new Date().toISOString(),
    services: { observer, replayd, worker },
    runs: runs.ok && Array.isArray(runs.body?.runs) ? runs.body.runs : [],
    runs_error: runs.ok ? null : runs.error || `HTTP ${runs.status_code}`,
  };
}

/** Escape text for HTML. */
function esc(value) {
  return String(value ?? '').replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

/**
 * Render the status page.
 * @param {string} title
 * @param {Awaited<ReturnType<typeof collectStatus>>} status
 * @returns {string}
 */
export function renderPage(title, status) {
  const serviceRows = Object.entries(status.services).map(([name, p]) => {
    const state = p.ok ? 'up' : 'down';
    const detail = p.ok ? `HTTP ${p.status_code}` : p.error || `HTTP ${p.status_code}`;
    return `<tr><td>${esc(name)}</td><td class="${state}">${state}</td><td>${esc(detail)}</td><td>${p.latency_ms} ms</td><td>${esc(p.url)}</td></tr>`;
  }).join('\n');
  const runRows = status.runs.map((r) => `<tr><td>${esc(r.live_run_id)}</td><td>${esc(r.strategy_id)}</td>` +
    `<td>${esc(r.status)}</td><td>${esc(r.stop_reason)}</td><td>${esc(r.budget_pressure)}</td><td>${esc(r.started_at)}</td></tr>`).join('\n');
  const runsNote = status.runs_error ? `<p class="down">runs unavailable: ${esc(status.runs_error)}</p>` : '';
  return `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>${esc(title)}</title>
<style>body{font-family:sans-serif;margin:2em}td,th{padding:.2em .8em;text-align:left}.up{color:#070}.down{color:#b00}</style>
</head><body>
<h1>${esc(title)}</h1>
<p>Generated ${esc(status.generated_at)}</p>
<h2>Services</h2>
<table><tr><th>service</th><th>state</th><th>detail</th><th>latency</th><th>url</th></tr>
${serviceRows}
</table>
<h2>Live runs</h2>
${runsNote}<table><tr><th>live_run_id</th><th>strategy</th><th>status</th><th>stop reason</th><th>budget pressure</th><th>started</th></tr>
${runRows}
</table>
</body></html>
`;
}

/**
 * Bearer token, or basic auth whose password is the token (what a browser can send).
 * @param {http.IncomingMessage} req
 * @param {string} token
 */
function authorised(req, token) {
  if (bearerOk(req, token)) return true;
  const match = /^Basic (.+)$/.exec(req.headers.authorization || '');
  if (!token || !match) return false;
  const decoded = Buffer.from(match[1], 'base64').toString('utf8');
  const given = Buffer.from(decoded.slice(decoded.indexOf(':') + 1));
  const want = Buffer.from(token);
  return given.length === want.length && crypto.timingSafeEqual(given, want);
}

/**
 * Build the HTTP server (not listening).
 * @param {ReturnType<typeof loadConfig>} config
 * @returns {http.Server}
 */
export function createConsole(config) {
  return http.createServer((req, res) => {
    const reply = async () => {
      const { pathname } = new URL(req.url, 'http://localhost');
      if (pathname === '/health') return sendJson(res, 200, { status: 'ok', service: SERVICE, title: config.title });
      if (!authorised(req, config.token)) {
        res.setHeader('www-authenticate', 'Basic realm="quantlab-console"');
        return sendJson(res, 401, UNAUTHORIZED);
      }
      if (req.method !== 'GET') return sendJson(res, 405, { error: 'METHOD_NOT_ALLOWED' });
      if (pathname === '/api/status') return sendJson(res, 200, await collectStatus(config));
      if (pathname === '/') {
        const html = renderPage(config.title, await collectStatus(config));
        res.writeHead(200, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store' });
        return res.end(html);
      }
      return sendJson(res, 404, { error: 'NOT_FOUND' });
    };
    reply().catch((err) => sendJson(res, 500, { error: 'INTERNAL', message: err.message }));
  });
}

async function main() {
  let config;
  try {
    config = loadConfig();
  } catch (err) {
    exitOnConfigError(err);
  }
  const server = createConsole(config);
  exitOnSignal({ service: 'console_ui', server });
  const port = await listen(server, config.port);
  log({ event: 'console_ui_listening', port });
}

if (isEntryPoint(import.meta.url)) main().catch((err) => exitOnStartupError('console_ui', err, 'CONSOLE_PORT'));
