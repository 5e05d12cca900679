// Run budgets (CONTRACT sections 2 and 6): max_duration, max_events and max_decision_rate.
// A budget is breached when its value goes over its limit; the run then stops with BUDGET_EXCEEDED.
import { envBool, envInt } from '../lib/env.js';

const RATE_WINDOW_MS = 60_000;

/**
 * LOW / MED / HIGH from the largest fraction of any budget used.
 * @param {number} fraction
 * @returns {'LOW'|'MED'|'HIGH'}
 */
export function pressureLevel(fraction) {
  if (fraction < 0.5) return 'LOW';
  if (fraction < 0.8) return 'MED';
  return 'HIGH';
}

export class RunBudgets {
  /**
   * @param {{enabled?:boolean, maxRunSeconds?:number, maxEvents?:number, maxDecisionsPerMin?:number,
   *   durationEnabled?:boolean, eventsEnabled?:boolean, rateEnabled?:boolean, windowMs?:number}} [opts]
   */
  constructor({
    enabled = true, maxRunSeconds = 3600, maxEvents = 1_000_000, maxDecisionsPerMin = 600,
    durationEnabled = true, eventsEnabled = true, rateEnabled = true, windowMs = RATE_WINDOW_MS,
  } = {}) {
    this.limits = { max_duration: maxRunSeconds, max_events: maxEvents, max_decision_rate: maxDecisionsPerMin };
    this.active = {
      max_duration: enabled && durationEnabled,
      max_events: enabled && eventsEnabled,
      max_decision_rate: enabled && rateEnabled,
    };
    this.windowMs = windowMs;
    /** @type {number[]} decision times (ms) inside the rate window */
    this.decisionTimes = [];
  }

  /**
   * Budgets from RUN_BUDGET* variables.
   * @param {Record<string,string|undefined>} [env]
   * @returns {RunBudgets}
   */
  static fromEnv(env = process.env) {
    return new RunBudgets({
      enabled: envBool('RUN_BUDGETS_ENABLED', true, env),
      maxRunSeconds: envInt('RUN_BUDGET_MAX_RUN_SECONDS', 3600, env),
      maxEvents: envInt('RUN_BUDGET_MAX_EVENTS', 1_000_000, env),
      maxDecisionsPerMin: envInt('RUN_BUDGET_MAX_DECISIONS_PER_MIN', 600, env),
      durationEnabled: envBool('RUN_BUDGET_MAX_DURATION_ENABLED', true, env),
      eventsEnabled: envBool('RUN_BUDGET_MAX_EVENTS_ENABLED', true, env),
      rateEnabled: envBool('RUN_BUDGET_MAX_DECISION_RATE_ENABLED', true, env),
    });
  }

  /** @param {number} nowMs when a decision was taken */
  noteDecision(nowMs) {
    this.decisionTimes.push(nowMs);
  }

  /**
   * Decisions taken in the last 60 s.
   * @param {number} nowMs
   * @returns {number}
   */
  decisionRate(nowMs) {
    const from = nowMs - this.windowMs;
    while (this.decisionTimes.length > 0 && this.decisionTimes[0] <= from) this.decisionTimes.shift();
    return this.decisionTimes.length;
  }

  /**
   * Current value of each budget.
   * @param {{eventCount:number, elapsedMs:number, nowMs:number}} state
   * @returns {{max_events:number, max_duration:number, max_decision_rate:number}}
   */
  values({ eventCount, elapsedMs, nowMs }) {
    return {
      max_events: eventCount,
      max_duration: Math.round(elapsedMs) / 1000,
      max_decision_rate: this.decisionRate(nowMs),
    };
  }

  /**
   * The first breached budget, or null.
   * @param {{eventCount:number, elapsedMs:number, nowMs:number}} state
   * @returns {null | {budget:string, value:number, limit:number, reason:string}}
   */
  check(state) {
    const values = this.values(state);
    for (const budget of ['max_events', 'max_duration', 'max_decision_rate']) {
      if (this.active[budget] && values[budget] > this.limits[budget]) {
        return { budget, value: values[budget], limit: this.limits[budget], reason: `${budget} ${values[budget]}` };
      }
    }
    return null;
  }

  /**
   * Pressure from the largest fraction used of any active budget (LOW when none is active).
   * @param {{eventCount:number, elapsedMs:number, nowMs:number}} state
   * @returns {'LOW'|'MED'|'HIGH'}
   */
  pressure(state) {
    const values = this.values(state);
    let highest = 0;
    for (const budget of Object.keys(this.limits)) {
      if (!this.active[budget]) continue;
      const limit = this.limits[budget];
      const fraction = limit > 0 ? values[budget] / limit : (values[budget] > 0 ? 1 : 0);
      highest = Math.max(highest, fraction);
    }
    return pressureLevel(highest);
  }

  /** @returns {object} limits and which are on, for logs and stats */
  describe() {
    return { limits: { ...this.limits }, active: { ...this.active } };
  }
}
