"""The generated part of benchmarks/BENCHMARKS.md: the overall table, each task's truth and
rows, the gradient-rule tables, and replacing the generated block in the file.

The block lies between `START` and `END`; everything outside it is the hand-written protocol
and is kept as it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lorank.bench.score.gradient_rules import select_rule
from lorank.bench.score.method_rows import overall
from lorank.bench.score.truth import pending_tasks
from lorank.util import atomic_write_text

START, END = "<!-- bench:start -->", "<!-- bench:end -->"


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


def update_markdown(path: Path, tables: str) -> None:
    """Replace the generated block of BENCHMARKS.md, keeping the hand-written protocol."""
    path = Path(path)
    text = path.read_text() if path.exists() else f"# Benchmarks\n\n{START}\n{END}\n"
    if START not in text or END not in text:
        text = text.rstrip() + f"\n\n{START}\n{END}\n"
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    atomic_write_text(path, f"{head}{START}\n{tables}{END}{tail}")
