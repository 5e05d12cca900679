// A calm strategy for canaries: on every Nth event it alternates a small BUY and SELL on the event's symbol,
// never faster than one decision per minIntervalMs, so budgets and guards stay quiet on a healthy feed.
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
    const now = Date.now();
    if (this.seen % this.every !== 0 || now - this.lastAt < this.minIntervalMs) return null;
    this.lastAt = now;
    const holding = this.long.get(event.symbol) ?? false;
    this.long.set(event.symbol, !holding);
    return { symbol: event.symbol, side: holding ? 'SELL' : 'BUY', qty: this.qty };
  }
}
