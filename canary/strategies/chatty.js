// Decides on every event: drives the decision-rate budget over its limit.
export default class ChattyStrategy {
  constructor(config = {}) {
    this.qty = Number(config.qty ?? 0.001);
    this.flip = false;
  }

  onEvent(event) {
    this.flip = !this.flip;
    return { symbol: event.symbol, side: this.flip ? 'BUY' : 'SELL', qty: this.qty };
  }
}
