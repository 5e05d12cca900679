// Promotion guards (CONTRACT sections 2 and 6) and the simulated fills they judge.
// Execution mode "mock": no order leaves; each decision fills at the symbol's last price.
import { envBool, envInt } from '../lib/env.js';

export class PaperBook {
  constructor() {
    /** @type {Map<string, {trade?:number, mid?:number, mark?:number}>} */
    this.prices = new Map();
    /** @type {Map<string, {qty:number, avg:number}>} */
    this.positions = new Map();
    this.realised = 0;
  }

  /** @param {object} event an internal event: remembers the latest trade, mid and mark price */
  observe(event) {
    const p = this.prices.get(event.symbol) || {};
    if (event.stream === 'trade') p.trade = event.price;
    else if (event.stream === 'bbo') p.mid = (event.bid_price + event.ask_price) / 2;
    else if (event.stream === 'mark_price') p.mark = event.mark_price;
    this.prices.set(event.symbol, p);
  }

  /**
   * The fill price for a symbol: last trade, else mid, else mark; null before any price.
   * @param {string} symbol
   * @returns {number|null}
   */
  price(symbol) {
    const p = this.prices.get(symbol);
    if (!p) return null;
    return p.trade ?? p.mid ?? p.mark ?? null;
  }

  /**
   * @param {string} symbol
   * @returns {{qty:number, avg:number}} signed quantity and average entry price
   */
  position(symbol) {
    return { ...(this.positions.get(symbol) || { qty: 0, avg: 0 }) };
  }

  /**
   * Simulate a fill; returns it with the realised PnL it produced, or null without a price.
   * @param {{symbol:string, side:'BUY'|'SELL', qty:number}} decision
   * @returns {{price:number, realisedDelta:number} | null}
   */
  fill({ symbol, side, qty }) {
    const price = this.price(symbol);
    if (price === null) return null;
    const pos = this.position(symbol);
    const signed = side === 'BUY' ? qty : -qty;
    let realisedDelta = 0;
    if (pos.qty !== 0 && Math.sign(pos.qty) !== Math.sign(signed)) {
      // Reducing (or flipping) a position realises PnL on the closed part.
      const closed = Math.min(Math.abs(signed), Math.abs(pos.qty));
      realisedDelta = closed * (price - pos.avg) * Math.sign(pos.qty);
      const remaining = pos.qty + signed;
      pos.avg = Math.sign(remaining) === Math.sign(pos.qty) ? pos.avg : price;
      pos.qty = remaining;
    } else {
      // Opening from flat takes the price as is: (0 * avg + q * p) / q is not always p in floating point, and a
      // break-even exit would then realise a tiny loss.
      pos.avg = pos.qty === 0 ? price : (pos.qty * pos.avg + signed * price) / (pos.qty + signed);
      pos.qty += signed;
    }
    if (Math.abs(pos.qty) < 1e-12) pos.qty = 0;
    if (pos.qty === 0) pos.avg = 0;
    this.positions.set(symbol, pos);
    this.realised += realisedDelta;
    return { price, realisedDelta };
  }

  /** @returns {number} PnL of the open positions at the current prices */
  unrealised() {
    let total = 0;
    for (const [symbol, pos] of this.positions) {
      const price = this.price(symbol);
      if (pos.qty !== 0 && price !== null) total += pos.qty * (price - pos.avg);
    }
    return total;
  }
}

/**
 * Round PnL for logs and reasons (floating noise is not information).
 * @param {number} value
 * @returns {number}
 */
function roundPnl(value) {
  return Math.round(value * 1e8) / 1e8;
}

export class PromotionGuards {
  /**
   * @param {{enabled?:boolean, minDecisions?:number, maxLoss?:number, lossStreak?:number,
   *   minDecisionsEnabled?:boolean, maxLossEnabled?:boolean, lossStreakEnabled?:boolean}} [opts]
   */
  constructor({
    enabled = true, minDecisions = 10, maxLoss = 100, lossStreak = 3,
    minDecisionsEnabled = true, maxLossEnabled = true, lossStreakEnabled = true,
  } = {}) {
    this.limits = { min_decisions: minDecisions, max_loss: maxLoss, loss_streak: lossStreak };
    this.active = {
      min_decisions: enabled && minDecisionsEnabled,
      max_loss: enabled && maxLossEnabled,
      loss_streak: enabled && lossStreakEnabled,
    };
    this.book = new PaperBook();
    this.streak = 0;
  }

  /**
   * Guards from PROMOTION_GUARD* variables.
   * @param {Record<string,string|undefined>} [env]
   * @returns {PromotionGuards}
   */
  static fromEnv(env = process.env) {
    return new PromotionGuards({
      enabled: envBool('PROMOTION_GUARDS_ENABLED', true, env),
      minDecisions: envInt('PROMOTION_GUARD_MIN_DECISIONS', 10, env),
      maxLoss: envInt('PROMOTION_GUARD_MAX_LOSS', 100, env),
      lossStreak: envInt('PROMOTION_GUARD_LOSS_STREAK', 3, env),
      minDecisionsEnabled: envBool('PROMOTION_GUARD_MIN_DECISIONS_ENABLED', true, env),
      maxLossEnabled: envBool('PROMOTION_GUARD_MAX_LOSS_ENABLED', true, env),
      lossStreakEnabled: envBool('PROMOTION_GUARD_LOSS_STREAK_ENABLED', true, env),
    });
  }

  /** @param {object} event */
  observe(event) {
    this.book.observe(event);
  }

  /**
   * Simulate a decision's fill and follow the realised-PnL streak: a falling step extends it,
   * a rising one ends it, fills that realise nothing leave it alone.
   * @param {{symbol:string, side:'BUY'|'SELL', qty:number}} decision
   * @returns {{price:number, realisedDelta:number} | null}
   */
  fill(decision) {
    const result = this.book.fill(decision);
    if (result && result.realisedDelta < 0) this.streak += 1;
    else if (result && result.realisedDelta > 0) this.streak = 0;
    return result;
  }

  /** @returns {number} realised + unrealised PnL */
  pnl() {
    return this.book.realised + this.book.unrealised();
  }

  /**
   * Per-event guards: max_loss, then loss_streak.
   * @returns {null | {guard:string, value:number, limit:number, reason:string}}
   */
  checkEvent() {
    const pnl = roundPnl(this.pnl());
    if (this.active.max_loss && pnl < -this.limits.max_loss) {
      return { guard: 'max_loss', value: pnl, limit: this.limits.max_loss, reason: `max_loss ${pnl}` };
    }
    if (this.active.loss_streak && this.streak >= this.limits.loss_streak) {
      return { guard: 'loss_streak', value: this.streak, limit: this.limits.loss_streak, reason: `loss_streak ${this.streak}` };
    }
    return null;
  }

  /**
   * The final guard, run when a run reaches its natural end.
   * @param {number} decisionCount
   * @returns {null | {guard:string, value:number, limit:number, reason:string}}
   */
  checkFinal(decisionCount) {
    if (this.active.min_decisions && decisionCount < this.limits.min_decisions) {
      return { guard: 'min_decisions', value: decisionCount, limit: this.limits.min_decisions, reason: `min_decisions ${decisionCount}` };
    }
    return null;
  }

  /** @returns {{realised_pnl:number, unrealised_pnl:number, loss_streak:number}} */
  summary() {
    return { realised_pnl: roundPnl(this.book.realised), unrealised_pnl: roundPnl(this.book.unrealised()), loss_streak: this.streak };
  }
}
