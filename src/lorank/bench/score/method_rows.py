"""Every method's row on one task against the sweep's truth (regret, waste, cost), and each
method over all tasks.

Methods that pick one rank for all layers (fixed ranks, the rule of thumb, lorank's stored
estimators) are scored from the sweep's curve at no extra cost; the capacity estimate is
scored held out (its efficiency fitted without the task); per-layer baselines by their own
runs; search baselines by their replays. Cost is in units of the full sweep's training
steps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from lorank.bench.score.gradient_rules import gradient_rule_picks
from lorank.bench.score.replays import (
    replay_lr_pilot,
    replay_successive_halving,
    replay_tpe,
    single_lr_picks,
    tpe_budget,
)
from lorank.bench.score.truth import (
    full_sweep_steps,
    load_sweep,
    params_table,
    seconds_per_step,
    truth,
    truth_report,
)
from lorank.estimators.capacity import efficiency_for, load_calibration, pick_rank
from lorank.scoring import RightRank, score, score_run, seed_se

FIXED = (8, 16)


def spearman(a: dict[int, float], b: dict[int, float]) -> float:
    """Rank correlation of two rank–loss curves over the ranks both measured."""
    common = sorted(set(a) & set(b))
    if len(common) < 3:
        return float("nan")
    ra = np.argsort(np.argsort([a[r] for r in common]))
    rb = np.argsort(np.argsort([b[r] for r in common]))
    return float(np.corrcoef(ra, rb)[0, 1])


def rule_of_thumb(task: dict[str, Any]) -> int:
    """The table people copy (LoRA guides): by dataset size, one step up for code/knowledge.

    < 1,000 examples: 8; < 10,000: 16; more: 32. Code generation or knowledge injection: x2.
    Classification and format/style adaptation: the size rule alone.
    """
    n = int(task.get("n_train", 0))
    rank = 8 if n < 1000 else 16 if n < 10000 else 32
    kind = (task.get("name", "") + " " + task.get("expected_rank", "")).lower()
    if "code" in kind or "fact" in kind or "knowledge" in kind:
        rank *= 2
    return rank


def probe_cost_split(details: dict[str, Any]) -> dict[str, float]:
    """A probe's cost as a multiple of one run at rank R, with and without its learning-rate
    pilot: what the pilot's losing runs add (the SVD probe continues the winner's quarter, the
    nested probe pilots at another rank and continues nothing) is what a user who already
    knows the lr would not spend."""
    cost, pilot = details["cost"], details.get("lr_pilot") or {}
    k = len(pilot.get("losses", {}))
    spent = pilot.get("seconds", 0.0)
    extra = spent * (k - 1) / k if k and pilot.get("continued") else spent
    one_run = cost["one_run_steps"] * cost["seconds_per_step"]
    total = cost["cost_steps"] * cost["seconds_per_step"]
    return {"cost_vs_one_run": cost["cost_vs_one_run"],
            "cost_vs_one_run_without_pilot": round((total - extra) / one_run, 3)}


def score_task(task_dir: Path) -> dict[str, Any]:
    """Every method's row on one task (regret, waste, cost) plus the truth it is judged by."""
    task_dir = Path(task_dir)
    sweep = load_sweep(task_dir)
    right = truth(sweep)
    params = params_table(sweep)
    full = full_sweep_steps(sweep)
    sec_step = seconds_per_step(sweep)
    task = _task_info(task_dir)
    rows = [score(f"fixed r={r}", r, right, params, 0.0) for r in FIXED]
    rows.append(score("rule of thumb", rule_of_thumb(task), right, params, 0.0))
    agreement, rules, probe_runs = {}, {}, []
    for path in sorted((task_dir / "estimators").glob("*.json")):
        ev = json.loads(path.read_text())
        if ev.get("suggested_rank") is None:
            continue
        steps = (ev.get("details") or {}).get("cost", {}).get("cost_steps")
        # a probe prices itself in training steps at its own pace (machine load cancels out)
        cost = (steps if steps is not None else ev.get("cost_seconds", 0.0) / sec_step) / full
        held_out = held_out_capacity_pick(ev, task_dir.name, sweep) \
            if path.name == "capacity.json" else None
        if held_out is not None:  # scored held out: the fit made without this task
            rows.append(score("lorank capacity (default, held out)", held_out, right, params,
                              cost))
            continue
        rows.append(score(f"lorank {ev['name']}", ev["suggested_rank"], right, params, cost)
                    | (probe_cost_split(ev["details"]) if steps is not None else {}))
        if steps is not None:
            probe_runs.append(float(ev["details"]["cost"]["cost_vs_one_run"]))
        if ev.get("curve"):
            probe_L = {int(r): c["loss"] for r, c in ev["curve"].items()}
            agreement[ev["name"]] = spearman(probe_L, right.L)
        if path.name == "gradient.json":  # every variant of the spectrum, at the same cost
            rules = {name: score(name, pick, right, params, cost)
                     for name, pick in gradient_rule_picks(ev["details"]).items()}
    rows += score_layerwise(task_dir, sweep, right, params, sec_step, full)
    budget = tpe_budget(probe_runs)
    pick, spent = replay_tpe(sweep, budget)
    rows.append(score(f"Optuna TPE ({budget} runs)", pick, right, params, spent / full)
                | {"family": "Optuna TPE (probe's budget)"})
    run_steps = sweep["spec"]["recipe"]["steps"]
    pick, spent, n = replay_successive_halving(sweep, budget_steps=budget * run_steps)
    rows.append(score(f"successive halving ({budget} runs, {n} configs)", pick, right, params,
                      spent / full) | {"family": "successive halving (probe's budget)"})
    pick, spent, n = replay_successive_halving(sweep)
    rows.append(score(f"successive halving (all {n} configs)", pick, right, params, spent / full)
                | {"family": "successive halving (all configs)"})
    return {"task": task_dir.name, "truth": right.to_dict(), "rows": rows, "task_info": task,
            "truth_report": truth_report(sweep),
            "curve_agreement": agreement, "gradient_rules": rules,
            "best_lr": {str(r): row["lr"] for r, row in sorted(sweep["curve"].items(),
                                                                key=lambda kv: int(kv[0]))},
            "single_lr": single_lr_picks(sweep, right, params),
            "pilot_lr": {"svd": replay_lr_pilot(sweep, rank=max(int(r) for r in sweep["curve"])),
                         "nested": replay_lr_pilot(sweep)},
            "seconds_per_step": sec_step, "full_sweep_steps": full,
            "sweep_wall_hours": sum(t.get("wall_seconds") or 0 for t in sweep["trials"]) / 3600}


def held_out_capacity_pick(ev: dict[str, Any], task: str, sweep: dict[str, Any]) -> int | None:
    """The capacity estimate's pick on `task` with the efficiency fitted without it (the
    shipped fit where the task was never in it), from the stored bits and adapter sizes; None
    where no fit is installed or the evidence lacks them."""
    details = ev.get("details") or {}
    kind = "classification" if sweep["meta"].get("format") == "classification" else "generation"
    eff = efficiency_for(load_calibration(), kind, exclude_task=task)
    if eff is None or "total_bits" not in details or "adapter_params" not in details:
        return None
    recipe, n_train = sweep["spec"]["recipe"], sweep["meta"]["n_train"]
    epochs = details.get("epochs") or recipe["steps"] * recipe["batch_size"] / n_train
    params = {int(r): float(p) for r, p in details["adapter_params"].items()}
    return pick_rank(float(details["total_bits"]), params, eff.bits_per_param(epochs))


def score_layerwise(task_dir: Path, sweep: dict[str, Any], right: RightRank,
                    params: dict[int, float], sec_step: float, full: int) -> list[dict]:
    """Rows of the per-layer baselines (`baselines/*.json`, from `lorank bench --baselines`):
    each trained its own runs; its cost is what it spent deciding, in training steps."""
    rows = []
    best = np.asarray(sweep["curve"][str(right.best_rank)]["per_example"], float)
    for path in sorted((Path(task_dir) / "baselines").glob("*.json")):
        b = json.loads(path.read_text())
        runs = [np.asarray(r["per_example"], float) for r in b["runs"]]
        seed_sd = seed_se([float(np.nanmean(r)) for r in runs])
        steps = b["decide_seconds"] / sec_step + b["decide_steps"]
        row = score_run(LAYERWISE_LABELS.get(b["name"], b["name"]), np.mean(runs, axis=0),
                        b["trainable_params"], right, best, params, steps / full, seed_sd)
        rows.append(row | {"rank_pattern": b["rank_pattern"]})
    return rows


LAYERWISE_LABELS = {"eva": "PEFT EVA (per layer)", "adalora": "PEFT AdaLoRA (per layer)",
                    "fisher": "Fisher diagonal (per layer)",
                    "gradient": "lorank gradient pattern (per layer)"}


def _task_info(task_dir: Path) -> dict[str, Any]:
    path = task_dir / "data" / "task.json"
    if path.exists():
        info = json.loads(path.read_text())
        return {**info.get("task", {}), "n_train": info.get("n_train", 0)}
    return {"name": task_dir.name}


def overall(scored: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method over tasks; "pick = r*" counts only tasks whose r* is stable (the share of
    resamples of seeds and validation examples giving the same r*, `truth_report`)."""
    methods: dict[str, list[dict]] = {}
    stable = {s["task"]: (s.get("truth_report") or {}).get("stability", {}).get("stable", False)
              for s in scored}
    for s in scored:
        for row in s["rows"]:  # a search's budget differs per task: grouped by its family
            methods.setdefault(row.get("family", row["method"]), []).append(
                row | {"task": s["task"]})
    out = []
    for name, rows in methods.items():
        out.append({"method": name, "tasks": len(rows),
                    "within_2x": sum(r["acceptable"] and r["r_rec"] <= 2 * r["r_star"]
                                     for r in rows),
                    "exact_stable": sum(r["r_rec"] == r["r_star"] for r in rows
                                        if stable.get(r["task"])),
                    "stable_tasks": sum(bool(stable.get(r["task"])) for r in rows),
                    "mean_regret": float(np.mean([r["regret"] for r in rows])),
                    "worst_regret": float(np.max([r["regret"] for r in rows])),
                    "within_tol": sum(r["acceptable"] for r in rows),
                    "mean_waste": float(np.mean([r["waste"] for r in rows])),
                    "mean_cost": float(np.mean([r["cost"] for r in rows]))})
    return out
