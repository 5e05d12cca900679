// Loses on purpose, so the loss-streak (and, with a big size, the max-loss) promotion guard fires. It pays the
// spread over and over: it buys on a trade at the ask (above the book's mid) and sells on the next trade at the
// bid (below the mid). A run fills decisions at the last trade's price, so each round trip loses the spread, and the
// market's wandering cannot save it for long (a random walk has no drift; the spread is paid every time).
// Without a book (no bbo yet) a trade's side is told by the tick rule: a higher price than the last trade is at
// the ask, a lower one at the bid.
// (It used to buy on any price and sell when a mid or mark price fell below the entry: a mid is not the price the
// run fills at, so those sells realised gains or nothing, and a rising market held the lot without a loss; a soak
// found a run ending STREAM_END with no guard fired.)
export default class LosingStrategy {
  constructor(config = {}) {
    this.qty = Number(config.qty ?? 1);
    this.mid = new Map();
    this.lastTrade = new Map();
    this.holding = new Set();
  }

  onEvent(event) {
    const symbol = event.symbol;
    if (event.stream === 'bbo') {
      const mid = (Number(event.bid_price) + Number(event.ask_price)) / 2;
      if (Number.isFinite(mid) && mid > 0) this.mid.set(symbol, mid);
      return null;
    }
    if (event.stream !== 'trade') return null;
    const price = Number(event.price);
    const previous = this.lastTrade.get(symbol);
    this.lastTrade.set(symbol, price);
    const reference = this.mid.get(symbol) ?? previous;
    if (!Number.isFinite(price) || reference === undefined || price === reference) return null;
    if (!this.holding.has(symbol) && price > reference) {
      this.holding.add(symbol);
      return { symbol, side: 'BUY', qty: this.qty };
    }
    if (this.holding.has(symbol) && price < reference) {
      this.holding.delete(symbol);
      return { symbol, side: 'SELL', qty: this.qty };
    }
    return null;
  }
}
