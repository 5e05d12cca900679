// The canary's --mock source: 20 synthetic Binance-like events from a seed, no network.
import { EXCHANGE } from './BinanceFuturesStream.js';

export const MOCK_EVENT_COUNT = 20;
const KINDS = ['bbo', 'trade', 'mark_price'];
const BASE_PRICES = { BTCUSDT: 60000, ETHUSDT: 3000 };
// Synthetic exchange time advances this much per event, so time-based strategy logic sees a live-like pace.
const EVENT_SPACING_MS = 250;

/**
 * A small deterministic PRNG (mulberry32) so one seed always gives the same events.
 * @param {number} seed
 * @returns {() => number} uniform in [0, 1)
 */
export function seededRandom(seed) {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/**
 * A numeric seed from a --seed value (numbers are used as given, text is hashed).
 * @param {unknown} seed
 * @returns {number}
 */
export function seedNumber(seed) {
  if (seed === null || seed === undefined || seed === '') return 1;
  const n = Number(seed);
  if (Number.isFinite(n)) return Math.trunc(n);
  let hash = 2166136261;
  for (const ch of String(seed)) hash = Math.imul(hash ^ ch.codePointAt(0), 16777619);
  return hash >>> 0;
}

/**
 * One synthetic event of a kind at a price.
 * @param {string} kind
 * @param {{symbol:string, price:number, ts:number, index:number}} at
 * @returns {object}
 */
function syntheticEvent(kind, { symbol, price, ts, index }) {
  const base = { ts_event: ts, ts_recv: ts, exchange: EXCHANGE, symbol, stream: kind };
  const spread = price * 0.0001;
  if (kind === 'bbo') {
    return { ...base, bid_price: price - spread / 2, bid_qty: 1, ask_price: price + spread / 2, ask_qty: 1 };
  }
  if (kind === 'trade') return { ...base, price, qty: 0.01, side: index % 2 ? 'SELL' : 'BUY', is_buyer_maker: index % 2 === 1, trade_id: index };
  return { ...base, mark_price: price, index_price: price };
}

/**
 * The synthetic events. Prices only drift upwards, so the canary strategy never realises a loss on them.
 * @param {{symbols:string[], seed?:unknown, count?:number, startMs?:number}} opts
 * @returns {object[]}
 */
export function mockEvents({ symbols, seed, count = MOCK_EVENT_COUNT, startMs = Date.now() }) {
  const random = seededRandom(seedNumber(seed));
  const prices = new Map(symbols.map((s) => [s, BASE_PRICES[s] ?? 100]));
  const events = [];
  for (let i = 0; i < count; i += 1) {
    const symbol = symbols[i % symbols.length];
    const kind = KINDS[Math.floor(i / symbols.length) % KINDS.length];
    const price = prices.get(symbol) * (1 + random() * 0.0002);
    prices.set(symbol, price);
    events.push(syntheticEvent(kind, { symbol, price: Number(price.toFixed(2)), ts: startMs + i * EVENT_SPACING_MS, index: i }));
  }
  return events;
}

export class MockStream {
  /**
   * @param {{symbols:string[], seed?:unknown, onEvent:(e:object) => void, onStatus?:(s:object) => void,
   *   onEnd?:() => void, count?:number, intervalMs?:number}} opts
   */
  constructor({ symbols, seed, onEvent, onStatus = () => {}, onEnd = () => {}, count = MOCK_EVENT_COUNT, intervalMs = 20 }) {
    this.events = mockEvents({ symbols, seed, count });
    this.onEvent = onEvent;
    this.onStatus = onStatus;
    this.onEnd = onEnd;
    this.intervalMs = intervalMs;
    this.timer = null;
    this.next = 0;
    this.stats = { connect_count: 1, reconnect_count: 0, frame_count: 0, junk_frame_count: 0, event_count: 0 };
  }

  /** Emit the events one every intervalMs, then call onEnd. */
  start() {
    this.onStatus({ connected: true, url: 'mock' });
    this.timer = setInterval(() => this.emitNext(), this.intervalMs);
  }

  /** Emit one event, or finish. */
  emitNext() {
    if (this.next >= this.events.length) {
      this.stop();
      this.onEnd();
      return;
    }
    // ts_recv stays the synthetic time, so time-based strategy logic sees the live-like pace.
    const event = { ...this.events[this.next] };
    this.next += 1;
    this.stats.frame_count += 1;
    this.stats.event_count += 1;
    this.onEvent(event);
  }

  stop() {
    clearInterval(this.timer);
    this.timer = null;
  }
}
