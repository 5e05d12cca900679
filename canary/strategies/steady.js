// A calm strategy for canaries and recovery runs: healthy on any honest feed.
// - It decides on the first event of each symbol at once (so the archived decisions prove every requested
//   symbol fed the run), then once per min_interval_ms (default 120 ms) of exchange time (the events' ts_event,
//   so a starved process that handles a backlog in one burst still decides as often as the feed covered), so a
//   2 s run clears the min_decisions guard with room to spare and stays below the decision-rate budget
//   (at most 500 a minute against the default 600).
// - It buys a small lot and sells it again, but never closes two losing trades without a winning one between
//   them (the guard's streak counts falling realised-PnL steps across symbols and carries over break-even exits),
//   so the loss-streak guard cannot fire by chance; prices come from ctx.price() when the runtime offers it, else the last trade,
//   mid or mark price of the event stream.
export default class SteadyStrategy {
  constructor(config = {}) {
    this.qty = Number(config.qty ?? 0.001);
    this.minIntervalMs = Number(config.min_interval_ms ?? 120);
    this.clock = -Infinity;
    this.lastAt = -Infinity;
    this.lots = new Map();
    this.prices = new Map();
    this.seen = new Set();
    this.lastExitLost = false;
  }

  price(event, ctx) {
    const fromCtx = typeof ctx?.price === 'function' ? ctx.price(event.symbol) : null;
    if (fromCtx !== null && fromCtx !== undefined && Number.isFinite(Number(fromCtx))) return Number(fromCtx);
    const p = this.prices.get(event.symbol) || {};
    if (event.stream === 'trade') p.trade = Number(event.price);
    else if (event.stream === 'bbo') p.mid = (Number(event.bid_price) + Number(event.ask_price)) / 2;
    else if (event.stream === 'mark_price') p.mark = Number(event.mark_price);
    this.prices.set(event.symbol, p);
    const value = p.trade ?? p.mid ?? p.mark;
    return Number.isFinite(value) ? value : null;
  }

  onEvent(event, ctx) {
    const price = this.price(event, ctx);
    const first = !this.seen.has(event.symbol);
    this.seen.add(event.symbol);
    const stamp = Number(event.ts_event);
    this.clock = Math.max(this.clock, Number.isFinite(stamp) && stamp > 0 ? stamp : Date.now());
    const now = this.clock;
    if (price === null || (!first && now - this.lastAt < this.minIntervalMs)) return null;
    this.lastAt = now;
    const symbol = event.symbol;
    const lot = this.lots.get(symbol) || { qty: 0, avg: 0 };
    // An exit counts as a win only when it clearly beats the entry: a break-even exit may realise a rounding-sized
    // loss in the target's fill engine, and the guard's streak carries over it, so it is treated like a loss.
    const clearlyWinning = price > lot.avg * (1 + 1e-9);
    if (!first && lot.qty > 0 && (clearlyWinning || !this.lastExitLost)) {
      this.lastExitLost = !clearlyWinning;
      this.lots.delete(symbol);
      return { symbol, side: 'SELL', qty: lot.qty };
    }
    // Like the fill engine: opening from flat takes the price as is.
    lot.avg = lot.qty === 0 ? price : (lot.qty * lot.avg + this.qty * price) / (lot.qty + this.qty);
    lot.qty += this.qty;
    this.lots.set(symbol, lot);
    return { symbol, side: 'BUY', qty: this.qty };
  }
}
