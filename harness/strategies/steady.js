// A calm strategy for canaries. It decides once on the first event of each symbol (so the archived decisions
// prove every requested symbol fed the run), then on every Nth event, alternating a small BUY and SELL, never
// faster than one decision per min_interval_ms, so budgets and guards stay quiet on a healthy feed.
export default class SteadyStrategy {
  constructor(config = {}) {
    this.every = Number(config.every ?? 2);
    this.qty = Number(config.qty ?? 0.001);
    this.minIntervalMs = Number(config.min_interval_ms ?? 200);
    this.seen = 0;
    this.lastAt = 0;
    this.long = new Map();
  }

  onEvent(event) {
    this.seen += 1;
    const first = !this.long.has(event.symbol);
    const now = Date.now();
    if (!first && (this.seen % this.every !== 0 || now - this.lastAt < this.minIntervalMs)) return null;
    this.lastAt = now;
    const holding = this.long.get(event.symbol) ?? false;
    this.long.set(event.symbol, !holding);
    return { symbol: event.symbol, side: holding ? 'SELL' : 'BUY', qty: this.qty };
  }
}
