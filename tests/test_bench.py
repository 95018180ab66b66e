"""The bench harness on hand-made sweep results: truth, baselines, replayed searches, tables."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lorank.bench import score as bench
from lorank.errors import LorankError

RANKS, LRS, SEEDS, STEPS = [1, 2, 4, 8, 16], [1e-3, 3e-3], [0, 1], 20


def fake_sweep(tmp_path, knee: int = 4, level_of=None):
    """Loss falls until `knee`, then is flat; lr 3e-3 is better; 200 validation examples.
    `level_of(rank, lr)` replaces that shape."""
    rng = np.random.default_rng(0)
    base = rng.gamma(2.0, 1.0, size=200)
    trials, number = [], 0
    for r in RANKS:
        for lr in LRS:
            for s in SEEDS:
                gain = 0.3 * min(np.log2(r), np.log2(knee)) / np.log2(knee)
                level = 2.0 - gain + (0.05 if lr == 1e-3 else 0.0)
                if level_of is not None:
                    level = level_of(r, lr)
                per_ex = base * level / base.mean() + rng.normal(0, 0.01, size=200)
                curve = [[step, 0.0, level + 0.5 * (1 - step / STEPS)] for step in (5, 10, 15, 20)]
                trials.append({"number": number, "rank": r, "lr": lr, "seed": s, "status": "ok",
                               "value": float(per_ex.mean()), "per_example": per_ex.tolist(),
                               "wall_seconds": 40.0, "steps_done": STEPS, "curve": curve})
                number += 1
    from lorank.sweep import rank_loss_curve

    curve = rank_loss_curve(trials)
    sweep = {"trials": trials, "curve": {str(k): v for k, v in curve.items()},
             "spec": {"ranks": RANKS, "lrs": LRS, "seeds": SEEDS, "recipe": {"steps": STEPS}},
             "meta": {"params": {str(r): 1000 * r for r in RANKS}}}
    task = tmp_path / "toy"
    (task / "data").mkdir(parents=True)
    (task / "sweep.json").write_text(json.dumps(sweep))
    (task / "data" / "task.json").write_text(json.dumps(
        {"task": {"name": "toy", "expected_rank": "low"}, "n_train": 500}))
    return task


def test_truth_finds_the_knee(tmp_path):
    right = bench.truth(bench.load_sweep(fake_sweep(tmp_path, knee=4)))
    assert right.r_star == 4


def test_score_task_rows(tmp_path):
    task = fake_sweep(tmp_path, knee=4)
    (task / "estimators").mkdir()
    (task / "estimators" / "capacity.json").write_text(json.dumps(
        {"name": "capacity", "suggested_rank": 2, "cost_seconds": 4.0}))
    s = bench.score_task(task)
    rows = {r["method"]: r for r in s["rows"]}
    assert rows["fixed r=8"]["waste"] == pytest.approx(2.0) and rows["fixed r=8"]["acceptable"]
    assert rows["fixed r=16"]["waste"] == pytest.approx(4.0)
    assert rows["rule of thumb"]["r_rec"] == 8  # < 1,000 examples, not code/knowledge
    cap = rows["lorank capacity"]
    assert cap["r_rec"] == 2 and not cap["acceptable"] and cap["regret"] > 0.01
    # 4 s at 2 s/step = 2 steps of a 5 ranks x 2 lrs x 20 steps sweep
    assert cap["cost"] == pytest.approx(2 / 200)
    assert rows["successive halving (all 10 configs)"]["cost"] > 0
    assert rows["successive halving (2 runs, 4 configs)"]["cost"] == pytest.approx(40 / 200)


def test_single_lr_curves_miss_where_the_best_lr_moves_with_rank(tmp_path):
    """3e-3 wins at ranks 1-2 and is flat; 1e-3 wins from rank 4 on, where the truth's knee is.
    Read at 3e-3 alone the curve is flat (pick 1, outside tolerance); at 1e-3 it has the knee."""
    def level_of(r, lr):
        return 1.8 if lr == 3e-3 else {1: 2.2, 2: 2.0}.get(r, 1.7)

    s = bench.score_task(fake_sweep(tmp_path, level_of=level_of))
    assert s["truth"]["r_star"] == 4
    assert s["best_lr"] == {"1": 3e-3, "2": 3e-3, "4": 1e-3, "8": 1e-3, "16": 1e-3}
    at = {row["lr"]: row for row in s["single_lr"]}
    assert at[3e-3]["r_rec"] == 1 and not at[3e-3]["acceptable"]
    assert at[1e-3]["r_rec"] == 4 and at[1e-3]["acceptable"]
    assert "| 0.003 | 1 |" in bench.markdown_tables([s], tmp_path)
    # pilots replayed: the nested probe's at the middle rank (4) and the SVD probe's at R (16)
    assert s["pilot_lr"] == {"svd": 1e-3, "nested": 1e-3}


def test_per_layer_baseline_rows(tmp_path):
    """A per-layer run is judged like a swept rank: its loss against L_best, its parameters
    against r*'s, and what it spent deciding (seconds at the sweep's pace, plus steps)."""
    task = fake_sweep(tmp_path, knee=4)
    sweep = bench.load_sweep(task)
    best = np.asarray(sweep["curve"]["4"]["per_example"])
    (task / "baselines").mkdir()

    def write(name, per_example, params, seconds, steps):
        runs = [{"seed": s, "per_example": (per_example + 0.001 * s).tolist()} for s in (0, 1)]
        (task / "baselines" / f"{name}.json").write_text(json.dumps(
            {"name": name, "rank_pattern": {"a": 4}, "trainable_params": params,
             "decide_seconds": seconds, "decide_steps": steps, "runs": runs}))

    write("fisher", best, 6000, 10.0, 0)  # as good as r*=4, 1.5x its parameters
    write("adalora", best * 1.2, 8000, 0.0, 20)  # 20% worse: clearly outside tolerance
    rows = {r["method"]: r for r in bench.score_task(task)["rows"]}
    fisher, ada = rows["Fisher diagonal (per layer)"], rows["PEFT AdaLoRA (per layer)"]
    assert fisher["acceptable"] and fisher["waste"] == pytest.approx(1.5)
    assert fisher["r_rec"] == pytest.approx(6.0)  # parameter-equivalent rank
    assert fisher["cost"] == pytest.approx(5 / 200)  # 10 s at 2 s/step
    assert not ada["acceptable"] and ada["regret"] == pytest.approx(0.2, abs=0.01)
    assert ada["cost"] == pytest.approx(20 / 200)


def test_probe_curve_agreement(tmp_path):
    task = fake_sweep(tmp_path, knee=4)
    (task / "estimators").mkdir()
    truth_L = bench.truth(bench.load_sweep(task)).L
    curve = {str(r): {"loss": v + 0.1, "se": 0.01} for r, v in truth_L.items()}
    (task / "estimators" / "probe.json").write_text(json.dumps(
        {"name": "svd-probe", "suggested_rank": 4, "cost_seconds": 40.0, "curve": curve}))
    s = bench.score_task(task)
    assert s["curve_agreement"]["svd-probe"] == pytest.approx(1.0)
    assert bench.spearman({1: 3.0, 2: 2.0, 4: 1.0}, {1: 1.0, 2: 2.0, 4: 3.0}) == \
        pytest.approx(-1.0)
    other = dict(s, task="other", curve_agreement={"svd-probe": 0.5})
    text = bench.markdown_tables([s, other], tmp_path)
    assert "svd-probe mean 0.75 (from 0.50 to 1.00, 2 tasks)" in text


def test_successive_halving_spends_less_than_the_sweep(tmp_path):
    sweep = bench.load_sweep(fake_sweep(tmp_path))
    pick, spent, n = bench.replay_successive_halving(sweep)
    assert pick in RANKS and spent < len(RANKS) * len(LRS) * STEPS and n == 10
    # rungs at steps 5, 10, 15, 20 over 10, 5, 2, 1 configs
    assert spent == 10 * 5 + 5 * 5 + 2 * 5 + 1 * 5
    # on a budget of 2 runs (40 steps): 4 configs cost 4*5 + 2*5 + 1*5 + 1*5 = 40, 5 cost 45
    pick, spent, n = bench.replay_successive_halving(sweep, budget_steps=2 * STEPS, seed=3)
    assert n == 4 and spent == 40 and pick in RANKS
    assert bench.replay_successive_halving(sweep, budget_steps=2 * STEPS, seed=3)[0] == pick
    assert bench.replay_successive_halving(sweep, budget_steps=1)[2] == 1  # at least one
    # a run outside the recipe's grid (a bracketing lr) is not a config to draw, even the best
    extra = dict(sweep["trials"][0], lr=LRS[0] / 4, rank=RANKS[0], number=999,
                 curve=[[step, 0.0, 0.0] for step in (5, 10, 15, 20)])
    widened = dict(sweep, trials=sweep["trials"] + [extra])
    assert bench.replay_successive_halving(widened) == bench.replay_successive_halving(sweep)


def test_tpe_replay_is_seeded(tmp_path):
    sweep = bench.load_sweep(fake_sweep(tmp_path))
    assert bench.replay_tpe(sweep, 3, seed=1) == bench.replay_tpe(sweep, 3, seed=1)
    assert bench.replay_tpe(sweep, 3)[1] == 3 * STEPS


def test_rule_of_thumb_table():
    assert bench.rule_of_thumb({"n_train": 300, "name": "format-json"}) == 8
    assert bench.rule_of_thumb({"n_train": 300, "name": "code-docstring"}) == 16
    assert bench.rule_of_thumb({"n_train": 6000, "name": "facts-6000"}) == 32
    assert bench.rule_of_thumb({"n_train": 20000, "name": "chat"}) == 32


def test_run_bench_writes_tables(tmp_path):
    fake_sweep(tmp_path)
    scored = bench.run_bench(tmp_path)
    md = tmp_path / "B.md"
    md.write_text("# B\n\nprotocol stays\n\n<!-- bench:start -->\nold\n<!-- bench:end -->\ntail\n")
    bench.update_markdown(md, bench.markdown_tables(scored, tmp_path))
    text = md.read_text()
    assert "protocol stays" in text and "tail" in text and "old" not in text
    assert "| fixed r=8 |" in text and (tmp_path / "toy" / "bench.png").exists()


def test_probe_curves_are_overlaid(tmp_path):
    """A stored probe's curve joins the sweep's in bench.png; unevaluated ranks are dropped."""
    task = fake_sweep(tmp_path)
    assert bench.probe_curves(task) == {}
    (task / "estimators").mkdir()
    (task / "estimators" / "svd-probe.json").write_text(json.dumps(
        {"name": "svd-probe", "suggested_rank": 4, "cost_seconds": 60.0,
         "curve": {"1": {"loss": 2.1, "se": 0.1}, "4": {"loss": 1.8, "se": 0.1},
                   "8": {"loss": float("nan"), "se": 0.0}}}))
    curves = bench.probe_curves(task)
    assert list(curves) == ["svd-probe (one run)"] and sorted(curves["svd-probe (one run)"]) == [1, 4]
    bench.run_bench(tmp_path)
    assert (task / "bench.png").stat().st_size > 0


def test_an_incomplete_sweep_is_listed_not_scored(tmp_path):
    """A worker that stops early still writes sweep.json; its partial curve must not become
    the truth (here rank 16 has no run, rank 8 one seed)."""
    from lorank.sweep import rank_loss_curve

    task = fake_sweep(tmp_path)
    sweep = json.loads((task / "sweep.json").read_text())
    sweep["trials"] = [t for t in sweep["trials"]
                       if t["rank"] != 16 and not (t["rank"] == 8 and t["seed"] == 1)]
    sweep["curve"] = {str(k): v for k, v in rank_loss_curve(sweep["trials"]).items()}
    (task / "sweep.json").write_text(json.dumps(sweep))
    gap = bench.sweep_gap(sweep)
    assert "no finished run at rank 16" in gap and "seeds at the best lr of rank 8" in gap
    with pytest.raises(LorankError, match="no sweep is complete yet.*toy"):
        bench.run_bench(tmp_path)
    other = tmp_path / "other"
    fake_sweep(other)
    (other / "toy").rename(tmp_path / "whole")
    scored = bench.run_bench(tmp_path)
    assert [s["task"] for s in scored] == ["whole"]
    text = bench.markdown_tables(scored, tmp_path)
    assert "Not scored yet, its sweep is incomplete: toy (no finished run at rank 16" in text


def test_no_sweep_is_one_clear_error(tmp_path):
    with pytest.raises(LorankError, match="no task has sweep.json"):
        bench.run_bench(tmp_path)


def gradient_details(replication: list[float], energy: float) -> dict:
    """Stored spectra of three layers: replication ranks by fraction (scaled by 1, 1/2, 1/4),
    every other rule flat at `energy`."""
    layers = []
    for scale in (1.0, 0.5, 0.25):
        ranks = {rule: [energy] * 3 for rule in ("gavish_donoho", "energy90", "energy95", "stable")}
        ranks["replication"] = [r * scale for r in replication]
        layers.append({"n_examples": [32, 64, 128], "ranks": ranks})
    return {"layers": layers, "n_train": 512, "max_rank": 64}


def test_gradient_rules_are_rescored_and_chosen_on_other_tasks(tmp_path):
    tasks = []
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        task = fake_sweep(tmp_path / name, knee=4).rename(tmp_path / f"task-{name}")
        (task / "estimators").mkdir()
        (task / "estimators" / "gradient.json").write_text(json.dumps(
            {"name": "gradient_spectrum", "suggested_rank": 64, "cost_seconds": 2.0,
             "details": gradient_details([1.0, 2.0, 4.0], energy=60.0)}))
        tasks.append(task)
    picks = bench.gradient_rule_picks(gradient_details([1.0, 2.0, 4.0], energy=60.0))
    assert picks["replication, q0.9, at calibration n"] == 4
    assert picks["replication, q0.5, at calibration n"] == 2  # median of 4, 2 and 1
    # growth 1 + r ~ n^0.66 from n=128 to 512: (1 + 4) * 4^0.66 - 1 = 11.5 -> power of two 16
    assert picks["replication, q0.9, extrapolated"] == 16
    assert picks["energy90, q0.9, at calibration n"] == 64
    scored = [bench.score_task(t) for t in tasks]
    held = bench.select_rule(scored)
    assert [h["task"] for h in held] == ["task-a", "task-b", "task-c"]
    assert all(h["rule"] == "replication, q0.9, at calibration n" for h in held)
    assert all(h["acceptable"] and h["fitted_on"] and h["task"] not in h["fitted_on"]
               for h in held)
    text = bench.markdown_tables(scored, tmp_path)
    assert "Leave one task out" in text and "energy90, q0.9, extrapolated" in text


def test_tpe_gets_the_compute_of_the_dearest_probe(tmp_path):
    task = fake_sweep(tmp_path, knee=4)
    (task / "estimators").mkdir()
    rows = {r["method"]: r for r in bench.score_task(task)["rows"]}
    assert "Optuna TPE (2 runs)" in rows  # no probe on disk: two runs
    # pilots of three lrs: the SVD probe's spent 0.3 runs and continues its winner's quarter
    # (0.2 runs extra), the nested probe's spent 0.5 runs at another rank (all of it extra)
    for name, runs, pilot in (("svd-probe", 1.2, {"seconds": 0.3 * STEPS, "continued": True}),
                              ("nested-probe", 2.6, {"seconds": 0.5 * STEPS})):
        pilot["losses"] = {"0.001": 1.0, "0.002": 0.9, "0.004": 1.1}
        (task / "estimators" / f"{name}.json").write_text(json.dumps(
            {"name": name, "suggested_rank": 4, "cost_seconds": 1.0,
             "details": {"cost": {"cost_steps": runs * STEPS, "cost_vs_one_run": runs,
                                  "one_run_steps": STEPS, "seconds_per_step": 1.0},
                         "lr_pilot": pilot}}))
    rows = {r["method"]: r for r in bench.score_task(task)["rows"]}
    assert rows["lorank svd-probe"]["cost_vs_one_run_without_pilot"] == pytest.approx(1.0)
    assert rows["lorank nested-probe"]["cost_vs_one_run_without_pilot"] == pytest.approx(2.1)
    tpe = rows["Optuna TPE (3 runs)"]
    assert tpe["cost"] == pytest.approx(3 * STEPS / bench.full_sweep_steps(bench.load_sweep(task)))
    assert bench.tpe_budget([1.0]) == 1 and bench.tpe_budget([0.2]) == 1


def test_overall_groups_searches_by_family_across_budgets(tmp_path):
    a, b = bench.score_task(fake_sweep(tmp_path / "a")), bench.score_task(fake_sweep(tmp_path / "b"))
    tpe = next(r for r in b["rows"] if r["method"].startswith("Optuna TPE"))
    tpe["method"] = "Optuna TPE (5 runs)"  # another task's probe bought another budget
    rows = {r["method"]: r for r in bench.overall([a, b])}
    assert rows["Optuna TPE (probe's budget)"]["tasks"] == 2
    assert rows["successive halving (all configs)"]["tasks"] == 2
    assert rows["fixed r=8"]["tasks"] == 2
