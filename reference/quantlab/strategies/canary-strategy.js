// Example strategy for the canary: trades a tiny size often enough to pass the min_decisions guard
// in a few seconds, and is built never to trip the money guards by chance.
//
// It decides on every `every`-th event (default 2) but at most once per `min_interval_ms` of receive
// time (default 200 ms, so at most 300 decisions a minute, half the default rate budget), alternating
// BUY and SELL per symbol. A SELL that would realise a loss is held back when the previous exit of that
// symbol already lost, so it never realises two losses in a row (the loss_streak guard default is 3).

const DEFAULTS = { every: 2, qty: 0.001, min_interval_ms: 200 };

export default class CanaryStrategy {
  /** @param {{every?:number, qty?:number, min_interval_ms?:number}} [config] --strategy-config */
  constructor(config = {}) {
    this.config = { ...DEFAULTS, ...config };
    this.seen = 0;
    this.lastDecisionTs = -Infinity;
    /** @type {Map<string, {entry:number|null, lastExitLost:boolean}>} per-symbol round-trip state */
    this.books = new Map();
  }

  /**
   * @param {object} event internal event {ts_event, ts_recv, symbol, stream, ...}
   * @param {{price:(symbol:string) => number|null}} ctx
   * @returns {{symbol:string, side:'BUY'|'SELL', qty:number} | null}
   */
  onEvent(event, ctx) {
    this.seen += 1;
    if (this.seen % this.config.every !== 0) return null;
    // Receive time, not exchange time: a feed's timestamps may repeat or lag, the clock does not.
    const at = event.ts_recv ?? event.ts_event;
    if (at - this.lastDecisionTs < this.config.min_interval_ms) return null;
    const price = ctx.price(event.symbol);
    if (price === null || price === undefined) return null;
    const decision = this.decide(event.symbol, price);
    if (decision) this.lastDecisionTs = at;
    return decision;
  }

  /**
   * BUY when flat; SELL the open lot unless that would be a second losing exit in a row.
   * @param {string} symbol
   * @param {number} price
   * @returns {{symbol:string, side:'BUY'|'SELL', qty:number} | null}
   */
  decide(symbol, price) {
    const book = this.books.get(symbol) || { entry: null, lastExitLost: false };
    this.books.set(symbol, book);
    if (book.entry === null) {
      book.entry = price;
      return { symbol, side: 'BUY', qty: this.config.qty };
    }
    const losing = price < book.entry;
    if (losing && book.lastExitLost) return null;
    book.lastExitLost = losing;
    book.entry = null;
    return { symbol, side: 'SELL', qty: this.config.qty };
  }
}
