// Loses on purpose: buys, then sells at the next price that is lower, over and over, so realised PnL falls
// step after step and the loss-streak (and, with a big size, the max-loss) promotion guard fires.
export default class LosingStrategy {
  constructor(config = {}) {
    this.qty = Number(config.qty ?? 1);
    this.entry = new Map();
  }

  onEvent(event) {
    const price = priceOf(event);
    if (price === null) return null;
    const entry = this.entry.get(event.symbol);
    if (entry === undefined) {
      this.entry.set(event.symbol, price);
      return { symbol: event.symbol, side: 'BUY', qty: this.qty };
    }
    if (price < entry) {
      this.entry.delete(event.symbol);
      return { symbol: event.symbol, side: 'SELL', qty: this.qty };
    }
    return null;
  }
}

function priceOf(event) {
  for (const key of ['price', 'mid', 'mark_price', 'bid']) {
    const value = Number(event[key]);
    if (Number.isFinite(value) && value > 0) return value;
  }
  if (Number.isFinite(Number(event.bid_price)) && Number.isFinite(Number(event.ask_price))) {
    return (Number(event.bid_price) + Number(event.ask_price)) / 2;
  }
  return null;
}
