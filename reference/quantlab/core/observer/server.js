// The observer HTTP API (CONTRACT section 3): health, runs and stop, behind a bearer token,
// rate limited per client IP and path before auth. Runs come from the shared RunRegistry,
// so runs started by any process on the host are listed and stoppable.
import crypto from 'node:crypto';
import http from 'node:http';
import { logError } from '../lib/log.js';
import { sendJson } from '../lib/http.js';

export const RATE_LIMIT_PER_MIN = 120;
export const STOP_RATE_LIMIT_PER_MIN = 30;
const WINDOW_MS = 60_000;
const STOP_PATH = /^\/observer\/runs\/([^/]+)\/stop$/;
const PRESSURE_RANK = { LOW: 0, MED: 1, HIGH: 2 };


/**
 * Compare a presented bearer header with the token in constant time. Hashing both sides first
 * makes the comparison independent of the lengths too. An empty token accepts nothing.
 * @param {string|undefined} header
 * @param {string} token
 * @returns {boolean}
 */
export function bearerMatches(header, token) {
  if (!token || typeof header !== 'string') return false;
  const presented = header.startsWith('Bearer ') ? header.slice(7) : '';
  const a = crypto.createHash('sha256').update(presented).digest();
  const b = crypto.createHash('sha256').update(token).digest();
  return crypto.timingSafeEqual(a, b);
}

/**
 * A fixed-window counter per key (client IP + path).
 * @param {() => number} now
 */
export function createRateLimiter(now) {
  const windows = new Map();
  return {
    /**
     * Count one request; true when it is within the limit.
     * @param {string} key
     * @param {number} limit
     * @returns {boolean}
     */
    allow(key, limit) {
      const t = now();
      if (windows.size > 10_000) {
        for (const [k, w] of windows) if (t - w.start >= WINDOW_MS) windows.delete(k);
      }
      let w = windows.get(key);
      if (!w || t - w.start >= WINDOW_MS) {
        w = { start: t, count: 0 };
        windows.set(key, w);
      }
      w.count += 1;
      return w.count <= limit;
    },
  };
}

/**
 * A last_event_ts as epoch milliseconds (number in ms, us or ns, numeric string, or ISO date).
 * @param {unknown} ts
 * @returns {number|null}
 */
export function toEpochMs(ts) {
  if (ts === null || ts === undefined || ts === '') return null;
  let n = typeof ts === 'number' ? ts : Number(ts);
  if (!Number.isFinite(n)) {
    n = Date.parse(String(ts));
    return Number.isFinite(n) ? n : null;
  }
  if (n > 1e17) return n / 1e6;
  if (n > 1e14) return n / 1e3;
  return n;
}

/**
 * The health body from the registry's runs.
 * @param {object[]} runs
 * @param {number} nowMs
 * @returns {object}
 */
export function healthBody(runs, nowMs) {
  const running = runs.filter((r) => r.status === 'RUNNING');
  const lastEvents = running.map((r) => toEpochMs(r.last_event_ts)).filter((v) => v !== null);
  const pressure = running
    .map((r) => (r.budget_pressure in PRESSURE_RANK ? r.budget_pressure : 'LOW'))
    .reduce((a, b) => (PRESSURE_RANK[b] > PRESSURE_RANK[a] ? b : a), 'LOW');
  return {
    active_runs: running.length,
    ws_connected: running.some((r) => r.ws_connected === true),
    last_event_age_ms: lastEvents.length ? Math.max(0, Math.round(nowMs - Math.max(...lastEvents))) : null,
    budget_pressure: pressure,
    kill_switch_active: false,
    kill_switch_reason: null,
    killed_symbols: [],
  };
}

/**
 * The public shape of one run.
 * @param {object} r registry record
 * @returns {object}
 */
export function runView(r) {
  return {
    live_run_id: r.live_run_id,
    strategy_id: r.strategy_id ?? null,
    status: r.status,
    started_at: r.started_at ?? null,
    last_event_ts: r.last_event_ts ?? null,
    stop_reason: r.stop_reason ?? null,
    budget_pressure: r.budget_pressure ?? 'LOW',
  };
}

/**
 * Build the observer server (not listening yet).
 * @param {{token:string, registry:import('../state/RunRegistry.js').RunRegistry,
 *   audit?:import('../audit/AuditWriter.js').AuditWriter|null, now?:() => number}} opts
 * @returns {http.Server}
 */
export function createObserver({ token, registry, audit = null, now = Date.now }) {
  const limiter = createRateLimiter(now);

  /** POST /observer/runs/<id>/stop */
  const stopRun = async (res, id, pathname) => {
    if (!registry.get(id)) return sendJson(res, 404, { error: 'RUN_NOT_FOUND' });
    if (audit) {
      // The stop matters more than its record: an audit failure is logged, not fatal.
      try {
        await audit.write({
          action: 'API_CALL',
          target_type: 'run',
          target_id: id,
          reason: 'MANUAL_STOP',
          metadata: { live_run_id: id, path: pathname },
          actor: 'observer',
        });
      } catch (err) {
        logError({ event: 'observer_audit_error', live_run_id: id, error: err.message });
      }
    }
    if (!registry.requestStop(id, 'MANUAL_STOP')) return sendJson(res, 404, { error: 'RUN_NOT_FOUND' });
    return sendJson(res, 200, { status: 'ok', id });
  };

  /** Route one authorised /observer request. */
  const route = async (req, res, pathname) => {
    if (req.method === 'GET' && pathname === '/observer/health') {
      return sendJson(res, 200, healthBody(registry.list(), now()));
    }
    if (req.method === 'GET' && pathname === '/observer/runs') {
      return sendJson(res, 200, { runs: registry.list().map(runView) });
    }
    const stop = STOP_PATH.exec(pathname);
    if (req.method === 'POST' && stop) {
      let id;
      try {
        id = decodeURIComponent(stop[1]);
      } catch {
        return sendJson(res, 404, { error: 'RUN_NOT_FOUND' });
      }
      return stopRun(res, id, pathname);
    }
    return sendJson(res, 404, { error: 'NOT_FOUND' });
  };

  const handle = async (req, res) => {
    // Bodies are never used; drain them so keep-alive connections stay usable.
    req.resume();
    const pathname = new URL(req.url || '/', 'http://observer.invalid').pathname;
    if (pathname !== '/observer' && !pathname.startsWith('/observer/')) {
      return sendJson(res, 404, { error: 'NOT_FOUND' });
    }
    const limit = STOP_PATH.test(pathname) ? STOP_RATE_LIMIT_PER_MIN : RATE_LIMIT_PER_MIN;
    if (!limiter.allow(`${req.socket.remoteAddress}|${pathname}`, limit)) {
      return sendJson(res, 429, { error: 'TOO_MANY_REQUESTS', message: `Limit ${limit}/min` });
    }
    if (!bearerMatches(req.headers.authorization, token)) {
      return sendJson(res, 401, { error: 'UNAUTHORIZED', message: 'Bearer token required' });
    }
    return route(req, res, pathname);
  };

  return http.createServer((req, res) => {
    handle(req, res).catch((err) => {
      logError({ event: 'observer_request_error', error: err.message });
      if (!res.headersSent) sendJson(res, 500, { error: 'INTERNAL_ERROR' });
      else res.destroy();
    });
  });
}
