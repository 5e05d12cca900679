"""The harness's strategies do what the scenarios rely on, by chance never: steady never trips a money guard, and
losing always trips one within seconds. Soaks found both failing now and then (a live run stopped by a guard; a
losing run ending STREAM_END).

Each strategy is driven, in Node, through the twin's own promotion guards (fills at the last trade, else mid, else
mark) on seeded markets shaped like the fake exchange's: the bid walks a tick up or down, the ask is one or two
ticks above, trades print at the bid or the ask, mark prices sit near the mid.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from harness.target import PROJECT_ROOT

STRATEGIES = PROJECT_ROOT / "canary" / "strategies"
GUARDS = PROJECT_ROOT / "reference" / "quantlab" / "core" / "live" / "PromotionGuards.js"
SCRIPT = """
const [guardsUrl, strategyUrl, config, runs, events, flat] = process.argv.slice(1);
const { PromotionGuards } = await import(guardsUrl);
const { default: Strategy } = await import(strategyUrl);
const result = { runs: 0, tripped: 0, untripped: [], exits: 0, breakEven: 0, worstStreak: 0 };
for (let seed = 1; seed <= Number(runs); seed++) {
  let x = seed;
  const rnd = () => { x = (x * 1103515245 + 12345) % 2147483648; return x / 2147483648; };
  const guards = new PromotionGuards({});
  const strategy = new Strategy(JSON.parse(config));
  const tick = { BTCUSDT: 0.1, ETHUSDT: 0.01 };
  const bid = { BTCUSDT: 65000, ETHUSDT: 3200 };
  const ask = { BTCUSDT: 65000.1, ETHUSDT: 3200.01 };
  let tripped = null;
  result.runs += 1;
  for (let i = 0; i < Number(events) && !tripped; i++) {
    const symbol = rnd() < 0.5 ? 'BTCUSDT' : 'ETHUSDT';
    const r = rnd();
    let event;
    if (r < 0.45) {
      const move = rnd();
      if (move < 0.15) bid[symbol] -= tick[symbol]; else if (move < 0.3) bid[symbol] += tick[symbol];
      // flat=1: a market with no spread, where many exits break even (the guard's streak carries over those)
      ask[symbol] = bid[symbol] + (flat === '1' ? 0 : (rnd() < 0.8 ? 1 : 2) * tick[symbol]);
      event = { symbol, stream: 'bbo', bid_price: bid[symbol], ask_price: ask[symbol] };
    } else if (r < 0.9) {
      event = { symbol, stream: 'trade', price: rnd() < 0.5 ? bid[symbol] : ask[symbol] };
    } else {
      event = { symbol, stream: 'mark_price', mark_price: (bid[symbol] + ask[symbol]) / 2 + (rnd() - 0.5) * tick[symbol] };
    }
    event.ts_event = event.ts_recv = 1000 + i * 25;
    guards.observe(event);
    const decision = strategy.onEvent(event, { price: (s) => guards.book.price(s) });
    if (decision) {
      const fill = guards.fill(decision);
      if (decision.side === 'SELL') { result.exits += 1; if (fill.realisedDelta === 0) result.breakEven += 1; }
      result.worstStreak = Math.max(result.worstStreak, guards.streak);
    }
    tripped = guards.checkEvent();
  }
  if (tripped) result.tripped += 1; else result.untripped.push(seed);
}
console.log(JSON.stringify(result));
"""


def simulate(strategy: Path, *, config: dict[str, Any] | None = None, runs: int = 300, events: int = 176,
             flat: bool = False) -> dict[str, Any]:
    """176 events: what a 4 s canary run got from the fake exchange in a soak."""
    done = subprocess.run(
        ["node", "--input-type=module", "-e", SCRIPT, GUARDS.as_uri(), strategy.as_uri(), json.dumps(config or {}),
         str(runs), str(events), "1" if flat else "0"],
        capture_output=True, text=True, timeout=60, cwd=PROJECT_ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_steady_never_trips_a_guard_even_when_exits_break_even() -> None:
    for flat in (False, True):
        result = simulate(STRATEGIES / "steady.js", events=600, flat=flat)  # a 30 s live run
        assert result["exits"] > 5_000, result
        assert result["tripped"] == 0 and result["worstStreak"] <= 1, result
    assert result["breakEven"] > 1_000, "the flat market no longer makes break-even exits"


def test_steady_as_it_was_fails_the_same_check(tmp_path: Path) -> None:
    """The check can fail: a steady that exits whatever the last exit did trips the streak."""
    naive = tmp_path / "steady_before.mjs"
    naive.write_text((STRATEGIES / "steady.js").read_text().replace(
        "(clearlyWinning || !this.lastExitLost)", "(true)"))
    assert naive.read_text() != (STRATEGIES / "steady.js").read_text()
    assert simulate(naive, events=600, flat=True)["tripped"] > 0


def test_losing_always_trips_a_guard_within_a_short_run() -> None:
    result = simulate(STRATEGIES / "losing.js", config={"qty": 20_000}, runs=1000)
    assert result["untripped"] == [], result


def test_a_strategy_that_does_not_lose_is_reported_untripped() -> None:
    """The same market and guards leave a harmless strategy alone: 'tripped' is not the simulator's default."""
    result = simulate(STRATEGIES / "steady.js", runs=50)
    assert result["tripped"] == 0 and len(result["untripped"]) == 50


def test_the_twins_live_unit_strategy_never_trips_a_guard() -> None:
    """quantlab-live.service runs the twin's canary strategy for as long as the unit lives: it must be guard-safe."""
    canary = PROJECT_ROOT / "reference" / "quantlab" / "strategies" / "canary-strategy.js"
    for flat in (False, True):
        result = simulate(canary, events=600, flat=flat, config={"min_interval_ms": 0})
        assert result["tripped"] == 0, result
        assert result["exits"] > 0, "the strategy never traded, so the check proved nothing"
