// A hostile exchange against the live ingest: frames sent twice (adjacent, later, across a
// reconnect), multi-megabyte frames, and the reconnect pause after a burst of drops, over a real
// WebSocket with scripted frames and injected timings.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { WebSocketServer } from 'ws';
import { BinanceFuturesStream, MAX_FRAME_BYTES, streamUrl } from '../core/live/BinanceFuturesStream.js';
import { RecentIds } from '../core/live/RecentIds.js';

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
    await new Promise((r) => setTimeout(r, 10));
  }
  throw new Error(`timed out waiting for ${what}`);
}

/**
 * A ws server on 127.0.0.1 that hands every new connection to onConnection(socket, index).
 * @param {(socket:any, index:number) => void} onConnection
 * @returns {Promise<{url:string, opened:number[], close:() => Promise<void>}>}
 */
async function scriptedExchange(onConnection) {
  const server = new WebSocketServer({ host: '127.0.0.1', port: 0 });
  await new Promise((resolve, reject) => {
    server.once('listening', resolve);
    server.once('error', reject);
  });
  const opened = [];
  server.on('connection', (socket) => {
    opened.push(Date.now());
    socket.on('error', () => {});
    onConnection(socket, opened.length - 1);
  });
  return {
    url: `ws://127.0.0.1:${server.address().port}`,
    opened,
    close: () => new Promise((resolve) => {
      for (const client of server.clients) client.terminate();
      server.close(() => resolve());
    }),
  };
}

const book = (u, T) => JSON.stringify({ stream: 'btcusdt@bookTicker', data: { e: 'bookTicker', u, s: 'BTCUSDT', b: '100.0', B: '1', a: '100.1', A: '2', T, E: T } });
const trade = (a, T) => JSON.stringify({ stream: 'btcusdt@aggTrade', data: { e: 'aggTrade', E: T, a, s: 'BTCUSDT', p: '100.0', q: '0.5', f: a, l: a, T, m: false } });
const mark = (E) => JSON.stringify({ stream: 'btcusdt@markPrice@1s', data: { e: 'markPriceUpdate', E, s: 'BTCUSDT', p: '100', i: '99.9', P: '100', r: '0.0001', T: 28_800_000 } });

/**
 * A stream reading `exchange`, collecting its events; stopped after the test.
 * @param {import('node:test').TestContext} t
 * @param {string} url
 * @param {object} [reconnect]
 */
function reader(t, url, reconnect = { baseMs: 50, maxMs: 200, jitterRatio: 0 }) {
  const events = [];
  const statuses = [];
  const stream = new BinanceFuturesStream({
    symbols: ['BTCUSDT'], env: { CORE_LIVE_WS_ENABLED: '1' }, url: streamUrl(['BTCUSDT'], url), reconnect,
    onEvent: (e) => events.push(e), onStatus: (s) => statuses.push({ ...s, at: Date.now() }),
  });
  t.after(() => stream.stop());
  stream.start();
  return { stream, events, statuses };
}

test('RecentIds: a repeated id is a duplicate within the window; keys are separate', () => {
  const ids = new RecentIds({ window: 3 });
  assert.equal(ids.seen('BTCUSDT|aggTrade', 1), false);
  assert.equal(ids.seen('BTCUSDT|aggTrade', 1), true);
  assert.equal(ids.seen('BTCUSDT|aggTrade', '1'), true, 'the id 1 and "1" are the same frame');
  assert.equal(ids.seen('ETHUSDT|aggTrade', 1), false, 'another symbol');
  assert.equal(ids.seen('BTCUSDT|bookTicker', 1), false, 'another stream');
  for (const id of [2, 3, 4]) assert.equal(ids.seen('BTCUSDT|aggTrade', id), false);
  assert.equal(ids.seen('BTCUSDT|aggTrade', 1), false, 'out of the window of 3: taken as new');
  assert.throws(() => new RecentIds({ window: 0 }), /positive integer/);
});

test('RecentIds: memory stays bounded whatever the feed sends', () => {
  const ids = new RecentIds({ window: 100, maxKeys: 10 });
  for (let i = 0; i < 100_000; i += 1) ids.seen(`S${i % 10}|aggTrade`, i);
  assert.equal(ids.size, 10 * 100, 'each key holds its window of ids, no more');
  for (let i = 0; i < 100_000; i += 1) ids.seen(`T${i % 50}|aggTrade`, i);
  assert.equal(ids.keys.size, 10, 'no more keys than maxKeys');
  assert.ok(ids.size <= 10 * 100);
  // The key used last is kept; the least recently used went first.
  assert.equal(ids.seen('T49|aggTrade', 99_999), true);
  assert.equal(ids.keys.has('S0|aggTrade'), false);
});

test('BinanceFuturesStream counts a frame sent twice once: adjacent, later, and after a reconnect', async (t) => {
  const exchange = await scriptedExchange((socket, index) => {
    if (index === 0) {
      for (const frame of [book(10, 1000), book(10, 1000), trade(7, 1001), mark(2000), mark(2000), book(11, 1002), trade(7, 1001)]) {
        socket.send(frame);
      }
      // Cut once the frames are out, with no close frame: the next connection resends some of them.
      setTimeout(() => socket.terminate(), 100);
    } else {
      for (const frame of [book(11, 1002), trade(7, 1001), trade(8, 1003), mark(3000)]) socket.send(frame);
    }
  });
  t.after(() => exchange.close());
  const { stream, events } = reader(t, exchange.url);
  await waitUntil(() => stream.stats.frame_count >= 11, 5000, 'both connections\' frames');
  const seen = events.map((e) => `${e.stream}:${e.ts_event}`);
  // Distinct frames: book 10, trade 7, mark 2000 (two events), book 11, trade 8, mark 3000 (two events).
  assert.deepEqual(seen, ['bbo:1000', 'trade:1001', 'mark_price:2000', 'funding:2000', 'bbo:1002',
    'trade:1003', 'mark_price:3000', 'funding:3000']);
  assert.equal(stream.stats.duplicate_frame_count, 5);
  assert.equal(stream.stats.connect_count, 2);
});

test('BinanceFuturesStream skips a multi-megabyte frame without parsing it and keeps reading', async (t) => {
  const huge = `{"stream":"btcusdt@bookTicker","data":{"e":"bookTicker","u":99,"pad":"${'x'.repeat(4 * MAX_FRAME_BYTES)}"}}`;
  const hugeValid = JSON.stringify({ stream: 'btcusdt@aggTrade', data: { ...JSON.parse(trade(50, 1)).data, pad: 'y'.repeat(2 * MAX_FRAME_BYTES) } });
  const exchange = await scriptedExchange((socket) => {
    socket.send(book(1, 1000));
    socket.send(huge);
    socket.send(hugeValid);
    socket.send(Buffer.alloc(2 * MAX_FRAME_BYTES, 0x7b), { binary: true });
    socket.send(book(2, 1001));
  });
  t.after(() => exchange.close());
  const { stream, events } = reader(t, exchange.url);
  await waitUntil(() => stream.stats.frame_count >= 5, 10_000, 'five frames');
  assert.deepEqual(events.map((e) => e.ts_event), [1000, 1001]);
  assert.equal(stream.stats.oversize_frame_count, 3);
  assert.equal(stream.stats.junk_frame_count, 3);
  assert.equal(stream.stats.connect_count, 1, 'a huge frame does not cost the connection');
});

test('BinanceFuturesStream: five reconnects within the window are followed by the pause (injected timings)', async (t) => {
  const exchange = await scriptedExchange((socket) => socket.terminate());
  t.after(() => exchange.close());
  // QuantLab's policy shrunk 100x: base 20 ms doubling to 160 ms; the 6th reconnect waits the 600 ms pause.
  const reconnect = { baseMs: 20, maxMs: 160, jitterRatio: 0, burstCount: 5, burstWindowMs: 60_000, pauseMs: 600 };
  const { statuses } = reader(t, exchange.url, reconnect);
  const drops = () => statuses.filter((s) => !s.connected);
  await waitUntil(() => exchange.opened.length >= 7 && drops().length >= 7, 10_000, 'seven connections dropped');
  const waits = drops().map((s) => [s.reconnect_in_ms, s.paused]);
  assert.deepEqual(waits.slice(0, 7), [[20, false], [40, false], [80, false], [160, false], [160, false], [600, true], [20, false]]);
  // Timers never fire early, so the gaps between connections are at least the waits (a busy machine only adds).
  const gaps = exchange.opened.slice(1, 7).map((at, i) => at - exchange.opened[i]);
  waits.slice(0, 6).forEach(([wait], i) => assert.ok(gaps[i] >= wait - 5, `gap ${i + 1} is ${gaps[i]} ms, the wait ${wait} ms`));
});
