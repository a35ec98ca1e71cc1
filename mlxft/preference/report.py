"""`mlxft eval` output for preference pairs (stdout): base against tuned."""

from __future__ import annotations

from mlxft import ui

NAMES = {"accuracy": "preference accuracy", "chosen_logp": "chosen log-prob", "rejected_logp": "rejected log-prob"}


def print_eval(result: dict) -> None:
    ui.result(f"{result['model']} on {result['data']}: {result['pairs']} preference pairs")
    if "base" not in result:
        ui.result(f"  {NAMES['accuracy']:<20} {result['accuracy']:.1%}")
        for key in ("chosen_logp", "rejected_logp"):
            ui.result(f"  {NAMES[key]:<20} {result[key]:.3f}")
        return
    ui.result(f"  {'':<20} {'base':>10} {'tuned':>10} {'change':>10}")
    b, t, d = result["base"], result["tuned"], result["delta"]
    ui.result(f"  {NAMES['accuracy']:<20} {b['accuracy']:>10.1%} {t['accuracy']:>10.1%} {d['accuracy'] * 100:>+7.1f} pt")
    for key in ("chosen_logp", "rejected_logp"):
        ui.result(f"  {NAMES[key]:<20} {b[key]:>10.3f} {t[key]:>10.3f} {d[key]:>+10.3f}")
    ui.result(f"  reward margin (tuned vs base, beta {result['beta']:g}) {t['reward_margin']:+.3f}, "
              f"reward accuracy {t['reward_accuracy']:.1%}")
