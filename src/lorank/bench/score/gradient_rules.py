"""Every variant of the gradient spectrum's rank rule, re-scored from stored spectra, and
the leave-one-task-out choice among them.

A variant is a rule, at the calibration size or extrapolated to the training set, with the
median or the 90% quantile over layers; its pick comes from the per-layer spectra in
gradient.json, so re-scoring a rule trains nothing. `select_rule` chooses on the other tasks
and judges on the held-out one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

RULE_QUANTILES = (0.5, 0.9)


def gradient_rule_picks(details: dict[str, Any]) -> dict[str, int]:
    """The global rank every variant of the gradient spectrum would pick, from its stored
    per-layer spectra: each rule, at the calibration size or extrapolated to the training set,
    with the median or the 90% quantile over layers. Re-scoring a rule trains nothing."""
    from lorank.estimators.gradient import RULES, _global, rule_growth

    layers, n_train, max_rank = details["layers"], details["n_train"], details["max_rank"]
    groups, alpha = details.get("groups"), details.get("alpha", 0.05)
    picks = {}
    for rule in RULES:
        if any(rule not in lay["ranks"] for lay in layers):  # stored before the rule existed
            continue
        at_calib = [float(lay["ranks"][rule][-1]) for lay in layers]
        extrapolated = [rule_growth(lay["n_examples"], lay["ranks"][rule], rule, n_train,
                                    max_rank, groups=groups, alpha=alpha)["rank"]
                        for lay in layers]
        for q in RULE_QUANTILES:
            picks[f"{rule}, q{q:g}, at calibration n"] = _global(at_calib, q, max_rank)
            picks[f"{rule}, q{q:g}, extrapolated"] = _global(extrapolated, q, max_rank)
    return picks


def _rule_key(name: str, tasks: list[dict[str, Any]]) -> tuple:
    rows = [s["gradient_rules"][name] for s in tasks]
    return (-sum(r["acceptable"] for r in rows), float(np.mean([r["regret"] for r in rows])),
            float(np.mean([r["waste"] for r in rows])), name)


def select_rule(scored: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Leave one task out: choose the variant that is within tolerance on the most other tasks
    (then lowest mean regret, then least waste) and report how it does on the held-out task.
    The honest test of a fitted rule: it never sees the task it is judged on."""
    with_rules = [s for s in scored if s.get("gradient_rules")]
    out = []
    for held in with_rules:
        others = [s for s in with_rules if s is not held]
        if not others:
            continue
        names = set.intersection(*(set(s["gradient_rules"]) for s in others))

        chosen = min(names, key=lambda name, others=others: _rule_key(name, others))
        row = held["gradient_rules"].get(chosen)
        if row is not None:
            out.append({"task": held["task"], "rule": chosen, "fitted_on": [s["task"] for s in others],
                        **{k: row[k] for k in ("r_rec", "r_star", "regret", "waste", "acceptable")}})
    return out
