// Preload for `NODE_OPTIONS=--import=<this file>`: sends a target's hard-coded exchange URLs to local
// endpoints without touching the target's files. The map comes from QUANTLAB_CHAOS_URL_MAP, a JSON object
// of URL prefix -> replacement prefix, e.g. {"wss://fstream.binance.com": "ws://127.0.0.1:41234"}.
// It covers code that uses globalThis.WebSocket and code that uses the `ws` package (ESM import or require).
import { createRequire } from 'node:module';

const MAP_ENV = 'QUANTLAB_CHAOS_URL_MAP';
const DEBUG_ENV = 'QUANTLAB_CHAOS_PRELOAD_DEBUG';
const WS_CLASS_FILE = /[\\/]node_modules[\\/]ws[\\/]lib[\\/]websocket\.js$/;
const PATCHED = Symbol.for('quantlab.chaos.redirected');

function readMap() {
  const raw = process.env[MAP_ENV];
  if (!raw) return [];
  let parsed;
  try {
    parsed = JSON.parse(raw);
  } catch (err) {
    process.stderr.write(`[quantlab-chaos preload] ${MAP_ENV} is not valid JSON (${err.message}); no URL is redirected\n`);
    return [];
  }
  // Longest prefix first, so a specific mapping wins over a general one.
  return Object.entries(parsed)
    .filter(([from, to]) => typeof from === 'string' && typeof to === 'string' && from)
    .sort((a, b) => b[0].length - a[0].length);
}

// Read on each use (cached per value), so a process may set the map after start-up, as tests do.
let cachedRaw;
let cachedMap = [];
function currentMap() {
  const raw = process.env[MAP_ENV];
  if (raw !== cachedRaw) {
    cachedRaw = raw;
    cachedMap = readMap();
  }
  return cachedMap;
}

/** Returns the address with the first matching prefix replaced; other values pass through unchanged. */
export function rewriteUrl(address) {
  if (address === null || address === undefined) return address;
  const text = address instanceof URL ? address.href : String(address);
  for (const [from, to] of currentMap()) {
    if (text === from || text.startsWith(from.endsWith('/') ? from : `${from}/`) || text.startsWith(`${from}?`)) {
      const rewritten = to + text.slice(from.length);
      if (process.env[DEBUG_ENV]) process.stderr.write(`[quantlab-chaos preload] ${text} -> ${rewritten}\n`);
      return address instanceof URL ? new URL(rewritten) : rewritten;
    }
  }
  return address;
}

/** A subclass of a WebSocket class whose constructor rewrites the address; statics are inherited. */
function redirecting(WebSocketClass) {
  if (typeof WebSocketClass !== 'function' || WebSocketClass[PATCHED]) return WebSocketClass;
  class RedirectedWebSocket extends WebSocketClass {
    constructor(address, ...rest) {
      super(rewriteUrl(address), ...rest);
    }
  }
  Object.defineProperty(RedirectedWebSocket, 'name', { value: WebSocketClass.name });
  Object.defineProperty(RedirectedWebSocket, PATCHED, { value: true });
  return RedirectedWebSocket;
}

function patchGlobalWebSocket() {
  if (typeof globalThis.WebSocket === 'function') globalThis.WebSocket = redirecting(globalThis.WebSocket);
}

// Both `import WebSocket from 'ws'` (through ws's ESM wrapper) and `require('ws')` compile ws/lib/websocket.js
// through the CommonJS loader's `.js` handler, so replacing that module's exports right after it is compiled
// covers every import style and every copy of ws in the target's node_modules.
function patchWsPackage() {
  const Module = createRequire(import.meta.url)('node:module');
  const compileJs = Module._extensions['.js'];
  Module._extensions['.js'] = function compileWithRedirect(module, filename) {
    compileJs.call(this, module, filename);
    if (WS_CLASS_FILE.test(filename) && typeof module.exports === 'function') {
      module.exports = redirecting(module.exports);
    }
  };
}

if (process.env[MAP_ENV] !== undefined) {
  patchGlobalWebSocket();
  patchWsPackage();
}
