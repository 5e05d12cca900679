// Binance USDⓈ-M futures market-data ingest (CONTRACT section 6): one combined-stream
// WebSocket for every symbol's bookTicker, aggTrade and markPrice@1s, parsed into the
// run's internal events, with QuantLab's declared reconnect policy.
import WsWebSocket from 'ws';
import { envBool } from '../lib/env.js';
import { RecentIds } from './RecentIds.js';

/** Hard-coded as in QuantLab; tests and the harness redirect it with a Node preload. */
export const BINANCE_FUTURES_WS = 'wss://fstream.binance.com';
export const EXCHANGE = 'binance';
export const LIVE_WS_DISABLED = 'CORE_LIVE_WS_DISABLED';

const STREAM_SUFFIXES = ['bookTicker', 'aggTrade', 'markPrice@1s'];
/** Binance frames are well under a kilobyte; anything this big is junk and is not even parsed. */
export const MAX_FRAME_BYTES = 1024 * 1024;

/** QuantLab's declared policy; every value can be overridden for tests. */
export const RECONNECT_DEFAULTS = Object.freeze({
  baseMs: 2000,
  maxMs: 60000,
  jitterRatio: 0.2,
  burstCount: 5,
  burstWindowMs: 60000,
  pauseMs: 120000,
  // Not part of QuantLab's declared policy: a handshake that never completes must not hang ingest.
  openTimeoutMs: 10000,
});

/**
 * The combined-stream URL for a list of symbols.
 * @param {string[]} symbols
 * @param {string} [base]
 * @returns {string}
 */
export function streamUrl(symbols, base = BINANCE_FUTURES_WS) {
  const names = [];
  for (const symbol of symbols) {
    const s = String(symbol).trim().toLowerCase();
    if (s) for (const suffix of STREAM_SUFFIXES) names.push(`${s}@${suffix}`);
  }
  return `${base}/stream?streams=${names.join('/')}`;
}

const DECIMAL = /^[-+]?\d+(\.\d+)?([eE][-+]?\d+)?$/;

/**
 * A price, quantity or rate: Binance sends them as decimal strings; anything else is a wrong type (NaN).
 * @param {unknown} value
 * @returns {number}
 */
function decimal(value) {
  return typeof value === 'string' && DECIMAL.test(value) ? Number(value) : Number.NaN;
}

/**
 * An event time in epoch milliseconds: Binance sends integers; anything else is a wrong type (NaN).
 * @param {unknown} value
 * @returns {number}
 */
function millis(value) {
  return Number.isSafeInteger(value) && value >= 0 ? value : Number.NaN;
}

/**
 * True when every value is a finite number.
 * @param {number[]} values
 * @returns {boolean}
 */
function allFinite(values) {
  return values.every((v) => Number.isFinite(v));
}

/** @param {object} d @param {object} base @returns {object[]} */
function bookTickerEvents(d, base) {
  const [bid, bidQty, ask, askQty, ts] = [decimal(d.b), decimal(d.B), decimal(d.a), decimal(d.A), millis(d.T)];
  if (!allFinite([bid, bidQty, ask, askQty, ts])) return [];
  return [{ ...base, ts_event: ts, stream: 'bbo', bid_price: bid, bid_qty: bidQty, ask_price: ask, ask_qty: askQty }];
}

/** @param {object} d @param {object} base @returns {object[]} */
function aggTradeEvents(d, base) {
  const [price, qty, ts] = [decimal(d.p), decimal(d.q), millis(d.T)];
  if (!allFinite([price, qty, ts]) || typeof d.m !== 'boolean') return [];
  // m = buyer is the maker, so the aggressor sold.
  return [{ ...base, ts_event: ts, stream: 'trade', price, qty, side: d.m ? 'SELL' : 'BUY', is_buyer_maker: d.m, trade_id: d.a ?? null }];
}

/** @param {object} d @param {object} base @returns {object[]} */
function markPriceEvents(d, base) {
  const [mark, index, rate, nextFunding, ts] = [decimal(d.p), decimal(d.i), decimal(d.r), millis(d.T), millis(d.E)];
  if (!allFinite([mark, index, rate, nextFunding, ts])) return [];
  return [
    { ...base, ts_event: ts, stream: 'mark_price', mark_price: mark, index_price: index },
    { ...base, ts_event: ts, stream: 'funding', funding_rate: rate, next_funding_time: nextFunding },
  ];
}

const PARSERS = { bookTicker: bookTickerEvents, aggTrade: aggTradeEvents, markPrice: markPriceEvents };
const EVENT_TYPES = { bookTicker: 'bookTicker', aggTrade: 'aggTrade', markPriceUpdate: 'markPrice' };
/** The exchange's own id of a frame, per kind: what makes a resent frame recognisable. */
const ID_FIELDS = { bookTicker: 'u', aggTrade: 'a', markPrice: 'E' };

/**
 * One combined-stream frame decoded: its internal events ([] for anything that is not a usable frame),
 * and the (symbol, stream) key and exchange id that identify it (id null when the frame carries none).
 * @param {string} text
 * @param {{now?:() => number}} [opts]
 * @returns {{events:object[], key:string|null, id:string|number|null}}
 */
export function decodeFrame(text, { now = Date.now } = {}) {
  const none = { events: [], key: null, id: null };
  let frame;
  try {
    frame = JSON.parse(text);
  } catch {
    return none;
  }
  if (!frame || typeof frame !== 'object' || typeof frame.stream !== 'string') return none;
  const data = frame.data;
  if (!data || typeof data !== 'object' || Array.isArray(data)) return none;
  const [streamSymbol, kindPart = ''] = frame.stream.split('@');
  // The stream name decides the kind; the payload's own type is the fallback.
  const kind = PARSERS[kindPart] ? kindPart : EVENT_TYPES[data.e];
  const symbol = String(typeof data.s === 'string' && data.s ? data.s : streamSymbol).toUpperCase();
  if (!kind || !symbol) return none;
  const events = PARSERS[kind](data, { ts_recv: now(), exchange: EXCHANGE, symbol });
  const rawId = data[ID_FIELDS[kind]];
  const id = (typeof rawId === 'number' && Number.isFinite(rawId)) || (typeof rawId === 'string' && rawId !== '') ? rawId : null;
  return { events, key: `${symbol}|${kind}`, id };
}

/**
 * Internal events from one combined-stream frame; [] for anything that is not a usable frame.
 * @param {string|Buffer} text
 * @param {{now?:() => number}} [opts]
 * @returns {object[]}
 */
export function parseFrame(text, { now = Date.now } = {}) {
  return decodeFrame(typeof text === 'string' ? text : String(text), { now }).events;
}

/**
 * Size of a message's payload: bytes, or for text its length (the same for the ASCII Binance sends).
 * @param {unknown} data
 * @returns {number}
 */
function messageSize(data) {
  if (typeof data === 'string') return data.length;
  if (Buffer.isBuffer(data) || data instanceof ArrayBuffer) return data.byteLength;
  return 0;
}

/**
 * Message data as text, or null for binary payloads (never valid frames).
 * @param {unknown} data
 * @returns {string|null}
 */
function messageText(data) {
  if (typeof data === 'string') return data;
  if (Buffer.isBuffer(data)) return data.toString('utf8');
  if (data instanceof ArrayBuffer) return Buffer.from(data).toString('utf8');
  return null;
}

/**
 * QuantLab's reconnect policy: 2 s doubling with jitter, capped at 60 s; the fifth reconnect
 * within 60 s is followed by a 120 s pause. The doubling restarts once a connection delivers data.
 */
export class ReconnectPolicy {
  /** @param {Partial<typeof RECONNECT_DEFAULTS> & {random?:() => number, now?:() => number}} [opts] */
  constructor(opts = {}) {
    this.opts = { ...RECONNECT_DEFAULTS, ...opts };
    this.random = opts.random || Math.random;
    this.now = opts.now || Date.now;
    this.attempt = 0;
    /** @type {number[]} times at which reconnects were scheduled */
    this.recent = [];
  }

  /**
   * The wait before the next reconnect.
   * @returns {{delayMs:number, paused:boolean, attempt:number}}
   */
  next() {
    const { baseMs, maxMs, jitterRatio, burstCount, burstWindowMs, pauseMs } = this.opts;
    const now = this.now();
    this.recent = this.recent.filter((t) => now - t < burstWindowMs);
    if (this.recent.length >= burstCount) {
      this.recent = [];
      this.attempt = 0;
      return { delayMs: pauseMs, paused: true, attempt: 0 };
    }
    const backoff = Math.min(maxMs, baseMs * 2 ** this.attempt);
    const delayMs = Math.min(maxMs, Math.round(backoff * (1 + jitterRatio * this.random())));
    this.attempt += 1;
    this.recent.push(now);
    return { delayMs, paused: false, attempt: this.attempt };
  }

  /** A healthy connection: the next drop starts again at the base delay. */
  reset() {
    this.attempt = 0;
  }
}

export class BinanceFuturesStream {
  /**
   * @param {{symbols:string[], onEvent:(event:object) => void, onStatus?:(status:object) => void,
   *   env?:Record<string,string|undefined>, url?:string, reconnect?:object, WebSocketImpl?:any,
   *   now?:() => number, maxFrameBytes?:number, dedupe?:{window?:number, maxKeys?:number}}} opts
   *   url and WebSocketImpl exist for unit tests; QuantLab always uses streamUrl(symbols).
   */
  constructor({ symbols, onEvent, onStatus = () => {}, env = process.env, url, reconnect = {}, WebSocketImpl, now = Date.now,
    maxFrameBytes = MAX_FRAME_BYTES, dedupe = {} }) {
    this.symbols = symbols;
    this.onEvent = onEvent;
    this.onStatus = onStatus;
    this.env = env;
    this.url = url || streamUrl(symbols);
    this.policy = new ReconnectPolicy({ ...reconnect, now: reconnect.now || now });
    this.openTimeoutMs = this.policy.opts.openTimeoutMs;
    this.WebSocketImpl = WebSocketImpl;
    this.now = now;
    this.socket = null;
    this.timer = null;
    this.stopped = false;
    this.gotData = false;
    this.maxFrameBytes = maxFrameBytes;
    // Frames seen lately, so a frame the exchange sends twice (same symbol, stream and id) counts once.
    this.recent = new RecentIds(dedupe);
    this.stats = {
      connect_count: 0, reconnect_count: 0, frame_count: 0, junk_frame_count: 0, event_count: 0,
      duplicate_frame_count: 0, oversize_frame_count: 0,
    };
  }

  /** Connect; throws Error('CORE_LIVE_WS_DISABLED') when live ingest is off. */
  start() {
    if (!envBool('CORE_LIVE_WS_ENABLED', false, this.env)) throw new Error(LIVE_WS_DISABLED);
    this.stopped = false;
    this.connect();
  }

  /** Close the socket at once (no close handshake to wait for) and cancel any reconnect. */
  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    this.timer = null;
    const socket = this.socket;
    this.socket = null;
    if (socket) closeNow(socket);
  }

  /** @returns {any} the WebSocket class: the runtime's global one when defined, else ws. */
  webSocketClass() {
    return this.WebSocketImpl || globalThis.WebSocket || WsWebSocket;
  }

  /** Open one connection and wire its events. */
  connect() {
    this.timer = null;
    if (this.stopped) return;
    const WebSocketClass = this.webSocketClass();
    let socket;
    try {
      socket = new WebSocketClass(this.url);
    } catch (err) {
      this.dropped(null, 'error', err?.message || String(err));
      return;
    }
    this.socket = socket;
    this.gotData = false;
    this.stats.connect_count += 1;
    const openTimer = setTimeout(() => this.dropped(socket, 'error', `no handshake within ${this.openTimeoutMs} ms`), this.openTimeoutMs);
    socket.addEventListener('open', () => {
      clearTimeout(openTimer);
      if (socket === this.socket) this.onStatus({ connected: true, url: this.url });
    });
    socket.addEventListener('message', (ev) => {
      if (socket === this.socket) this.handleMessage(ev.data);
    });
    socket.addEventListener('error', (ev) => {
      clearTimeout(openTimer);
      this.dropped(socket, 'error', ev?.error?.message || ev?.message || 'WebSocket error');
    });
    socket.addEventListener('close', (ev) => {
      clearTimeout(openTimer);
      this.dropped(socket, 'close', `code ${ev?.code ?? 'unknown'}`);
    });
  }

  /**
   * Parse one message and pass its events on; junk is counted and ignored, and so is a frame
   * already seen (same symbol, stream and exchange id).
   * @param {unknown} data
   */
  handleMessage(data) {
    this.stats.frame_count += 1;
    if (messageSize(data) > this.maxFrameBytes) {
      this.stats.oversize_frame_count += 1;
      this.stats.junk_frame_count += 1;
      return;
    }
    const text = messageText(data);
    const { events, key, id } = text === null ? { events: [], key: null, id: null } : decodeFrame(text, { now: this.now });
    if (events.length === 0) {
      this.stats.junk_frame_count += 1;
      return;
    }
    if (!this.gotData) {
      this.gotData = true;
      this.policy.reset();
    }
    if (id !== null && this.recent.seen(key, id)) {
      this.stats.duplicate_frame_count += 1;
      return;
    }
    for (const event of events) {
      this.stats.event_count += 1;
      this.onEvent(event);
    }
  }

  /**
   * A socket closed or failed: schedule one reconnect for it (error and close both arrive).
   * @param {any} socket null when the constructor itself threw
   * @param {'close'|'error'} kind
   * @param {string} detail
   */
  dropped(socket, kind, detail) {
    if (socket !== null && socket !== this.socket) return;
    this.socket = null;
    if (socket) closeNow(socket);
    if (this.stopped) return;
    const { delayMs, paused } = this.policy.next();
    this.stats.reconnect_count += 1;
    this.onStatus({ connected: false, reason: kind, detail, reconnect_in_ms: delayMs, paused });
    this.timer = setTimeout(() => this.connect(), delayMs);
  }
}

/**
 * Close a socket without waiting for the peer (ws has terminate(); the WHATWG API only close()).
 * @param {any} socket
 */
function closeNow(socket) {
  try {
    if (typeof socket.terminate === 'function') socket.terminate();
    else socket.close();
  } catch {
    // Already closed or never opened: nothing left to release.
  }
}
