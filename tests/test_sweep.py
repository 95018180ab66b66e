"""Sweep: resumes after kill -9 with nothing lost or repeated; two workers share one study."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
from conftest import write_jsonl
from optuna.trial import TrialState

from lorank.errors import LorankError
from lorank.sweep import (
    FINISHED,
    SweepSpec,
    open_study,
    pop_trial,
    rank_loss_curve,
    recover_interrupted,
    storage_url,
)
from lorank.util import parse_list

GRID = ["--ranks", "1,2,4", "--lrs", "1e-3,3e-3", "--seeds", "0"]


@pytest.fixture
def sweep_inputs(tiny_llama_dir: Path, tmp_path: Path) -> tuple[str, str]:
    rows = [{"prompt": f"n{i}:", "completion": f" {i % 7}{i % 5}"} for i in range(48)]
    return str(tiny_llama_dir), str(write_jsonl(tmp_path / "d.jsonl", rows))


def sweep_cmd(model: str, data: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lorank.cli", "sweep", "-m", model, "-d", data, *GRID,
            "--steps", "6", "--batch-size", "4", "--max-length", "32", "--eval-every", "3",
            "--out", str(out), "--quiet", *extra]


def finished_points(out: Path) -> Counter:
    study = optuna.load_study(study_name="lorank-sweep", storage=f"sqlite:///{out / 'sweep.db'}")
    return Counter((p["rank"], p["lr"], p["seed"]) for t in study.get_trials()
                   if t.user_attrs.get(FINISHED) for p in [t.system_attrs["fixed_params"]])


def describe(out: Path) -> str:
    study = optuna.load_study(study_name="lorank-sweep", storage=f"sqlite:///{out / 'sweep.db'}")
    return "\n".join(f"{t.number} {t.state.name} {t.system_attrs.get('fixed_params')} "
                     f"{ {k: v for k, v in t.user_attrs.items() if k != 'per_example'} }"
                     for t in study.get_trials())


def test_resume_after_kill_9(sweep_inputs, tmp_path):
    model, data = sweep_inputs
    out = tmp_path / "sw"
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(sweep_cmd(model, data, out), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and len(list((out / "trials").glob("*.json"))
                                         if (out / "trials").exists() else []) < 2:
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {p.name: p.read_text() for p in (out / "trials").glob("*.json")}
    assert 2 <= len(before) < 6, "the kill must land mid-sweep"
    done = subprocess.run(sweep_cmd(model, data, out), capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    points = finished_points(out)
    assert len(points) == 6 and set(points.values()) == {1}, describe(out)  # none lost/repeated
    for name, text in before.items():  # finished trials were not re-run
        assert (out / "trials" / name).read_text() == text
    summary = json.loads((out / "sweep.json").read_text())
    assert sorted(int(r) for r in summary["curve"]) == [1, 2, 4]
    # both invocations were the same command: recorded once, to reproduce the results
    assert len(summary["commands"]) == 1
    assert summary["commands"][0].startswith("lorank sweep -m ") and "--ranks 1,2,4" in \
        summary["commands"][0]
    assert (out / "rank_loss.png").stat().st_size > 0
    assert (out / "learning_curves.png").stat().st_size > 0


def test_two_workers_share_one_study(sweep_inputs, tmp_path):
    model, data = sweep_inputs
    out = tmp_path / "shared"
    out.mkdir()
    procs = [subprocess.Popen(sweep_cmd(model, data, out), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    points = finished_points(out)
    assert len(points) == 6 and set(points.values()) == {1}


def test_recovery_spares_a_worker_that_starts_meanwhile(tmp_path, monkeypatch):
    """The CI race: while one worker lists the running trials, another registers and asks for
    a trial that has no pid yet. Recovery must see that worker and leave its trial alone."""
    study = open_study(tmp_path, None, prune=False)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        listing = study.get_trials

        def list_while_a_worker_starts(*args, **kwargs):
            trials = listing(*args, **kwargs)
            if not (tmp_path / "workers").exists():  # the other worker starts right now
                (tmp_path / "workers").mkdir()
                (tmp_path / "workers" / f"{socket.gethostname()}-{other.pid}").write_text("0")
                study.ask()
                trials = listing(*args, **kwargs)
            return trials

        monkeypatch.setattr(study, "get_trials", list_while_a_worker_starts)
        assert recover_interrupted(study, tmp_path) == 0
        assert [t.state for t in listing()] == [optuna.trial.TrialState.RUNNING]
        other.kill()
        other.wait()
        assert recover_interrupted(study, tmp_path) == 1  # once it is gone, its trial is failed
        assert [t.state for t in listing()] == [optuna.trial.TrialState.FAIL]
    finally:
        other.kill()


@pytest.mark.parametrize("locked,ordered", [(True, False), (True, True), (False, False)])
def test_two_workers_never_pop_the_same_waiting_trial(tmp_path, monkeypatch, locked, ordered):
    """The CI failure: SQLite ignores SELECT ... FOR UPDATE, so two workers reading a waiting
    trial at once both set it running and both run it. Interleave two pops at that point: with
    the host lock each trial is popped once (in the grid's order the second worker finds none
    left; `study.ask()` samples it a new one); without it (the control) the race is real."""
    url = storage_url(tmp_path, None)
    open_study(tmp_path, None, prune=False).enqueue_trial({"rank": 1, "lr": 1e-3, "seed": 0})
    read_waiting = [threading.Event(), threading.Event()]
    check = optuna.storages.BaseStorage.check_trial_is_updatable

    def check_then_wait(self, trial_id, state):  # runs between reading the row and writing it
        if state == optuna.trial.TrialState.WAITING:
            me = int(threading.current_thread().name)
            read_waiting[me].set()
            read_waiting[1 - me].wait(timeout=1.5)  # the other worker reads meanwhile, if it can
        return check(self, trial_id, state)

    monkeypatch.setattr(optuna.storages.BaseStorage, "check_trial_is_updatable", check_then_wait)
    popped: list[int] = []

    def worker() -> None:
        study = open_study(tmp_path, None, prune=False)
        spec = SweepSpec(ranks=[1], lrs=[1e-3]) if ordered else None
        trial = pop_trial(study, url, tmp_path, spec) if locked else study.ask()
        popped.append(trial._trial_id if trial is not None else None)  # None: none left

    threads = [threading.Thread(target=worker, name=str(i)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    taken = [p for p in popped if p is not None]
    assert (len(set(taken)) == len(taken) == (1 if ordered else 2)) is locked, popped


def test_interrupted_points_resume_first_then_grid_order(tmp_path):
    """A point whose killed run left a checkpoint is popped before the rest of the queue, and
    the rest follows the grid's seed-major order, not the order of enqueueing."""
    from lorank.sweep import checkpoint_dir

    spec = SweepSpec(ranks=[1, 2], lrs=[1e-3], seeds=[0, 1])
    study = open_study(tmp_path, None, prune=False)
    for point in reversed(spec.grid()):  # queued back to front, as re-enqueued points are
        study.enqueue_trial(point)
    checkpoint_dir(tmp_path, {"rank": 2, "lr": 1e-3, "seed": 1}).mkdir(parents=True)
    url = storage_url(tmp_path, None)
    popped = [pop_trial(study, url, tmp_path, spec) for _ in range(4)]
    order = [(p["rank"], p["seed"]) for t in popped
             for p in [study._storage.get_trial_system_attrs(t._trial_id)["fixed_params"]]]
    assert order == [(2, 1), (1, 0), (2, 0), (1, 1)]
    assert not study.get_trials(states=(TrialState.WAITING,))


def test_parse_list_errors():
    assert parse_list("1, 2,4", int, "ranks") == [1, 2, 4]
    with pytest.raises(LorankError, match="--ranks: empty list"):
        parse_list(" , ", int, "ranks")
    with pytest.raises(LorankError, match="expected comma-separated int"):
        parse_list("1,two", int, "ranks")
    with pytest.raises(LorankError, match="learning rates must be positive"):
        parse_list("0,1e-3", float, "lrs")


def test_storage_that_cannot_be_opened(tmp_path):
    with pytest.raises(LorankError, match="cannot open the study storage"):
        open_study(tmp_path, "postgresql://nobody@127.0.0.1:1/none", prune=False)
    with pytest.raises(LorankError, match="cannot open the study storage"):
        open_study(tmp_path, "notadb://x", prune=False)


def test_rank_loss_curve_takes_best_lr_by_seed_mean():
    def t(rank, lr, seed, losses):
        return {"rank": rank, "lr": lr, "seed": seed, "status": "ok", "per_example": losses}

    trials = [t(1, 0.1, 0, [2.0, 2.0]), t(1, 0.1, 1, [2.2, 2.2]),
              t(1, 0.3, 0, [1.0, 1.0]), t(1, 0.3, 1, [3.0, 3.0]),  # mean 2.0 < 2.1
              t(2, 0.1, 0, [1.0, 1.2]), {"rank": 2, "lr": 0.3, "seed": 0,
                                        "status": "diverged: nan", "per_example": [0.0, 0.0]}]
    curve = rank_loss_curve(trials)
    assert curve[1]["lr"] == 0.3 and curve[1]["loss"] == pytest.approx(2.0)
    assert curve[1]["seed_sd"] == pytest.approx(abs(1.0 - 3.0) / 2 ** 0.5)
    assert curve[2]["lr"] == 0.1 and curve[2]["seeds"] == 1  # the diverged run is ignored


def test_cli_bad_ranks_exit_2(sweep_inputs, tmp_path):
    model, data = sweep_inputs
    cmd = sweep_cmd(model, data, tmp_path / "x")
    cmd[cmd.index("1,2,4")] = "1,x"
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--ranks 1,x: expected comma-separated int" in done.stderr


@pytest.mark.parametrize("extra, message", [
    (["--task", "no-such-task"], "--task no-such-task: unknown task; known: "),
    (["--storage", "notadb://x"], "--storage notadb://x: cannot open the study storage"),
])
def test_cli_bad_task_or_storage_exit_2(sweep_inputs, tmp_path, extra, message):
    model, data = sweep_inputs
    done = subprocess.run(sweep_cmd(model, data, tmp_path / "x", *extra), capture_output=True,
                          text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert message in " ".join(done.stderr.split()), done.stderr


def test_prune_stops_a_run_behind_the_first(sweep_inputs, tmp_path):
    """Successive halving (reduction factor 2): a second run that reports a worse loss than the
    first did at the same step stops there (before its last step), is stored as pruned, and
    stays out of the curve."""
    model, data = sweep_inputs
    out = tmp_path / "pruned"
    cmd = sweep_cmd(model, data, out, "--prune")
    cmd[cmd.index("1,2,4")] = "1"
    cmd[cmd.index("1e-3,3e-3")] = "3e-3,1e-7"
    cmd[cmd.index("--steps") + 1] = "12"
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "sweep.json").read_text())
    first, second = (next(t for t in summary["trials"] if t["lr"] == lr) for lr in (3e-3, 1e-7))
    assert first["status"] == "ok" and first["steps_done"] == 12
    assert second["status"] == "pruned" and second["steps_done"] < 12, second["curve"]
    stop, _, loss = second["curve"][-1]
    assert stop == second["steps_done"] and loss > dict((s, v) for s, _, v in first["curve"])[stop]
    assert summary["curve"]["1"]["lr"] == 3e-3


def test_grid_can_grow(sweep_inputs, tmp_path):
    """A second run with another learning rate adds only the new points."""
    model, data = sweep_inputs
    out = tmp_path / "grow"
    small = sweep_cmd(model, data, out)
    small[small.index("1,2,4")] = "1"
    small[small.index("1e-3,3e-3")] = "1e-3"
    assert subprocess.run(small, capture_output=True).returncode == 0
    small[small.index("1e-3")] = "1e-3,3e-3"
    done = subprocess.run(small, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert finished_points(out) == Counter({(1, 1e-3, 0): 1, (1, 3e-3, 0): 1})


def test_narrower_grid_skips_queued_points_outside_it(sweep_inputs, tmp_path):
    """Points queued by an earlier, wider grid are retired, not trained, by a worker whose grid
    lacks them; a later worker whose grid has them queues and trains them again."""
    model, data = sweep_inputs
    out = tmp_path / "narrow"
    cmd = sweep_cmd(model, data, out)
    cmd[cmd.index("1,2,4")] = "1"
    wide = [*cmd, "--max-trials", "1"]  # trains (1, 1e-3), leaves (1, 3e-3) queued
    assert subprocess.run(wide, capture_output=True).returncode == 0
    narrow = list(cmd)
    narrow[narrow.index("1e-3,3e-3")] = "1e-3"
    done = subprocess.run(narrow, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert finished_points(out) == Counter({(1, 1e-3, 0): 1}), describe(out)
    assert "skipped: outside this worker's grid" in describe(out)
    other = list(cmd)
    other[other.index("1e-3,3e-3")] = "3e-3"
    assert subprocess.run(other, capture_output=True).returncode == 0
    assert finished_points(out) == Counter({(1, 1e-3, 0): 1, (1, 3e-3, 0): 1}), describe(out)


def test_a_killed_run_resumes_from_its_checkpoint(sweep_inputs, tmp_path, monkeypatch):
    """A run killed after its first evaluation resumes there (not from step 0) in the trial
    that re-runs its point, and ends where an uninterrupted run of that point ends."""
    from transformers import TrainerCallback

    import lorank.api as api
    import lorank.sweep as sweep_mod
    from lorank.sweep import liveness, trial_run

    model, data = sweep_inputs
    kw = dict(ranks=[2], lrs=[3e-3], seeds=[0], steps=6, batch_size=4, eval_every=3,
              max_length=32, progress=False)
    whole = api.sweep(model, data, out=tmp_path / "whole", **kw).trials[0]

    class Kill(TrainerCallback):  # dies after the step-3 checkpoint, as kill -9 would
        def on_step_end(self, args, state, control, **_):
            if state.global_step == 4:
                raise KeyboardInterrupt("killed")

    class Steps(TrainerCallback):
        trained: list[int] = []

        def on_step_end(self, args, state, control, **_):
            self.trained.append(state.global_step)

    real, calls = trial_run.train_lora, []

    def killed_once(*a, **k):
        calls.append(k.get("out_dir"))
        k["callbacks"] = [Kill()] if len(calls) == 1 else [Steps()]
        return real(*a, **k)

    monkeypatch.setattr(trial_run, "train_lora", killed_once)  # looked up there
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        api.sweep(model, data, out=out, **kw)
    point = {"rank": 2, "lr": 3e-3, "seed": 0}
    assert (sweep_mod.checkpoint_dir(out, point) / "checkpoint-3").is_dir()
    monkeypatch.setattr(liveness, "_alive", lambda pid: False)  # its worker is gone
    resumed = api.sweep(model, data, out=out, **kw).trials[0]
    assert calls == [sweep_mod.checkpoint_dir(out, point)] * 2
    assert Steps.trained == [4, 5, 6]  # from the step-3 checkpoint, not from the start
    assert not sweep_mod.checkpoint_dir(out, point).exists()  # removed once stored
    assert [c[0] for c in resumed["curve"]] == [c[0] for c in whole["curve"]] == [3, 6]
    assert resumed["value"] == pytest.approx(whole["value"], rel=1e-5)
    assert resumed["per_example"] == pytest.approx(whole["per_example"], rel=1e-5)
    assert finished_points(out) == Counter({(2, 3e-3, 0): 1})


def test_recommend_decides_from_a_sweep_of_the_same_data(sweep_inputs, tmp_path):
    import lorank.api as api
    from lorank.scoring import curve_right_rank

    model, data = sweep_inputs
    out = tmp_path / "sw"
    result = api.sweep(model, data, ranks=[1, 2, 4], lrs=[3e-3], seeds=[0, 1], steps=6,
                       batch_size=4, eval_every=3, max_length=32, out=out, progress=False,
                       lora_alpha=16.0)
    right = curve_right_rank(result.curve)
    rec = api.recommend(model, data, sweep=out, estimators=("capacity",), max_length=32,
                        progress=False, out=tmp_path / "rec")
    assert rec.rank == right.r_star
    exported = json.loads((tmp_path / "rec" / "adapter_config.json").read_text())
    assert exported["lora_alpha"] == 16.0 and exported["use_rslora"]  # the sweep's rule
    sweep_ev = next(e for e in rec.evidence if e["name"] == "sweep")
    assert sweep_ev["suggested_rank"] == right.r_star and sweep_ev["kind"] == "curve"
    assert sorted(int(r) for r in sweep_ev["curve"]) == [1, 2, 4]
    assert sweep_ev["details"]["confidence"] == "high"  # complete grid, two seeds per rank
    assert rec.rationale[0].startswith("sweep: smallest rank within tolerance")
    # a sweep of other data is refused with one line naming the file
    other = write_jsonl(tmp_path / "other.jsonl",
                        [{"prompt": f"m{i}:", "completion": f" {i % 3}"} for i in range(48)])
    with pytest.raises(LorankError, match=r"sweep\.json: this sweep was run on other data"):
        api.recommend(model, str(other), sweep=out, estimators=("capacity",), max_length=32,
                      progress=False)


def test_gradient_checkpointing_changes_memory_not_losses(sweep_inputs, tmp_path):
    import lorank.api as api

    model, data = sweep_inputs
    kw = dict(ranks=[2], lrs=[3e-3], seeds=[0], steps=4, batch_size=4, eval_every=2,
              max_length=32, progress=False)
    plain = api.sweep(model, data, out=tmp_path / "plain", **kw)
    recomputed = api.sweep(model, data, out=tmp_path / "gc", gradient_checkpointing=True, **kw)
    spec = json.loads((tmp_path / "gc" / "sweep.json").read_text())["spec"]
    assert spec["recipe"]["gradient_checkpointing"] is True
    assert "gradient_checkpointing" not in json.loads(
        (tmp_path / "plain" / "sweep.json").read_text())["spec"]["recipe"]
    assert recomputed.curve[2]["loss"] == pytest.approx(plain.curve[2]["loss"], rel=1e-4)


def test_recommend_with_a_missing_sweep_exits_2(sweep_inputs, tmp_path):
    model, data = sweep_inputs
    done = subprocess.run([sys.executable, "-m", "lorank.cli", "recommend", "-m", model,
                           "-d", data, "--sweep", str(tmp_path / "none"), "--out",
                           str(tmp_path / "o"), "--quiet"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "sweep.json: not found (run `lorank sweep --out" in done.stderr


def test_dominated_reason_skips_only_a_clear_first_seed_loser():
    from lorank.sweep import SweepSpec, dominated_reason

    spec = SweepSpec(ranks=[4], lrs=[1e-3, 4e-3, 8e-3], seeds=[0, 1], skip_margin=0.5)

    def run(lr, value, status="ok", seed=0, rank=4):
        return {"rank": rank, "lr": lr, "seed": seed, "status": status, "value": value}

    first = [run(1e-3, 2.0), run(4e-3, 1.2), run(8e-3, 1.6)]
    point = {"rank": 4, "seed": 1}
    assert "gap 0.800 > 0.5" in dominated_reason(first, spec, point | {"lr": 1e-3})
    assert dominated_reason(first, spec, point | {"lr": 8e-3}) is None  # within the margin
    assert dominated_reason(first, spec, point | {"lr": 4e-3}) is None  # the best itself
    assert dominated_reason(first, spec, {"rank": 4, "seed": 0, "lr": 1e-3}) is None
    assert dominated_reason(first[:2], spec, point | {"lr": 1e-3}) is None  # 8e-3 not done
    assert dominated_reason(first, spec, {"rank": 8, "seed": 1, "lr": 1e-3}) is None
    diverged = [run(1e-3, None, "diverged"), *first[1:]]
    assert dominated_reason(diverged, spec, point | {"lr": 1e-3}) is None
    off = SweepSpec(ranks=[4], lrs=spec.lrs, seeds=[0, 1])
    assert dominated_reason(first, off, point | {"lr": 1e-3}) is None


def test_a_sweep_skips_the_second_seed_of_a_dominated_lr(sweep_inputs, tmp_path):
    """With a margin of 0 every lr that lost at seed 0 is settled at seed 1 without training;
    the curve keeps the winner's two seeds and the skip is recorded like a run."""
    import lorank.api as api

    model, data = sweep_inputs
    out = tmp_path / "skip"
    result = api.sweep(model, data, ranks=[2], lrs=[1e-4, 3e-3], seeds=[0, 1], steps=6,
                       batch_size=4, eval_every=3, max_length=32, skip_margin=0.0, out=out,
                       progress=False)
    by_point = {(t["lr"], t["seed"]): t for t in result.trials}
    assert len(by_point) == 4
    winner = min((1e-4, 3e-3), key=lambda lr: by_point[(lr, 0)]["value"])
    loser = 1e-4 if winner == 3e-3 else 3e-3
    assert by_point[(winner, 1)]["status"] == "ok"
    assert by_point[(loser, 1)]["status"].startswith("skipped: dominated (seed 0")
    assert by_point[(loser, 1)]["wall_seconds"] == 0.0
    assert result.curve[2]["lr"] == winner and result.curve[2]["seeds"] == 2
    stored = json.loads((out / "trials" / f"r2_lr{loser:g}_s1.json").read_text())
    assert stored["status"] == by_point[(loser, 1)]["status"]
    again = api.sweep(model, data, ranks=[2], lrs=[1e-4, 3e-3], seeds=[0, 1], steps=6,
                      batch_size=4, eval_every=3, max_length=32, skip_margin=0.0, out=out,
                      progress=False)
    assert finished_points(out) == Counter({(2, lr, s): 1 for lr in (1e-4, 3e-3) for s in (0, 1)})
    assert len(again.trials) == 4


def test_a_skip_is_withdrawn_when_its_lr_becomes_the_rank_best():
    """If the first-seed winner's later seed does badly, the skipped lr leads by seed mean: the
    skip no longer counts as finished, its point is enqueued again and is not skipped again."""
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import create_trial

    from lorank.sweep import (
        SKIPPED,
        SweepSpec,
        dominated_reason,
        enqueue_missing,
        finished_records,
    )

    spec = SweepSpec(ranks=[4], lrs=[1e-3, 4e-3], seeds=[0, 1], skip_margin=0.5)
    dist = {"rank": CategoricalDistribution([4]), "lr": CategoricalDistribution([1e-3, 4e-3]),
            "seed": CategoricalDistribution([0, 1])}
    skipped = {"rank": 4, "lr": 1e-3, "seed": 1}

    def study_with(winner_seed_1: float) -> optuna.Study:
        study = optuna.create_study()
        for lr, seed, value in ((1e-3, 0, 2.0), (4e-3, 0, 1.2), (4e-3, 1, winner_seed_1)):
            study.add_trial(create_trial(
                params={"rank": 4, "lr": lr, "seed": seed}, distributions=dist, value=value,
                user_attrs={FINISHED: True, "status": "ok"}))
        study.add_trial(create_trial(
            params=skipped, distributions=dist, state=TrialState.FAIL,
            user_attrs={FINISHED: True, "status": f"{SKIPPED} (seed 0: ...)"}))
        return study

    holds = study_with(1.3)  # the winner holds: seed mean 1.25 against 2.0
    assert len(finished_records(holds)) == 4 and enqueue_missing(holds, spec) == 0
    stale = study_with(3.0)  # its second seed diverges: seed mean 2.1 against 2.0
    records = finished_records(stale)
    assert len(records) == 3 and all(r["status"] == "ok" for r in records)
    assert dominated_reason(records, spec, skipped) is None
    assert enqueue_missing(stale, spec) == 1
    assert stale.get_trials(states=(TrialState.WAITING,))[0].system_attrs["fixed_params"] == skipped
