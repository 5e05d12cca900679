// In-process tests of the live modules: frame parsing, reconnect policy, budgets, guards,
// strategy loading, the mock stream and LiveRun's ordering and stop rules.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { AuditWriter } from '../core/audit/AuditWriter.js';
import { LocalArchiveWriter } from '../core/archive/RunArchiveWriter.js';
import { BinanceFuturesStream, parseFrame, ReconnectPolicy, streamUrl } from '../core/live/BinanceFuturesStream.js';
import { LiveRun } from '../core/live/LiveRun.js';
import { mockEvents } from '../core/live/MockStream.js';
import { PromotionGuards } from '../core/live/PromotionGuards.js';
import { RunBudgets } from '../core/live/RunBudgets.js';
import { loadStrategy } from '../core/live/strategyLoader.js';
import { RunRegistry } from '../core/state/RunRegistry.js';
import { startExchange } from './helpers/exchange.js';
import { TWIN_ROOT } from './helpers/proc.js';

/** @returns {string} a fresh temp dir removed after the test */
function tempDir(t) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ql-live-unit-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/**
 * Poll until probe() is truthy or the deadline passes.
 * @param {() => unknown} probe
 * @param {number} timeoutMs
 * @param {string} what
 */
async function waitUntil(probe, timeoutMs, what) {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (probe()) return;
    await new Promise((r) => setTimeout(r, 20));
  }
  throw new Error(`timed out waiting for ${what}`);
}

test('streamUrl lists bookTicker, aggTrade and markPrice@1s per lower-cased symbol', () => {
  assert.equal(
    streamUrl(['BTCUSDT', 'EthUsdt']),
    'wss://fstream.binance.com/stream?streams=btcusdt@bookTicker/btcusdt@aggTrade/btcusdt@markPrice@1s/'
      + 'ethusdt@bookTicker/ethusdt@aggTrade/ethusdt@markPrice@1s',
  );
});

test('parseFrame turns combined frames into bbo, trade, mark_price and funding events', () => {
  const now = () => 123;
  const [bbo] = parseFrame(JSON.stringify({ stream: 'btcusdt@bookTicker', data: { e: 'bookTicker', s: 'BTCUSDT', b: '100.5', B: '2', a: '100.7', A: '3', T: 10 } }), { now });
  assert.deepEqual(bbo, { ts_recv: 123, exchange: 'binance', symbol: 'BTCUSDT', ts_event: 10, stream: 'bbo', bid_price: 100.5, bid_qty: 2, ask_price: 100.7, ask_qty: 3 });
  const [trade] = parseFrame(JSON.stringify({ stream: 'ethusdt@aggTrade', data: { p: '3000.1', q: '0.5', m: true, a: 77, T: 11 } }), { now });
  assert.equal(trade.stream, 'trade');
  assert.equal(trade.symbol, 'ETHUSDT');
  assert.equal(trade.price, 3000.1);
  assert.equal(trade.side, 'SELL');
  assert.equal(trade.trade_id, 77);
  const events = parseFrame(JSON.stringify({ stream: 'btcusdt@markPrice@1s', data: { e: 'markPriceUpdate', s: 'BTCUSDT', p: '101', i: '100', r: '0.0001', T: 28800000, E: 12 } }), { now });
  assert.deepEqual(events.map((e) => [e.stream, e.ts_event]), [['mark_price', 12], ['funding', 12]]);
  assert.equal(events[0].mark_price, 101);
  assert.equal(events[1].funding_rate, 0.0001);
  assert.equal(events[1].next_funding_time, 28800000);
});

test('parseFrame ignores junk', () => {
  for (const junk of ['not json', '[]', 'null', '{"result":null,"id":1}', '{"stream":"btcusdt@bookTicker"}',
    '{"data":{"b":"1"}}', '{"stream":"btcusdt@bookTicker","data":{"b":"x","B":"1","a":"1","A":"1","T":1}}',
    '{"stream":"btcusdt@aggTrade","data":{"p":"1","q":"1","a":1,"T":1}}', '{"stream":"btcusdt@depth","data":{}}',
    // Wrong types: Binance sends prices as strings and times as integers.
    '{"stream":"btcusdt@aggTrade","data":{"p":65000.1,"q":"1","m":true,"a":1,"T":1}}',
    '{"stream":"btcusdt@bookTicker","data":{"b":"1","B":"1","a":"1","A":"1","T":"1"}}',
    '{"stream":"btcusdt@markPrice@1s","data":{"p":"1","i":null,"r":"0.0001","T":1,"E":1}}']) {
    assert.deepEqual(parseFrame(junk), [], junk);
  }
});

test('reconnect policy: 2 s doubling with jitter, capped at 60 s', () => {
  const low = new ReconnectPolicy({ random: () => 0, now: () => 0, burstCount: 1000 });
  assert.deepEqual(Array.from({ length: 7 }, () => low.next().delayMs), [2000, 4000, 8000, 16000, 32000, 60000, 60000]);
  low.reset();
  assert.equal(low.next().delayMs, 2000);
  const high = new ReconnectPolicy({ random: () => 0.999, now: () => 0, burstCount: 1000 });
  const first = high.next().delayMs;
  assert.ok(first > 2000 && first <= 2400, `jittered first delay ${first}`);
  for (let i = 0; i < 6; i += 1) high.next();
  assert.equal(high.next().delayMs, 60000);
});

test('reconnect policy: five reconnects within 60 s pause it for 120 s', () => {
  let now = 0;
  const policy = new ReconnectPolicy({ random: () => 0, now: () => now });
  for (let i = 0; i < 5; i += 1) {
    policy.reset();
    assert.equal(policy.next().paused, false);
    now += 1000;
  }
  assert.deepEqual(policy.next(), { delayMs: 120000, paused: true, attempt: 0 });
  // Spread-out reconnects never pause.
  const spread = new ReconnectPolicy({ random: () => 0, now: () => now });
  for (let i = 0; i < 10; i += 1) {
    spread.reset();
    assert.equal(spread.next().paused, false);
    now += 20000;
  }
});

test('BinanceFuturesStream refuses to start when CORE_LIVE_WS_ENABLED is off', () => {
  for (const value of [undefined, '', '0', 'no', 'off']) {
    const stream = new BinanceFuturesStream({ symbols: ['BTCUSDT'], onEvent: () => {}, env: { CORE_LIVE_WS_ENABLED: value } });
    assert.throws(() => stream.start(), { message: 'CORE_LIVE_WS_DISABLED' });
  }
});

test('BinanceFuturesStream reads a real WebSocket, counts junk and backs off after drops', async (t) => {
  const exchange = await startExchange({ rate: 100, junkEvery: 4 });
  t.after(() => exchange.close());
  const events = [];
  const statuses = [];
  const stream = new BinanceFuturesStream({
    symbols: ['BTCUSDT', 'ETHUSDT'], env: { CORE_LIVE_WS_ENABLED: 'true' },
    url: streamUrl(['BTCUSDT', 'ETHUSDT'], exchange.url),
    reconnect: { baseMs: 100, maxMs: 1000, jitterRatio: 0 },
    onEvent: (e) => events.push(e), onStatus: (s) => statuses.push({ ...s, at: Date.now() }),
  });
  t.after(() => stream.stop());
  stream.start();
  await waitUntil(() => events.length >= 20 && stream.stats.junk_frame_count >= 3, 5000, 'events and junk');
  assert.deepEqual(exchange.connections[0].streams.slice(0, 3), ['btcusdt@bookTicker', 'btcusdt@aggTrade', 'btcusdt@markPrice@1s']);
  assert.ok(events.every((e) => ['bbo', 'trade', 'mark_price', 'funding'].includes(e.stream)));
  assert.ok(statuses[0].connected);

  // Connections that die before any data double the wait: 100, 200, 400 ms.
  exchange.options.dropOnConnect = true;
  exchange.dropAll();
  await waitUntil(() => exchange.connections.length >= 4, 5000, 'three reconnects');
  const opened = exchange.connections.map((c) => c.openedAt);
  const gaps = [opened[2] - opened[1], opened[3] - opened[2]];
  assert.ok(gaps[0] >= 180 && gaps[0] < 600, `second gap ${gaps[0]}`);
  assert.ok(gaps[1] >= 380 && gaps[1] < 1000, `third gap ${gaps[1]}`);
  const drops = statuses.filter((s) => !s.connected).map((s) => s.reconnect_in_ms);
  assert.deepEqual(drops.slice(0, 3), [100, 200, 400]);
});

test('RunBudgets: the 6th event breaches max_events 5; budgets can be turned off', () => {
  const budgets = RunBudgets.fromEnv({ RUN_BUDGET_MAX_EVENTS: '5' });
  const state = (eventCount) => ({ eventCount, elapsedMs: 10, nowMs: 1000 });
  assert.equal(budgets.check(state(5)), null);
  assert.deepEqual(budgets.check(state(6)), { budget: 'max_events', value: 6, limit: 5, reason: 'max_events 6' });
  assert.equal(RunBudgets.fromEnv({ RUN_BUDGET_MAX_EVENTS: '5', RUN_BUDGETS_ENABLED: '0' }).check(state(6)), null);
  assert.equal(RunBudgets.fromEnv({ RUN_BUDGET_MAX_EVENTS: '5', RUN_BUDGET_MAX_EVENTS_ENABLED: 'no' }).check(state(6)), null);
});

test('RunBudgets: max_duration and max_decision_rate (decisions in the last 60 s)', () => {
  const budgets = RunBudgets.fromEnv({ RUN_BUDGET_MAX_RUN_SECONDS: '2', RUN_BUDGET_MAX_DECISIONS_PER_MIN: '3' });
  assert.equal(budgets.check({ eventCount: 1, elapsedMs: 2000, nowMs: 0 }), null);
  assert.equal(budgets.check({ eventCount: 1, elapsedMs: 2500, nowMs: 0 }).reason, 'max_duration 2.5');
  for (const at of [0, 10_000, 20_000, 30_000]) budgets.noteDecision(at);
  assert.deepEqual(budgets.check({ eventCount: 1, elapsedMs: 0, nowMs: 30_000 }),
    { budget: 'max_decision_rate', value: 4, limit: 3, reason: 'max_decision_rate 4' });
  assert.equal(budgets.check({ eventCount: 1, elapsedMs: 0, nowMs: 60_001 }), null, 'the first decision left the window');
  const off = RunBudgets.fromEnv({ RUN_BUDGET_MAX_RUN_SECONDS: '2', RUN_BUDGET_MAX_DURATION_ENABLED: '0' });
  assert.equal(off.check({ eventCount: 1, elapsedMs: 9000, nowMs: 0 }), null);
});

test('RunBudgets pressure: LOW below half, MED below 0.8, HIGH above', () => {
  const budgets = RunBudgets.fromEnv({ RUN_BUDGET_MAX_EVENTS: '100' });
  const at = (eventCount) => budgets.pressure({ eventCount, elapsedMs: 0, nowMs: 0 });
  assert.deepEqual([at(10), at(49), at(50), at(79), at(80), at(120)], ['LOW', 'LOW', 'MED', 'MED', 'HIGH', 'HIGH']);
  assert.equal(RunBudgets.fromEnv({ RUN_BUDGET_MAX_EVENTS: '100', RUN_BUDGETS_ENABLED: '0' }).pressure({ eventCount: 99, elapsedMs: 0, nowMs: 0 }), 'LOW');
});

/**
 * @param {PromotionGuards} guards
 * @param {number} price
 */
function tradeAt(guards, price) {
  guards.observe({ symbol: 'BTCUSDT', stream: 'trade', price });
}

test('PromotionGuards: loss_streak counts falling realised-PnL steps in a row', () => {
  const guards = PromotionGuards.fromEnv({ PROMOTION_GUARD_LOSS_STREAK: '2' });
  const roundTrip = (buy, sell) => {
    tradeAt(guards, buy);
    guards.fill({ symbol: 'BTCUSDT', side: 'BUY', qty: 1 });
    tradeAt(guards, sell);
    guards.fill({ symbol: 'BTCUSDT', side: 'SELL', qty: 1 });
  };
  roundTrip(100, 99);
  assert.equal(guards.checkEvent(), null);
  roundTrip(100, 101);
  roundTrip(100, 99);
  assert.equal(guards.checkEvent(), null, 'a winning step ended the streak');
  roundTrip(100, 98);
  assert.deepEqual(guards.checkEvent(), { guard: 'loss_streak', value: 2, limit: 2, reason: 'loss_streak 2' });
  assert.equal(guards.summary().realised_pnl, -3);
});

test('PromotionGuards: max_loss counts unrealised PnL; min_decisions is final; each can be off', () => {
  const guards = PromotionGuards.fromEnv({ PROMOTION_GUARD_MAX_LOSS: '10' });
  tradeAt(guards, 100);
  guards.fill({ symbol: 'BTCUSDT', side: 'BUY', qty: 2 });
  tradeAt(guards, 95);
  assert.equal(guards.checkEvent(), null, 'exactly -10 is not below -10');
  tradeAt(guards, 94);
  assert.deepEqual(guards.checkEvent(), { guard: 'max_loss', value: -12, limit: 10, reason: 'max_loss -12' });
  assert.deepEqual(guards.checkFinal(9), { guard: 'min_decisions', value: 9, limit: 10, reason: 'min_decisions 9' });
  assert.equal(guards.checkFinal(10), null);
  const off = PromotionGuards.fromEnv({ PROMOTION_GUARD_MAX_LOSS: '10', PROMOTION_GUARD_MAX_LOSS_ENABLED: '0', PROMOTION_GUARDS_ENABLED: '1' });
  tradeAt(off, 100);
  off.fill({ symbol: 'BTCUSDT', side: 'BUY', qty: 2 });
  tradeAt(off, 1);
  assert.equal(off.checkEvent(), null);
  assert.equal(PromotionGuards.fromEnv({ PROMOTION_GUARDS_ENABLED: 'false' }).checkFinal(0), null);
});

test('strategyLoader: default export, named *Strategy export, and clear errors', async (t) => {
  const dir = tempDir(t);
  const named = path.join(dir, 'named.mjs');
  fs.writeFileSync(named, 'export const helper = 1;\nexport class MeanStrategy { constructor(c) { this.c = c; } onEvent() { return null; } }\n');
  const loaded = await loadStrategy(named, { config: { qty: 2 } });
  assert.equal(loaded.strategyId, 'named');
  assert.deepEqual(loaded.strategy.c, { qty: 2 });
  const canary = await loadStrategy(path.join(TWIN_ROOT, 'strategies', 'canary-strategy.js'));
  assert.equal(canary.strategyId, 'canary-strategy');
  const none = path.join(dir, 'none.mjs');
  fs.writeFileSync(none, 'export const x = 1;\n');
  await assert.rejects(loadStrategy(none), /no default export or export ending in "Strategy"/);
  const noHandler = path.join(dir, 'nohandler.mjs');
  fs.writeFileSync(noHandler, 'export default class { }\n');
  await assert.rejects(loadStrategy(noHandler), /has no onEvent/);
  await assert.rejects(loadStrategy(path.join(dir, 'missing.js')), /Strategy file not found/);
});

test('mock events: 20, deterministic for a seed, in order per symbol and stream', () => {
  const a = mockEvents({ symbols: ['BTCUSDT', 'ETHUSDT'], seed: 7, startMs: 1000 });
  const b = mockEvents({ symbols: ['BTCUSDT', 'ETHUSDT'], seed: 7, startMs: 1000 });
  const c = mockEvents({ symbols: ['BTCUSDT', 'ETHUSDT'], seed: 8, startMs: 1000 });
  assert.equal(a.length, 20);
  assert.deepEqual(a, b);
  assert.notDeepEqual(a, c);
  assert.deepEqual(new Set(a.map((e) => e.stream)), new Set(['bbo', 'trade', 'mark_price']));
});

/**
 * A LiveRun wired to real local collaborators and a scripted event source.
 * @param {import('node:test').TestContext} t
 * @param {{events:object[], orderingMode?:string, strategy?:object, env?:object}} opts
 */
function scriptedRun(t, { events, orderingMode = 'STRICT', strategy = { onEvent: () => null }, env = {} }) {
  const dir = tempDir(t);
  const registry = new RunRegistry({ dir: path.join(dir, 'state') });
  const run = new LiveRun({
    symbols: ['BTCUSDT'], strategy, strategyId: 'scripted', orderingMode, registry,
    audit: new AuditWriter({ spoolDir: path.join(dir, 'audit') }),
    archive: new LocalArchiveWriter({ dir: path.join(dir, 'archive') }),
    budgets: RunBudgets.fromEnv(env), guards: PromotionGuards.fromEnv({ PROMOTION_GUARDS_ENABLED: '0', ...env }),
    sourceFactory: ({ onEvent, onEnd }) => ({
      start: () => setImmediate(() => { for (const e of events) onEvent(e); onEnd(); }),
      stop: () => {},
    }),
  });
  return { run, registry, dir };
}

const ev = (stream, ts) => ({ symbol: 'BTCUSDT', stream, ts_event: ts, ts_recv: ts, price: 100, bid_price: 99, ask_price: 101, mark_price: 100 });

test('LiveRun STRICT: streams interleave freely, but time going back within one stream is an ERROR', async (t) => {
  const interleaved = scriptedRun(t, { events: [ev('bbo', 10), ev('trade', 5), ev('mark_price', 7), ev('bbo', 10), ev('trade', 6)] });
  const ok = await interleaved.run.run();
  assert.equal(ok.stop_reason, 'STREAM_END');
  assert.equal(ok.emitted_event_count, 5);

  const back = scriptedRun(t, { events: [ev('bbo', 10), ev('trade', 11), ev('bbo', 9), ev('bbo', 12)] });
  const failed = await back.run.run();
  assert.equal(failed.stop_reason, 'ERROR');
  assert.equal(failed.status, 'ERROR');
  assert.match(failed.error, /ORDERING_VIOLATION BTCUSDT bbo/);
  assert.equal(back.registry.get(failed.live_run_id).status, 'ERROR');

  const warn = scriptedRun(t, { events: [ev('bbo', 10), ev('bbo', 9), ev('bbo', 12)], orderingMode: 'WARN' });
  const warned = await warn.run.run();
  assert.equal(warned.stop_reason, 'STREAM_END');
  assert.equal(warned.emitted_event_count, 3);
});

test('LiveRun: a budget breach stays the final stop reason; a bad decision ends the run as ERROR', async (t) => {
  const events = Array.from({ length: 30 }, (_, i) => ev('trade', i));
  const buyer = { onEvent: () => ({ side: 'BUY', qty: 1 }) };
  // min_decisions would fail at a natural end; the budget stop must not be replaced by it.
  const env = { RUN_BUDGET_MAX_EVENTS: '5', PROMOTION_GUARDS_ENABLED: '1', PROMOTION_GUARD_MIN_DECISIONS: '1000' };
  const { run, registry, dir } = scriptedRun(t, { events, strategy: buyer, env });
  const result = await run.run();
  assert.equal(result.stop_reason, 'BUDGET_EXCEEDED');
  assert.equal(result.emitted_event_count, 6);
  assert.equal(result.decision_count, 5);
  assert.equal(registry.get(result.live_run_id).stop_reason, 'BUDGET_EXCEEDED');
  const manifest = JSON.parse(fs.readFileSync(path.join(dir, 'archive', 'replay_runs', `replay_run_id=${result.live_run_id}`, 'manifest.json'), 'utf8'));
  assert.equal(manifest.stop_reason, 'BUDGET_EXCEEDED');

  const bad = scriptedRun(t, { events, strategy: { onEvent: () => ({ side: 'HOLD', qty: 1 }) } });
  const badResult = await bad.run.run();
  assert.equal(badResult.stop_reason, 'ERROR');
  assert.match(badResult.error, /invalid decision/);
});
