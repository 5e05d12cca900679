// Example strategy for the canary: trades a tiny size often enough to pass the min_decisions guard
// in a few seconds, and is built never to trip the money guards by chance.
//
// It decides on every `every`-th event (default 2) but at most once per `min_interval_ms` of receive
// time (default 200 ms, so at most 300 decisions a minute, half the default rate budget), alternating
// BUY and SELL per symbol. An exit that does not clearly win is not taken while the last exit (of any symbol) did
// not clearly win either (it buys one more lot instead), so losses are never realised back to back: the
// loss_streak guard counts falling realised-PnL steps across symbols, and a break-even exit ends no streak.

const DEFAULTS = { every: 2, qty: 0.001, min_interval_ms: 200 };

export default class CanaryStrategy {
  /** @param {{every?:number, qty?:number, min_interval_ms?:number}} [config] --strategy-config */
  constructor(config = {}) {
    this.config = { ...DEFAULTS, ...config };
    this.seen = 0;
    this.lastDecisionTs = -Infinity;
    /** @type {Map<string, {qty:number, avg:number}>} per-symbol open lot */
    this.books = new Map();
    /** whether the last exit that realised anything lost (any symbol: the guard's streak is per run) */
    this.lastExitLost = false;
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
   * BUY when flat; SELL the whole lot, unless that would be a second exit in a row that does not clearly win:
   * then BUY one more lot instead (a decision all the same, so the run keeps clearing min_decisions).
   * @param {string} symbol
   * @param {number} price
   * @returns {{symbol:string, side:'BUY'|'SELL', qty:number}}
   */
  decide(symbol, price) {
    const book = this.books.get(symbol) || { qty: 0, avg: 0 };
    this.books.set(symbol, book);
    // Only an exit that clearly beats the entry counts as a win: a break-even one may realise a rounding-sized
    // loss in the fill engine, and the guard's streak carries over it.
    const clearlyWinning = price > book.avg * (1 + 1e-9);
    if (book.qty > 0 && (clearlyWinning || !this.lastExitLost)) {
      this.lastExitLost = !clearlyWinning;
      const qty = book.qty;
      book.qty = 0;
      book.avg = 0;
      return { symbol, side: 'SELL', qty };
    }
    // Averaged like the fill engine does; opening from flat takes the price as is.
    book.avg = book.qty === 0 ? price : (book.qty * book.avg + this.config.qty * price) / (book.qty + this.config.qty);
    book.qty += this.config.qty;
    return { symbol, side: 'BUY', qty: this.config.qty };
  }
}
