// One live run (CONTRACT sections 6 and 9): registry record, audit trail, budgets, guards,
// stop requests through the shared registry, event ordering, and the archive at the end.
import crypto from 'node:crypto';
import { logError, logEvent } from '../lib/log.js';
import { s3ErrorMessage } from '../lib/s3.js';
import { BinanceFuturesStream } from './BinanceFuturesStream.js';
import { MockStream } from './MockStream.js';

export const STOP_REASONS = Object.freeze({
  STREAM_END: 'STREAM_END',
  MANUAL_STOP: 'MANUAL_STOP',
  KILL_SWITCH: 'KILL_SWITCH',
  BUDGET_EXCEEDED: 'BUDGET_EXCEEDED',
  PROMOTION_GUARD_FAIL: 'PROMOTION_GUARD_FAIL',
  ERROR: 'ERROR',
});

const SIDES = new Set(['BUY', 'SELL']);
const DRAIN_TIMEOUT_MS = 1000;

/**
 * Wait for a promise, but no longer than ms (a hung strategy must not hold a stopped run).
 * @param {Promise<unknown>} promise
 * @param {number} ms
 * @returns {Promise<void>}
 */
async function settleWithin(promise, ms) {
  let timer;
  const timeout = new Promise((resolve) => { timer = setTimeout(resolve, ms); });
  try {
    await Promise.race([promise.catch(() => undefined), timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * A checked decision {symbol, side, qty}; throws a sentence saying what a decision must look like.
 * @param {unknown} raw
 * @param {string} fallbackSymbol
 * @returns {{symbol:string, side:'BUY'|'SELL', qty:number}}
 */
export function normaliseDecision(raw, fallbackSymbol) {
  const side = typeof raw?.side === 'string' ? raw.side.toUpperCase() : raw?.side;
  const qty = Number(raw?.qty);
  const symbol = raw?.symbol ?? fallbackSymbol;
  if (!raw || typeof raw !== 'object' || !SIDES.has(side) || !(qty > 0) || !Number.isFinite(qty) || typeof symbol !== 'string') {
    throw new Error(`Strategy returned an invalid decision ${JSON.stringify(raw)}; return {symbol, side: 'BUY'|'SELL', qty > 0}.`);
  }
  return { symbol: symbol.toUpperCase(), side, qty };
}

/**
 * Decisions from a strategy's return value: nothing, one decision, or an array of them.
 * @param {unknown} out
 * @returns {unknown[]}
 */
function asDecisionList(out) {
  if (out === null || out === undefined || out === false) return [];
  return Array.isArray(out) ? out : [out];
}

export class LiveRun {
  /**
   * @param {object} opts
   * @param {string[]} opts.symbols
   * @param {any} opts.strategy instance with onEvent(event, ctx)
   * @param {string} opts.strategyId
   * @param {{register:Function, update:Function, watchStop:Function}} opts.registry
   * @param {{write:Function}} opts.audit
   * @param {{write:Function}|null} opts.archive archive writer, or null when archiving is off
   * @param {import('./RunBudgets.js').RunBudgets} opts.budgets
   * @param {import('./PromotionGuards.js').PromotionGuards} opts.guards
   * @param {string} [opts.exchange]
   * @param {string|number|null} [opts.seed]
   * @param {object} [opts.strategyConfig]
   * @param {'STRICT'|'WARN'} [opts.orderingMode]
   * @param {string} [opts.executionMode]
   * @param {number|null} [opts.durationMs] natural end of the run (STREAM_END); null runs until stopped
   * @param {boolean} [opts.mock] use the 20-event MockStream instead of the exchange
   * @param {string|null} [opts.datasetParquet]
   * @param {string|null} [opts.datasetMeta]
   * @param {Record<string,string|undefined>} [opts.env]
   * @param {(handlers:object) => {start:Function, stop:Function, stats?:object}} [opts.sourceFactory] for tests
   * @param {number} [opts.tickMs] budget / registry tick
   * @param {number} [opts.registryIntervalMs] least time between registry heartbeats
   */
  constructor(opts) {
    Object.assign(this, {
      exchange: 'binance', seed: null, strategyConfig: {}, orderingMode: 'STRICT', executionMode: 'mock',
      durationMs: null, mock: false, datasetParquet: null, datasetMeta: null, env: process.env,
      sourceFactory: null, tickMs: 100, registryIntervalMs: 200,
    }, opts);
    this.id = crypto.randomUUID();
    this.eventCount = 0;
    this.decisions = [];
    this.lastTs = new Map();
    this.orderingViolations = 0;
    this.stopReason = null;
    this.error = null;
    this.wsConnected = false;
    this.lastEventTs = null;
    this.currentEvent = null;
    this.chain = Promise.resolve();
    this.auditChain = Promise.resolve();
    this.lastRegistryWrite = 0;
    this.registryDirty = false;
    this.source = null;
    this.ctx = this.makeContext();
    this.ended = new Promise((resolve) => { this.resolveEnded = resolve; });
  }

  /** @returns {object} what a strategy sees as ctx */
  makeContext() {
    return {
      live_run_id: this.id,
      symbols: this.symbols,
      config: this.strategyConfig,
      executionMode: this.executionMode,
      price: (symbol) => this.guards.book.price(symbol),
      position: (symbol) => this.guards.book.position(symbol),
      emit: (decision) => this.acceptDecision(decision, this.currentEvent),
      log: (obj) => logEvent({ event: 'strategy_log', live_run_id: this.id, ...obj }),
    };
  }

  /**
   * Run to the end; resolves with the result (it never rejects for run failures: those end as ERROR).
   * @returns {Promise<object>}
   */
  async run() {
    this.startedAtMs = Date.now();
    this.startedAt = new Date(this.startedAtMs);
    this.registry.register({
      live_run_id: this.id, strategy_id: this.strategyId, status: 'RUNNING', started_at: this.startedAt.toISOString(),
      last_event_ts: null, stop_reason: null, budget_pressure: 'LOW', ws_connected: false, pid: process.pid, error: null,
    });
    this.writeAudit('RUN_START', null, {
      strategy_id: this.strategyId, exchange: this.exchange, symbols: this.symbols, mock: this.mock,
      ordering_mode: this.orderingMode, execution_mode: this.executionMode, seed: this.seed,
    });
    logEvent({ event: 'live_run_start', live_run_id: this.id, strategy_id: this.strategyId, exchange: this.exchange,
      symbols: this.symbols, mock: this.mock, ordering_mode: this.orderingMode, execution_mode: this.executionMode });
    this.unwatch = this.registry.watchStop(this.id, (reason) => this.stop(reason || STOP_REASONS.MANUAL_STOP));
    this.ticker = setInterval(() => this.onTick(), this.tickMs);
    if (this.durationMs !== null) this.durationTimer = setTimeout(() => this.stop(STOP_REASONS.STREAM_END), this.durationMs);
    await this.startStrategyAndSource();
    await this.ended;
    return this.finish();
  }

  /** onStart, then the event source; a failure of either ends the run as ERROR. */
  async startStrategyAndSource() {
    try {
      if (typeof this.strategy.onStart === 'function') await this.strategy.onStart(this.ctx);
      if (this.stopReason) return;
      this.source = this.createSource();
      this.source.start();
    } catch (err) {
      this.fail(err);
    }
  }

  /** @returns {{start:Function, stop:Function, stats?:object}} */
  createSource() {
    const handlers = {
      symbols: this.symbols,
      seed: this.seed,
      env: this.env,
      onEvent: (event) => this.enqueue(event),
      onStatus: (status) => this.onStatus(status),
      onEnd: () => this.enqueueEnd(),
    };
    if (this.sourceFactory) return this.sourceFactory(handlers);
    if (this.mock) return new MockStream(handlers);
    return new BinanceFuturesStream(handlers);
  }

  /**
   * Ask the run to stop; the first reason wins.
   * @param {string} reason
   * @param {string|null} [error]
   */
  stop(reason, error = null) {
    if (this.stopReason) return;
    this.stopReason = reason;
    this.error = error;
    clearTimeout(this.durationTimer);
    // Stop ingest at once, so a stopped run takes no more events while it finishes.
    if (this.source) this.source.stop();
    this.resolveEnded();
  }

  /**
   * End the run as ERROR, logging why.
   * @param {unknown} err
   */
  fail(err) {
    if (this.stopReason) return;
    const message = err instanceof Error ? err.message : String(err);
    logError({ event: 'live_run_error', live_run_id: this.id, error: message });
    this.stop(STOP_REASONS.ERROR, message);
  }

  /** @param {object} event queued so an async strategy sees events one at a time, in order */
  enqueue(event) {
    if (this.stopReason) return;
    this.chain = this.chain.then(() => this.handleEvent(event)).catch((err) => this.fail(err));
  }

  /** The source ran out (the mock's 20 events): end once queued events are handled. */
  enqueueEnd() {
    this.chain = this.chain.then(() => this.stop(STOP_REASONS.STREAM_END));
  }

  /** @param {{connected:boolean}} status from the source */
  onStatus(status) {
    this.wsConnected = Boolean(status.connected);
    if (!status.connected) {
      logEvent({ event: 'live_ws_disconnected', live_run_id: this.id, reason: status.reason, detail: status.detail,
        reconnect_in_ms: status.reconnect_in_ms, paused: status.paused });
    } else {
      logEvent({ event: 'live_ws_connected', live_run_id: this.id });
    }
    this.writeRegistry(true);
  }

  /**
   * One event: ordering, budgets, strategy, fills, guards.
   * @param {object} event
   */
  async handleEvent(event) {
    if (this.stopReason || !this.inOrder(event)) return;
    this.eventCount += 1;
    this.lastEventTs = Date.now();
    this.guards.observe(event);
    if (this.checkBudgets()) return;
    this.currentEvent = { ...event, cursor: this.eventCount - 1 };
    let out = this.strategy.onEvent(event, this.ctx);
    if (out && typeof out.then === 'function') out = await out;
    if (this.stopReason) return;
    for (const decision of asDecisionList(out)) this.acceptDecision(decision, this.currentEvent);
    if (this.stopReason || this.checkBudgets()) return;
    const failed = this.guards.checkEvent();
    if (failed) {
      this.guardFail(failed);
      return;
    }
    this.writeRegistry(false);
  }

  /**
   * STRICT ordering: ts_event must not go back within one symbol and stream (streams interleave).
   * @param {object} event
   * @returns {boolean} false when the event ended the run
   */
  inOrder(event) {
    const key = `${event.symbol}|${event.stream}`;
    const previous = this.lastTs.get(key);
    if (previous === undefined || event.ts_event >= previous) {
      this.lastTs.set(key, event.ts_event);
      return true;
    }
    this.orderingViolations += 1;
    logEvent({ event: 'ordering_violation', live_run_id: this.id, mode: this.orderingMode, symbol: event.symbol,
      stream: event.stream, ts_event: event.ts_event, previous_ts_event: previous });
    if (this.orderingMode !== 'STRICT') return true;
    this.fail(new Error(`ORDERING_VIOLATION ${event.symbol} ${event.stream} ts_event ${event.ts_event} < ${previous}`));
    return false;
  }

  /**
   * Simulate and record one decision.
   * @param {unknown} raw
   * @param {object|null} event the event it answers (null before the first event)
   */
  acceptDecision(raw, event) {
    if (this.stopReason) return;
    try {
      const decision = normaliseDecision(raw, event?.symbol);
      const fill = this.executionMode === 'mock' ? this.guards.fill(decision) : null;
      this.decisions.push({
        cursor: event?.cursor ?? null,
        ts_event: event?.ts_event ?? null,
        decision: { ...decision, fill_price: fill ? fill.price : null },
      });
      this.budgets.noteDecision(Date.now());
    } catch (err) {
      this.fail(err);
    }
  }

  /** @returns {{eventCount:number, elapsedMs:number, nowMs:number}} */
  budgetState() {
    const nowMs = Date.now();
    return { eventCount: this.eventCount, elapsedMs: nowMs - this.startedAtMs, nowMs };
  }

  /** @returns {boolean} true when a budget was breached (and the run is stopping) */
  checkBudgets() {
    if (this.stopReason) return true;
    const breach = this.budgets.check(this.budgetState());
    if (!breach) return false;
    this.writeAudit('BUDGET_EXCEEDED', breach.reason, { budget: breach.budget, value: breach.value, limit: breach.limit });
    logEvent({ event: 'budget_exceeded', live_run_id: this.id, ...breach });
    this.stop(STOP_REASONS.BUDGET_EXCEEDED);
    return true;
  }

  /** @param {{guard:string, value:number, limit:number, reason:string}} failed */
  guardFail(failed) {
    this.writeAudit('GUARD_FAIL', failed.reason, { guard: failed.guard, value: failed.value, limit: failed.limit });
    logEvent({ event: 'promotion_guard_fail', live_run_id: this.id, ...failed });
    this.stop(STOP_REASONS.PROMOTION_GUARD_FAIL);
  }

  /** Time-based budget (max_duration) and the registry heartbeat, between events too. */
  onTick() {
    if (this.stopReason) return;
    if (this.checkBudgets()) return;
    this.writeRegistry(false);
  }

  /**
   * Update the shared registry record, at most once per registryIntervalMs unless forced.
   * @param {boolean} force
   */
  writeRegistry(force) {
    const now = Date.now();
    if (!force && now - this.lastRegistryWrite < this.registryIntervalMs) return;
    this.lastRegistryWrite = now;
    try {
      this.registry.update(this.id, {
        last_event_ts: this.lastEventTs,
        ws_connected: this.wsConnected,
        budget_pressure: this.budgets.pressure(this.budgetState()),
      });
    } catch (err) {
      logError({ event: 'live_registry_error', live_run_id: this.id, error: err.message });
    }
  }

  /**
   * Queue an audit entry about this run; entries are written in order, failures are logged.
   * @param {string} action
   * @param {string|null} reason
   * @param {object} metadata
   */
  writeAudit(action, reason, metadata) {
    const entry = { action, target_type: 'run', target_id: this.id, reason, metadata: { live_run_id: this.id, ...metadata } };
    this.auditChain = this.auditChain.then(() => this.audit.write(entry)).catch((err) => {
      logError({ event: 'live_audit_error', live_run_id: this.id, action, error: err.message });
    });
  }

  /**
   * Drain, final guard, RUN_STOP, registry, archive.
   * @returns {Promise<object>}
   */
  async finish() {
    clearInterval(this.ticker);
    clearTimeout(this.durationTimer);
    if (this.unwatch) this.unwatch();
    await settleWithin(this.chain, DRAIN_TIMEOUT_MS);
    if (this.stopReason === STOP_REASONS.STREAM_END) this.finalGuard();
    await this.endStrategy();
    this.finishedAt = new Date();
    const status = this.stopReason === STOP_REASONS.ERROR ? 'ERROR' : 'STOPPED';
    this.writeAudit('RUN_STOP', this.stopReason, {
      stop_reason: this.stopReason, emitted_event_count: this.eventCount, decision_count: this.decisions.length,
      ...(this.error ? { error: this.error } : {}),
    });
    await this.auditChain;
    this.writeFinalRegistry(status);
    const archiveError = await this.writeArchive();
    const finalStatus = archiveError ? 'ERROR' : status;
    if (archiveError) this.writeFinalRegistry(finalStatus, `archive: ${archiveError}`);
    const result = this.result(finalStatus, archiveError);
    logEvent({ event: 'live_run_end', ...result });
    return result;
  }

  /** The min_decisions guard, only for a run that reached its natural end. */
  finalGuard() {
    const failed = this.guards.checkFinal(this.decisions.length);
    if (!failed) return;
    this.writeAudit('GUARD_FAIL', failed.reason, { guard: failed.guard, value: failed.value, limit: failed.limit });
    logEvent({ event: 'promotion_guard_fail', live_run_id: this.id, ...failed });
    this.stopReason = STOP_REASONS.PROMOTION_GUARD_FAIL;
  }

  /** onEnd, bounded in time; its failure is logged, not fatal. */
  async endStrategy() {
    if (typeof this.strategy.onEnd !== 'function') return;
    try {
      await settleWithin(Promise.resolve(this.strategy.onEnd(this.ctx)), DRAIN_TIMEOUT_MS);
    } catch (err) {
      logError({ event: 'strategy_on_end_error', live_run_id: this.id, error: err.message });
    }
  }

  /**
   * @param {'STOPPED'|'ERROR'} status
   * @param {string|null} [error]
   */
  writeFinalRegistry(status, error = this.error) {
    try {
      this.registry.update(this.id, {
        status, stop_reason: this.stopReason, last_event_ts: this.lastEventTs, ws_connected: false,
        budget_pressure: this.budgets.pressure(this.budgetState()), error,
      });
    } catch (err) {
      logError({ event: 'live_registry_error', live_run_id: this.id, error: err.message });
    }
  }

  /** @returns {Promise<string|null>} the archive error, or null (also when archiving is off) */
  async writeArchive() {
    if (!this.archive) return null;
    try {
      await this.archive.write({
        replay_run_id: this.id, seed: this.seed, manifest_id: this.datasetMeta, parquet_path: this.datasetParquet,
        started_at: this.startedAt.toISOString(), finished_at: this.finishedAt.toISOString(), stop_reason: this.stopReason,
        decisions: this.decisions, stats: this.stats(),
      });
      return null;
    } catch (err) {
      const message = s3ErrorMessage(err);
      logError({ event: 'live_archive_error', live_run_id: this.id, error: message });
      return message;
    }
  }

  /** @returns {object} stats.json */
  stats() {
    const source = this.source?.stats || {};
    return {
      live_run_id: this.id, strategy_id: this.strategyId, exchange: this.exchange, symbols: this.symbols,
      stop_reason: this.stopReason, emitted_event_count: this.eventCount, decision_count: this.decisions.length,
      duration_ms: this.finishedAt.getTime() - this.startedAtMs, ordering_mode: this.orderingMode,
      execution_mode: this.executionMode, ordering_violation_count: this.orderingViolations,
      frame_count: source.frame_count ?? 0, junk_frame_count: source.junk_frame_count ?? 0,
      duplicate_frame_count: source.duplicate_frame_count ?? 0, oversize_frame_count: source.oversize_frame_count ?? 0,
      connect_count: source.connect_count ?? 0, reconnect_count: source.reconnect_count ?? 0,
      budget_pressure: this.budgets.pressure(this.budgetState()), ...this.guards.summary(),
    };
  }

  /**
   * @param {'STOPPED'|'ERROR'} status
   * @param {string|null} archiveError
   * @returns {object}
   */
  result(status, archiveError) {
    return {
      live_run_id: this.id, status, stop_reason: this.stopReason, error: archiveError ? `archive: ${archiveError}` : this.error,
      emitted_event_count: this.eventCount, decision_count: this.decisions.length,
      started_at: this.startedAt.toISOString(), finished_at: this.finishedAt.toISOString(),
      junk_frame_count: this.source?.stats?.junk_frame_count ?? 0,
    };
  }
}
