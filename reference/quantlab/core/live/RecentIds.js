// Duplicate detection for exchange frames with bounded memory: the last `window` ids of each
// (symbol, stream) key, and at most `maxKeys` keys (the least recently used key is forgotten first).
// An id older than the window is taken as new: exchanges repeat frames close together (a resend
// around a reconnect, a relay sending twice), and memory must stay flat whatever the feed sends.

export const DEFAULT_WINDOW = 1024;
export const DEFAULT_MAX_KEYS = 256;

export class RecentIds {
  /** @param {{window?:number, maxKeys?:number}} [opts] */
  constructor({ window = DEFAULT_WINDOW, maxKeys = DEFAULT_MAX_KEYS } = {}) {
    if (!(Number.isInteger(window) && window > 0) || !(Number.isInteger(maxKeys) && maxKeys > 0)) {
      throw new Error(`RecentIds needs a positive integer window and maxKeys (got ${window}, ${maxKeys}).`);
    }
    this.window = window;
    this.maxKeys = maxKeys;
    /** @type {Map<string, {seen:Set<string>, ring:string[], next:number}>} in least-recently-used order */
    this.keys = new Map();
  }

  /**
   * Remember `id` under `key`; true when it was already among the key's recent ids (a duplicate).
   * @param {string} key e.g. 'BTCUSDT|aggTrade'
   * @param {string|number} id the exchange's id of the frame
   * @returns {boolean}
   */
  seen(key, id) {
    const text = String(id);
    let entry = this.keys.get(key);
    if (entry) {
      // Re-insert so the Map's order stays least recently used first.
      this.keys.delete(key);
      this.keys.set(key, entry);
      if (entry.seen.has(text)) return true;
    } else {
      entry = { seen: new Set(), ring: [], next: 0 };
      this.keys.set(key, entry);
      if (this.keys.size > this.maxKeys) this.keys.delete(this.keys.keys().next().value);
    }
    if (entry.ring.length < this.window) {
      entry.ring.push(text);
    } else {
      entry.seen.delete(entry.ring[entry.next]);
      entry.ring[entry.next] = text;
      entry.next = (entry.next + 1) % this.window;
    }
    entry.seen.add(text);
    return false;
  }

  /** @returns {number} ids held across all keys (for tests of the memory bound) */
  get size() {
    let total = 0;
    for (const entry of this.keys.values()) total += entry.seen.size;
    return total;
  }
}
