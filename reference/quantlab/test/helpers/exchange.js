// A local stand-in for Binance USDⓈ-M futures market streams, for the twin's live tests: a real
// `ws` server on 127.0.0.1 (port from the OS) that serves /stream?streams=... with combined-stream
// frames at a set rate and records every connection.
import { WebSocketServer } from 'ws';

const JUNK = [
  'not json at all',
  '{"result":null,"id":1}',
  '{"stream":"btcusdt@bookTicker"}',
  '{"stream":"btcusdt@bookTicker","data":{"b":"oops","B":"1","a":"1","A":"1","T":1}}',
  '{"stream":"btcusdt@depth","data":{"e":"depthUpdate"}}',
];

/**
 * Price formatted the way Binance sends it: a decimal string.
 * @param {number} value
 * @returns {string}
 */
function priceText(value) {
  return value.toFixed(2);
}

/**
 * One Binance-shaped payload for a stream name such as "btcusdt@aggTrade".
 * @param {string} stream
 * @param {number} price
 * @param {number} ts
 * @param {number} seq
 * @returns {object}
 */
function payload(stream, price, ts, seq) {
  const [lower, kind] = stream.split('@');
  const s = lower.toUpperCase();
  if (kind === 'bookTicker') {
    return { e: 'bookTicker', u: seq, s, b: priceText(price - 0.05), B: '1.500', a: priceText(price + 0.05), A: '2.250', T: ts, E: ts };
  }
  if (kind === 'aggTrade') {
    return { e: 'aggTrade', E: ts, a: seq, s, p: priceText(price), q: '0.010', f: seq, l: seq, T: ts, m: seq % 2 === 0 };
  }
  const nextFunding = Math.ceil((ts + 1) / 28_800_000) * 28_800_000;
  return { e: 'markPriceUpdate', E: ts, s, p: priceText(price), P: priceText(price), i: priceText(price - 0.5), r: '0.00010000', T: nextFunding };
}

/**
 * The stream names a connection asked for, or null when the path is not /stream?streams=....
 * @param {string} url request path and query
 * @returns {string[]|null}
 */
function requestedStreams(url) {
  const parsed = new URL(url, 'ws://127.0.0.1');
  if (parsed.pathname !== '/stream') return null;
  const streams = (parsed.searchParams.get('streams') || '').split('/').filter(Boolean);
  return streams.length > 0 ? streams : null;
}

/**
 * Start the fake exchange.
 * @param {{rate?:number, junkEvery?:number, dropOnConnect?:boolean, backInTimeAt?:number}} [opts]
 *   rate: frames a second per connection; junkEvery: every n-th frame is junk (0: none);
 *   dropOnConnect: accept, then cut each connection at once; backInTimeAt: the n-th frame of a connection
 *   is a bookTicker whose T goes back one second.
 * @returns {Promise<{url:string, port:number, connections:object[], frames:{sent:number, junk:number},
 *   options:object, dropAll:() => void, close:() => Promise<void>}>}
 */
export async function startExchange({ rate = 20, junkEvery = 0, dropOnConnect = false, backInTimeAt = 0 } = {}) {
  const options = { rate, junkEvery, dropOnConnect, backInTimeAt };
  const server = new WebSocketServer({ host: '127.0.0.1', port: 0 });
  await new Promise((resolve, reject) => {
    server.once('listening', resolve);
    server.once('error', reject);
  });
  const connections = [];
  const frames = { sent: 0, junk: 0 };
  const prices = new Map();
  let seq = 0;

  server.on('connection', (socket, req) => {
    const streams = requestedStreams(req.url);
    const record = { path: req.url, streams, openedAt: Date.now(), closedAt: null, framesSent: 0 };
    connections.push(record);
    socket.on('close', () => { record.closedAt = Date.now(); });
    socket.on('error', () => {});
    if (!streams) {
      socket.close(1008, 'expected /stream?streams=...');
      return;
    }
    if (options.dropOnConnect) {
      socket.terminate();
      return;
    }
    let lastTs = 0;
    const timer = setInterval(() => {
      if (socket.readyState !== socket.OPEN) return;
      record.framesSent += 1;
      frames.sent += 1;
      if (options.junkEvery > 0 && record.framesSent % options.junkEvery === 0) {
        frames.junk += 1;
        socket.send(JUNK[frames.junk % JUNK.length]);
        return;
      }
      seq += 1;
      const goBack = options.backInTimeAt > 0 && record.framesSent === options.backInTimeAt;
      const stream = goBack ? streams.find((s) => s.endsWith('@bookTicker')) || streams[0] : streams[seq % streams.length];
      const symbol = stream.split('@')[0];
      // A slow drift with noise, so fills see real price changes.
      const price = (prices.get(symbol) ?? (symbol.startsWith('btc') ? 60000 : 3000)) * (1 + (Math.random() - 0.5) * 0.0004);
      prices.set(symbol, price);
      lastTs = Math.max(lastTs + 1, Date.now());
      const ts = goBack ? lastTs - 1000 : lastTs;
      socket.send(JSON.stringify({ stream, data: payload(stream, price, ts, seq) }));
    }, Math.max(1, Math.round(1000 / options.rate)));
    socket.on('close', () => clearInterval(timer));
  });

  const { port } = server.address();
  return {
    url: `ws://127.0.0.1:${port}`,
    port,
    connections,
    frames,
    options,
    dropAll: () => {
      for (const client of server.clients) client.terminate();
    },
    close: () => new Promise((resolve) => {
      for (const client of server.clients) client.terminate();
      server.close(() => resolve());
    }),
  };
}

/**
 * The env that sends QuantLab's hard-coded Binance URL to this exchange (the harness's own preload).
 * @param {string} url the exchange's ws:// base URL
 * @param {string} preload absolute path of harness/fakes/node/preload.mjs
 * @returns {Record<string,string>}
 */
export function redirectEnv(url, preload) {
  return {
    NODE_OPTIONS: `--import=${preload}`,
    QUANTLAB_CHAOS_URL_MAP: JSON.stringify({ 'wss://fstream.binance.com': url }),
  };
}
