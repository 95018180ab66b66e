"""Bench: score every method on every task against the sweep's ground truth, from disk.

Layout: `RESULTS/<task>/sweep.json` (written by `lorank sweep --task`), and
`RESULTS/<task>/estimators/<name>.json` (Evidence written by `lorank bench --run`). Scoring
reads only these files, so re-scoring a new estimator costs no re-training.

Methods that pick one rank for all layers are scored from the sweep's curve at no extra cost.
Search baselines (Optuna TPE, successive halving) are replayed on the sweep's recorded runs:
every run is deterministic from its seed, so replaying a sampler over the recorded outcomes
is what running it would have produced, at the cost it would have spent.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import optuna

from lorank.errors import LorankError
from lorank.estimators.capacity import (
    CalibrationRow,
    efficiency_for,
    load_calibration,
    pick_rank,
)
from lorank.plots import plot_rank_curve
from lorank.scoring import (
    RightRank,
    acceptable_set,
    curve_right_rank,
    hinging_ranks,
    r_star_stability,
    score,
    score_run,
)
from lorank.util import atomic_write_text

FIXED = (8, 16)


def load_sweep(task_dir: Path) -> dict[str, Any]:
    path = Path(task_dir) / "sweep.json"
    if not path.exists():
        raise LorankError(f"{path}: no sweep results (run `lorank sweep --task ...` first)")
    return json.loads(path.read_text())


def truth(sweep: dict[str, Any]) -> RightRank:
    """r* by the DESIGN.md rule: paired SE across examples, widened by the seed spread."""
    return curve_right_rank({int(r): row for r, row in sweep["curve"].items() if row})


def spearman(a: dict[int, float], b: dict[int, float]) -> float:
    """Rank correlation of two rank–loss curves over the ranks both measured."""
    common = sorted(set(a) & set(b))
    if len(common) < 3:
        return float("nan")
    ra = np.argsort(np.argsort([a[r] for r in common]))
    rb = np.argsort(np.argsort([b[r] for r in common]))
    return float(np.corrcoef(ra, rb)[0, 1])


def params_table(sweep: dict[str, Any]) -> dict[int, float]:
    return {int(r): float(p) for r, p in sweep["meta"]["params"].items()}


def seconds_per_step(sweep: dict[str, Any]) -> float:
    """Measured wall seconds per training step in the sweep (evaluation included)."""
    runs = [t for t in sweep["trials"] if t.get("steps_done")]
    return float(np.median([t["wall_seconds"] / t["steps_done"] for t in runs]))


def full_sweep_steps(sweep: dict[str, Any]) -> int:
    spec = sweep["spec"]
    return len(spec["ranks"]) * len(spec["lrs"]) * int(spec["recipe"]["steps"])


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


def replay_tpe(sweep: dict[str, Any], budget_runs: int, seed: int = 0) -> tuple[int, int]:
    """Optuna TPE over (rank, lr) with `budget_runs` full runs, replayed on seed-0 outcomes."""
    spec = sweep["spec"]
    outcome = {(t["rank"], t["lr"]): t["value"] for t in sweep["trials"]
               if t["seed"] == spec["seeds"][0] and t["status"] == "ok"}
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(budget_runs, 10))
    study = optuna.create_study(direction="minimize", sampler=sampler)
    for _ in range(budget_runs):
        trial = study.ask()
        r = trial.suggest_categorical("rank", spec["ranks"])
        lr = trial.suggest_categorical("lr", spec["lrs"])
        value = outcome.get((r, lr))
        study.tell(trial, value if value is not None else float("inf"))
    best = study.best_trial.params
    return int(best["rank"]), budget_runs * int(spec["recipe"]["steps"])


def tpe_budget(probe_runs: list[float]) -> int:
    """Full runs TPE gets: what lorank's dearest probe spent on this task, in runs of the
    recipe, rounded up (a search cannot train part of a run); 2 when no probe was run."""
    return max(1, math.ceil(max(probe_runs) - 1e-9)) if probe_runs else 2


def _in_grid(trial: dict[str, Any], spec: dict[str, Any]) -> bool:
    return trial["rank"] in spec["ranks"] and any(
        math.isclose(trial["lr"], lr, rel_tol=1e-9) for lr in spec["lrs"])


def replay_successive_halving(sweep: dict[str, Any], eta: int = 2,
                              budget_steps: float | None = None, seed: int = 0
                              ) -> tuple[int, int, int]:
    """Successive halving over (rank, lr) on the recorded learning curves (seed 0).

    Rung k trains the surviving configs to the k-th evaluation point; the best 1/eta go on.
    With `budget_steps`, it starts from the most configs (drawn at random with `seed`) whose
    rungs fit the budget, at least one. Returns the pick, the steps spent, the configs started.
    The search space is the recipe's grid (spec ranks x lrs), as for TPE and the sweep's cost:
    runs added at other lrs to check that the grid brackets the best are not configs to draw.
    """
    spec = sweep["spec"]
    seed0 = [t for t in sweep["trials"] if t["seed"] == spec["seeds"][0] and t["status"] == "ok"
             and _in_grid(t, spec)]
    curves = {(t["rank"], t["lr"]): t.get("curve") or [] for t in seed0}
    configs = sorted(k for k, c in curves.items() if c)
    if not configs:
        raise LorankError("successive halving needs learning curves in sweep.json")
    n_rungs = min(len(curves[k]) for k in configs)
    rung_steps = [curves[configs[0]][rung][0] for rung in range(n_rungs)]

    def spend(n: int) -> int:
        total, prev, alive = 0, 0, n
        for rung, step in enumerate(rung_steps):
            total += alive * (step - prev)
            prev = step
            if rung < n_rungs - 1:
                alive = max(1, alive // eta)
        return total

    n = len(configs)
    if budget_steps is not None:
        n = max([1] + [m for m in range(1, len(configs) + 1) if spend(m) <= budget_steps])
        order = np.random.default_rng(seed).permutation(len(configs))
        configs = sorted(configs[i] for i in order[:n])
    alive = list(configs)
    for rung in range(n_rungs):
        alive.sort(key=lambda k, rung=rung: curves[k][rung][2])
        if rung < n_rungs - 1:
            alive = alive[: max(1, len(alive) // eta)]
    return int(alive[0][0]), spend(n), n


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


def single_lr_picks(sweep: dict[str, Any], right: RightRank,
                    params: dict[int, float]) -> list[dict[str, Any]]:
    """What a method that reads the whole rank curve at one learning rate would pick, at best.

    For each lr of the grid run at every rank, r* of the sweep's own curve at that lr (same
    rule, same seeds), scored against the truth (best lr per rank). A probe trains at one lr,
    so this is its ceiling: where the best lr moves with rank, no single-lr curve has the
    truth's shape.
    """
    from lorank.sweep import rank_loss_curve  # numpy only, but its module loads the trainer

    ranks = {int(r) for r in sweep["curve"]}
    out = []
    for lr in sweep["spec"]["lrs"]:
        curve = rank_loss_curve([t for t in sweep["trials"] if t["lr"] == lr])
        if set(curve) != ranks or not all(curve.values()):
            continue
        at_lr = curve_right_rank(curve)
        out.append(score(f"sweep curve at lr {lr:g}", at_lr.r_star, right, params, 0.0)
                   | {"lr": lr})
    return out


def replay_lr_pilot(sweep: dict[str, Any], seed: int = 0, rank: int | None = None) -> float | None:
    """The lr the probe's pilot would pick, replayed on the sweep's runs at `rank` (default: the
    nested probe's, the middle candidate; the SVD probe's is R): the lowest validation loss at
    the first evaluation (a quarter of the schedule) of that seed."""
    from lorank.estimators.probe import pilot_rank

    rank = rank or pilot_rank([int(r) for r in sweep["curve"]])
    first = {t["lr"]: t["curve"][0][2] for t in sweep["trials"]
             if t["rank"] == rank and t["seed"] == seed and t["lr"] in sweep["spec"]["lrs"]
             and t.get("curve")}
    if len(first) < 2:
        return None
    return min(first, key=lambda lr: (first[lr] if math.isfinite(first[lr]) else math.inf, lr))


def score_layerwise(task_dir: Path, sweep: dict[str, Any], right: RightRank,
                    params: dict[int, float], sec_step: float, full: int) -> list[dict]:
    """Rows of the per-layer baselines (`baselines/*.json`, from `lorank bench --baselines`):
    each trained its own runs; its cost is what it spent deciding, in training steps."""
    rows = []
    best = np.asarray(sweep["curve"][str(right.best_rank)]["per_example"], float)
    for path in sorted((Path(task_dir) / "baselines").glob("*.json")):
        b = json.loads(path.read_text())
        runs = [np.asarray(r["per_example"], float) for r in b["runs"]]
        seed_means = [float(np.nanmean(r)) for r in runs]
        seed_sd = float(np.std(seed_means, ddof=1) / math.sqrt(len(runs))) if len(runs) > 1 else 0.0
        steps = b["decide_seconds"] / sec_step + b["decide_steps"]
        row = score_run(LAYERWISE_LABELS.get(b["name"], b["name"]), np.mean(runs, axis=0),
                        b["trainable_params"], right, best, params, steps / full, seed_sd)
        rows.append(row | {"rank_pattern": b["rank_pattern"]})
    return rows


LAYERWISE_LABELS = {"eva": "PEFT EVA (per layer)", "adalora": "PEFT AdaLoRA (per layer)",
                    "fisher": "Fisher diagonal (per layer)",
                    "gradient": "lorank gradient pattern (per layer)"}


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


def _task_info(task_dir: Path) -> dict[str, Any]:
    path = task_dir / "data" / "task.json"
    if path.exists():
        info = json.loads(path.read_text())
        return {**info.get("task", {}), "n_train": info.get("n_train", 0)}
    return {"name": task_dir.name}


def sweep_gap(sweep: dict[str, Any]) -> str | None:
    """Why a sweep cannot be ground truth yet (None when it can): a rank of its grid with no
    finished run, or whose best lr has fewer seeds than the grid. A worker that stops early
    still writes sweep.json; scoring its partial curve would judge methods by a wrong r*."""
    spec = sweep.get("spec") or {}
    ranks, n_seeds = spec.get("ranks") or [], len(spec.get("seeds") or [])
    curve = {int(r): row for r, row in (sweep.get("curve") or {}).items() if row}
    missing = [str(r) for r in ranks if r not in curve]
    thin = [str(r) for r in ranks if r in curve and curve[r].get("seeds", 0) < n_seeds]
    parts = []
    if missing:
        parts.append(f"no finished run at rank {', '.join(missing)}")
    if thin:
        parts.append(f"fewer than {n_seeds} seeds at the best lr of rank {', '.join(thin)}")
    return "; ".join(parts) or None


def pending_tasks(results: Path) -> dict[str, str]:
    """Tasks whose sweep.json exists but is not ground truth yet, with the reason."""
    return {p.name: gap for p in sorted(Path(results).iterdir())
            if (p / "sweep.json").exists() and (gap := sweep_gap(load_sweep(p)))}


def probe_curves(task_dir: Path) -> dict[str, dict[int, dict[str, float]]]:
    """The stored probes' rank-loss curves, to overlay on the sweep's (one run each)."""
    curves = {}
    for name in ("nested-probe", "svd-probe"):
        path = Path(task_dir) / "estimators" / f"{name}.json"
        if path.exists() and (curve := json.loads(path.read_text()).get("curve")):
            curves[f"{name} (one run)"] = {int(r): row for r, row in curve.items()
                                           if row and np.isfinite(row.get("loss", np.nan))}
    return curves


def seed_losses(sweep: dict[str, Any]) -> dict[int, list[np.ndarray]]:
    """Per rank, one per-example loss vector per seed at that rank's best lr (the curve's)."""
    out = {}
    for r, row in sweep["curve"].items():
        if not row:
            continue
        runs = [t for t in sweep["trials"] if t["rank"] == int(r) and t["status"] == "ok"
                and t.get("per_example") and math.isclose(t["lr"], row["lr"], rel_tol=1e-9)]
        out[int(r)] = [np.asarray(t["per_example"], float) for t in sorted(
            runs, key=lambda t: t["seed"])]
    return out


def truth_report(sweep: dict[str, Any]) -> dict[str, Any]:
    """How sure r* is: the acceptable set, r*'s stability under resampling of seeds and
    validation examples, the ranks whose verdict hinges on seed noise, the seeds per rank."""
    right = truth(sweep)
    seeds = {int(r): int(row["seeds"]) for r, row in sweep["curve"].items() if row}
    return {"acceptable": acceptable_set(right), "stability": r_star_stability(seed_losses(sweep)),
            "hinging": {str(r): why for r, why in hinging_ranks(right, seeds).items()},
            "seeds": {str(r): k for r, k in sorted(seeds.items())}}


def calibration_rows(results: Path) -> list[CalibrationRow]:
    """The capacity fit's data: per complete sweep with a stored capacity measurement, its
    bits to learn, adapter sizes, acceptable ranks, r* and the recipe's epochs."""
    rows = []
    pending = pending_tasks(results)
    for task_dir in sorted(p for p in Path(results).iterdir() if (p / "sweep.json").exists()):
        cap_path = task_dir / "estimators" / "capacity.json"
        if task_dir.name in pending or not cap_path.exists():
            continue
        sweep, cap = load_sweep(task_dir), json.loads(cap_path.read_text())
        right = truth(sweep)
        recipe, meta = sweep["spec"]["recipe"], sweep["meta"]
        rows.append(CalibrationRow(
            task=task_dir.name,
            kind="classification" if meta.get("format") == "classification" else "generation",
            bits=float(cap["details"]["total_bits"]),
            params={int(r): float(p) for r, p in cap["details"]["adapter_params"].items()},
            acceptable=acceptable_set(right), r_star=right.r_star,
            epochs=round(recipe["steps"] * recipe["batch_size"] / meta["n_train"], 4),
            losses=dict(right.L),
            data_hash=meta.get("data_hash", "")))
    return rows


def run_bench(results: Path, out_md: Path | None = None) -> list[dict[str, Any]]:
    """Score every task under `results` whose sweep is complete (see `sweep_gap`) and write
    BENCHMARKS tables, JSON and plots."""
    results = Path(results)
    swept = sorted(p for p in results.iterdir() if (p / "sweep.json").exists())
    if not swept:
        raise LorankError(f"{results}: no task has sweep.json yet")
    pending = pending_tasks(results)
    tasks = [p for p in swept if p.name not in pending]
    if not tasks:
        raise LorankError(f"{results}: no sweep is complete yet ("
                          + "; ".join(f"{k}: {v}" for k, v in pending.items()) + ")")
    scored = [score_task(t) for t in tasks]
    for s, t in zip(scored, tasks, strict=True):
        sweep = load_sweep(t)
        curve = {int(r): row for r, row in sweep["curve"].items() if row}
        picks = {row["method"]: row["r_rec"] for row in s["rows"]}
        plot_rank_curve({"sweep (best lr)": curve} | probe_curves(t), t / "bench.png",
                        picks=picks | {"r*": s["truth"]["r_star"]}, title=f"{t.name}")
    atomic_write_text(results / "scores.json", json.dumps(scored, indent=1))
    if out_md is not None:
        atomic_write_text(Path(out_md), markdown_tables(scored, results))
    return scored


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


def markdown_tables(scored: list[dict[str, Any]], results: Path) -> str:
    """The per-task and overall tables (the generated part of BENCHMARKS.md)."""
    lines = ["## Overall", "",
             "| method | tasks | mean regret | worst regret | within tol | within tol and "
             "<= 2 r* | = r* (stable r* only) | mean waste | mean cost |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for o in overall(scored):
        lines.append(f"| {o['method']} | {o['tasks']} | {o['mean_regret']:.2%} | "
                     f"{o['worst_regret']:.2%} | {o['within_tol']}/{o['tasks']} | "
                     f"{o['within_2x']}/{o['tasks']} | {o['exact_stable']}/{o['stable_tasks']} | "
                     f"{o['mean_waste']:.2f} | {o['mean_cost']:.3f} |")
    agreement: dict[str, list[float]] = {}
    for s in scored:
        for name, rho in s.get("curve_agreement", {}).items():
            agreement.setdefault(name, []).append(rho)
    if agreement:
        lines += ["", "Which probe tracks the independent runs' curve (Spearman rank correlation "
                  "with the sweep's L(r), per task): " + "; ".join(
                      f"{name} mean {np.mean(v):.2f} (from {min(v):.2f} to {max(v):.2f}, "
                      f"{len(v)} tasks)" for name, v in agreement.items()) + "."]
    for name, gap in pending_tasks(results).items():
        lines += ["", f"Not scored yet, its sweep is incomplete: {name} ({gap})."]
    for s in scored:
        t = s["truth"]
        lines += ["", f"## {s['task']}", "",
                  f"r* = {t['r_star']} (best rank {t['best_rank']}, L_min {t['L_best']:.4f}); "
                  f"sweep wall time {s['sweep_wall_hours']:.2f} h, "
                  f"{s['seconds_per_step']:.2f} s/step. ![curve]({results.name}/{s['task']}/bench.png)",
                  "", "| rank | L(r) | paired SE vs best | tol |", "| ---: | ---: | ---: | ---: |"]
        for r in sorted(t["L"], key=int):
            lines.append(f"| {r} | {t['L'][r]:.4f} | {t['se'][r]:.4f} | {t['tol'][r]:.4f} |")
        if report := s.get("truth_report"):
            stab = report["stability"]
            lines += ["", f"Acceptable ranks (within tolerance): {report['acceptable']}. r* = "
                      f"{stab['r_star']} in {stab['share']:.0%} of {stab['resamples']} resamples "
                      "of seeds and validation examples ("
                      + ", ".join(f"r*={r}: {v:.0%}" for r, v in stab["distribution"].items())
                      + f"): {'stable' if stab['stable'] else 'not stable'}. Seeds at each "
                      "rank's best lr: " + ", ".join(f"{r}: {k}" for r, k in
                                                     report["seeds"].items()) + "."]
            for r, why in report["hinging"].items():
                lines.append(f"Rank {r}'s verdict hinges on seed noise ({why}): `lorank sweep "
                             "--settle` adds seeds there.")
        lines += ["", "| method | rank | regret | waste | cost | within tol |",
                  "| --- | ---: | ---: | ---: | ---: | :---: |"]
        for row in s["rows"]:
            lines.append(f"| {row['method']} | {row['r_rec']:g} | {row['regret']:.2%} | "
                         f"{row['waste']:.2f} | {row['cost']:.3f} | "
                         f"{'yes' if row['acceptable'] else 'no'} |")
        for name, rho in s.get("curve_agreement", {}).items():
            lines.append(f"\n{name} curve vs sweep curve: Spearman rank correlation {rho:.2f}")
        for row in s["rows"]:
            if "cost_vs_one_run_without_pilot" in row:
                lines.append(f"\n{row['method']} cost: {row['cost_vs_one_run']:.2f}x one run at "
                             f"rank R, {row['cost_vs_one_run_without_pilot']:.2f}x without its "
                             "learning-rate pilot")
        lines += _single_lr_lines(s)
    lines += rule_tables(scored)
    return "\n".join(lines) + "\n"


def _single_lr_lines(s: dict[str, Any]) -> list[str]:
    if not s.get("best_lr"):
        return []
    best = ", ".join(f"r={r}: {lr:g}" for r, lr in s["best_lr"].items())
    lines = ["", f"Best learning rate per rank: {best}."]
    if s.get("single_lr"):
        lines += ["", "The sweep's own curve at one learning rate (the most a single-lr probe "
                  "could see), picked by the same rule:", "",
                  "| lr | pick | regret | waste | within tol |", "| ---: | ---: | ---: | ---: | :---: |"]
        for row in s["single_lr"]:
            lines.append(f"| {row['lr']:g} | {row['r_rec']:g} | {row['regret']:.2%} | "
                         f"{row['waste']:.2f} | {'yes' if row['acceptable'] else 'no'} |")
    pilots = {k: v for k, v in (s.get("pilot_lr") or {}).items() if v is not None}
    if pilots:
        where = {"svd": "R (the SVD probe)", "nested": "the middle rank (the nested probe)"}
        said = " and ".join(f"{lr:g} at {where[k]}" for k, lr in pilots.items())
        lines += ["", "The probes' lr pilots replayed on the sweep's seed-0 runs (first "
                  f"evaluation, a quarter of the schedule) pick {said}."]
    return lines


def _rule_key(name: str, tasks: list[dict[str, Any]]) -> tuple:
    rows = [s["gradient_rules"][name] for s in tasks]
    return (-sum(r["acceptable"] for r in rows), float(np.mean([r["regret"] for r in rows])),
            float(np.mean([r["waste"] for r in rows])), name)


def rule_tables(scored: list[dict[str, Any]]) -> list[str]:
    """Every gradient-spectrum variant's pick per task, and the leave-one-task-out choice."""
    tasks = [s for s in scored if s.get("gradient_rules")]
    if not tasks:
        return []
    names = sorted(set().union(*(s["gradient_rules"] for s in tasks)))
    lines = ["", "## Gradient-spectrum rules against r*", "",
             "Pick (regret, ✓ = within tolerance) of every variant on every task; "
             "regenerated from the stored spectra by `lorank bench`.", "",
             "| variant | " + " | ".join(f"{s['task']} (r*={s['truth']['r_star']})"
                                        for s in tasks) + " | within tol |",
             "| --- |" + " ---: |" * len(tasks) + " ---: |"]
    for name in names:
        cells, ok = [], 0
        for s in tasks:
            row = s["gradient_rules"].get(name)
            if row is None:
                cells.append("–")
                continue
            ok += row["acceptable"]
            cells.append(f"{row['r_rec']:g} ({row['regret']:.1%}{', ✓' if row['acceptable'] else ''})")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {ok}/{len(tasks)} |")
    held = select_rule(scored)
    if held:
        lines += ["", "Leave one task out (the rule is chosen on the other tasks, judged on this "
                  "one):", "", "| held-out task | chosen variant | pick | r* | regret | within tol |",
                  "| --- | --- | ---: | ---: | ---: | :---: |"]
        for h in held:
            lines.append(f"| {h['task']} | {h['rule']} | {h['r_rec']:g} | {h['r_star']} | "
                         f"{h['regret']:.2%} | {'yes' if h['acceptable'] else 'no'} |")
    else:
        lines += ["", "Leave-one-task-out selection needs at least two tasks with a sweep."]
    return lines


START, END = "<!-- bench:start -->", "<!-- bench:end -->"
# bench name -> (recommend's estimator, probe method)
BENCH_ESTIMATORS = {"capacity": ("capacity", None), "gradient": ("gradient", None),
                    "svd-probe": ("probe", "svd"), "nested-probe": ("probe", "nested")}


def update_markdown(path: Path, tables: str) -> None:
    """Replace the generated block of BENCHMARKS.md, keeping the hand-written protocol."""
    path = Path(path)
    text = path.read_text() if path.exists() else f"# Benchmarks\n\n{START}\n{END}\n"
    if START not in text or END not in text:
        text = text.rstrip() + f"\n\n{START}\n{END}\n"
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    atomic_write_text(path, f"{head}{START}\n{tables}{END}{tail}")


def run_task_estimators(task_dir: Path, names: list[str], *, progress: bool = True) -> list[Path]:
    """Run lorank's estimators on a task's data and store their Evidence.

    capacity and gradient train nothing; the probe trains one run at the task's largest rank
    with the task's steps and batch, at the lr of the task's grid that its pilot picks (a
    quarter of the schedule per lr, charged to the probe's cost: see `lorank.api.run_probe`).
    """
    from lorank.api import recommend

    task_dir = Path(task_dir)
    info = json.loads((task_dir / "data" / "task.json").read_text())["task"]
    written = []
    for name in names:
        if name not in BENCH_ESTIMATORS:
            raise LorankError(f"--run {name}: unknown; known: {', '.join(BENCH_ESTIMATORS)}")
        estimator, method = BENCH_ESTIMATORS[name]
        probe = {"budget": str(info["steps"]), "probe_max_rank": max(info["ranks"]),
                 "lr": list(info["lrs"]),
                 "batch_size": info["batch_size"], "probe_method": method} if method else {}
        if name == "capacity":  # the task's recipe is the planned run
            probe = {"steps": info["steps"], "batch_size": info["batch_size"]}
        rec = recommend(info["model"], task_dir / "data" / "train.jsonl",
                        val_data=task_dir / "data" / "val.jsonl", max_length=info["max_length"],
                        targets=info.get("targets", "all-linear"), estimators=(estimator,),
                        max_rank=max(info["ranks"]), progress=progress, **probe)
        evidence = rec.evidence[-1]
        evidence["recommended_rank"] = rec.rank
        (task_dir / "estimators").mkdir(exist_ok=True)
        path = task_dir / "estimators" / f"{name}.json"
        atomic_write_text(path, json.dumps(evidence, indent=1, default=str))
        written.append(path)
    return written
