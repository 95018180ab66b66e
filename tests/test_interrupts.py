"""Interrupts keep work: Ctrl-C (SIGINT) or SIGTERM during `analyze`, `probe` and `sweep` leaves
every finished piece on disk, and the same command run again continues from it: the base
loss, the gradient spectrum and the probe's curve are reused (kept in OUT/cache/ under a key of
model, data and options), a probe's finished pilot runs and checkpoints are not trained again,
and a sweep does not repeat its finished trials. Any change of model, data or options measures
again. A run that fails leaves no empty output folder behind.

The interrupted commands are real processes, forked from a server that imported torch and
lorank once (`interrupt_worker`), paced so that the signal lands at a known point.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import interrupt_worker
import optuna
import pytest
from conftest import write_jsonl

from lorank import api, cli
from lorank.sweep import FINISHED
from lorank.util import Kept, content_hash

TESTS = str(Path(__file__).resolve().parent)


@pytest.fixture(scope="module")
def forkserver():
    """Commands fork from one process that imported everything (`interrupt_worker`); it
    imports from PYTHONPATH (this checkout's src and tests), taken from the environment when
    it starts, which the first Process does."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["interrupt_worker"])
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([interrupt_worker.SRC, TESTS,
                                                *([saved] if saved else [])])
    try:
        ready = ctx.Process(target=os.getpid)
        ready.start()
        ready.join()
    finally:
        if saved is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = saved
    return ctx


class Command:
    """One `lorank` command in its own process: start, wait for a point, signal, read output."""

    def __init__(self, ctx, tmp: Path, name: str, argv: list[str], **env: str):
        self.stdout, self.stderr = tmp / f"{name}.out", tmp / f"{name}.err"
        self.mark = tmp / f"{name}.paused"
        env = {"TOKENIZERS_PARALLELISM": "false", "PAUSE_MARK": str(self.mark), **env}
        self.proc = ctx.Process(target=interrupt_worker.run,
                                args=(argv, env, str(self.stdout), str(self.stderr)))
        self.proc.start()

    def wait_paused(self, timeout: float = 120.0) -> None:
        deadline = time.time() + timeout
        while not self.mark.exists():
            assert self.proc.is_alive(), f"ended before its pause:\n{self.output()}"
            assert time.time() < deadline, "never reached its pause"
            time.sleep(0.05)

    def finish(self, timeout: float = 300.0) -> int:
        self.proc.join(timeout)
        assert self.proc.exitcode is not None, "still running"
        return self.proc.exitcode

    def output(self) -> str:
        read = [p.read_text() if p.exists() else "" for p in (self.stdout, self.stderr)]
        return "\n".join(read)


def run_command(ctx, tmp: Path, name: str, argv: list[str], **env: str) -> str:
    """Run a command to its end; its stdout (it must succeed)."""
    command = Command(ctx, tmp, name, argv, **env)
    assert command.finish() == 0, command.output()
    return command.stdout.read_text()


def interrupt(ctx, tmp: Path, name: str, argv: list[str], sig: int, **env: str) -> Command:
    """Start a command, send `sig` once it pauses; it must exit with one line and 128 + sig."""
    command = Command(ctx, tmp, name, argv, **env)
    command.wait_paused()
    os.kill(command.proc.pid, sig)
    assert command.finish(60) == 128 + sig, command.output()
    # (a library's own warning may come before it: transformers on checkpoint mtimes)
    err = [ln for ln in command.stderr.read_text().splitlines() if ln.strip()]
    assert "Traceback" not in command.output(), command.output()
    assert [ln for ln in err if ln.startswith("interrupted")] == err[-1:], command.output()
    assert "finished work is kept" in err[-1]
    return command


def recommendation(out: Path) -> dict:
    """recommendation.json with each evidence entry whole again (bulky parts live in
    evidence/<name>.json) and without the list of reused measurements."""
    rec = json.loads((out / "recommendation.json").read_text())
    rec["inputs"].pop("reused")
    rec["evidence"] = [json.loads((out / e["evidence_file"]).read_text()) if "evidence_file" in e
                       else e for e in rec["evidence"]]
    return rec


def whole_evidence(out: Path, name: str) -> dict:
    """An estimator's whole evidence, as `lorank.export` writes it to OUT/evidence/NAME.json."""
    return json.loads((out / "evidence" / f"{name}.json").read_text())


def steps_by(log: Path, pid: int) -> Counter:
    """Training steps a process took, per run name."""
    rows = [ln.split() for ln in log.read_text().splitlines()] if log.exists() else []
    return Counter(name for p, name, _ in rows if int(p) == pid)


# ------------------------------------------------------------------------------------ analyze


def test_sigint_during_analyze_keeps_the_base_loss(forkserver, tiny_llama_dir, pc_data,
                                                   tmp_path):
    """Ctrl-C while the gradient spectrum is measured: the base loss, measured before it, is
    kept; the rerun reuses it (the file untouched), then a third run reuses the spectrum too,
    and the results equal an uninterrupted run's. Another --calib measures the spectrum again."""
    def argv(out: Path, *extra: str) -> list[str]:
        # one layer group: one plot to draw (the plots take longer than the measurements)
        return ["analyze", "-m", str(tiny_llama_dir), "-d", str(pc_data), "--calib", "24",
                "--targets", "q_proj", "--max-length", "64", "--quiet", "--out", str(out),
                *extra]

    run_command(forkserver, tmp_path, "reference", argv(tmp_path / "ref"))
    out = tmp_path / "run"
    interrupt(forkserver, tmp_path, "interrupted", argv(out), signal.SIGINT,
              PAUSE_GRADIENT="1")
    base = list((out / "cache").glob("base-model-*.json"))
    assert len(base) == 1 and not list((out / "cache").glob("gradient-*"))
    assert not (out / "recommendation.json").exists()
    mtime = base[0].stat().st_mtime_ns

    text = run_command(forkserver, tmp_path, "rerun", argv(out))
    assert f"reused base loss from {base[0]}" in text and "reused gradient" not in text
    assert base[0].stat().st_mtime_ns == mtime
    ref, rerun = recommendation(tmp_path / "ref"), recommendation(out)
    assert rerun["rank"] == ref["rank"]
    assert rerun["inputs"]["profile"]["base_loss_nats"] == ref["inputs"]["profile"][
        "base_loss_nats"]
    for key in ("suggested_rank", "interval", "rank_pattern"):
        assert rerun["evidence"][0][key] == ref["evidence"][0][key]
    # the per-layer table is bulky: it lives in evidence/gradient.json, not recommendation.json
    assert whole_evidence(out, "gradient")["details"]["layers"] == whole_evidence(
        tmp_path / "ref", "gradient")["details"]["layers"]

    spectrum = next((out / "cache").glob("gradient-*.json"))
    kept = spectrum.stat().st_mtime_ns
    text = run_command(forkserver, tmp_path, "third", argv(out))
    assert f"reused gradient spectrum from {spectrum}" in text and "reused base loss" in text
    assert spectrum.stat().st_mtime_ns == kept
    assert recommendation(out) == rerun  # the very same result, timings included

    text = run_command(forkserver, tmp_path, "calib", argv(out, "--calib", "16"))
    assert "reused base loss" in text and "reused gradient" not in text
    assert len(list((out / "cache").glob("gradient-*.json"))) == 2


# -------------------------------------------------------------------------------------- probe


def test_sigterm_during_probe_keeps_the_pilot_and_the_curve(forkserver, tiny_llama_dir,
                                                            pc_data, tmp_path):
    """SIGTERM in the second lr's pilot run: the first lr's finished pilot run is kept and not
    trained again, the probe ends as an uninterrupted one does, and a third run reuses the
    finished probe's curve without training at all."""
    def argv(out: Path) -> list[str]:
        return ["probe", "-m", str(tiny_llama_dir), "-d", str(pc_data), "--probe-rank", "4",
                "--budget", "8", "--lr", "2e-3,1e-3", "--max-length", "64", "--quiet",
                "--out", str(out)]

    log = tmp_path / "steps.log"
    run_command(forkserver, tmp_path, "reference", argv(tmp_path / "ref"), STEP_LOG=str(log))
    out = tmp_path / "run"
    # runs: pilot at lr 1e-3 (2 steps), pilot at lr 2e-3 (2 steps), then the winner continues
    first = interrupt(forkserver, tmp_path, "interrupted", argv(out), signal.SIGTERM,
                      STEP_LOG=str(log), PAUSE_RUN="2")
    assert steps_by(log, first.proc.pid) == {"lr0.001": 2, "lr0.002": 1}
    losses = json.loads((out / "probe_checkpoint" / api.PILOT_LOSSES).read_text())
    assert list(losses) == ["0.001"]

    rerun = Command(forkserver, tmp_path, "rerun", argv(out), STEP_LOG=str(log))
    assert rerun.finish() == 0, rerun.output()
    assert "reused base loss" in rerun.stdout.read_text()
    trained = steps_by(log, rerun.proc.pid)
    assert "lr0.001" not in trained and sum(trained.values()) == 8  # 2 pilot + 6 continued
    assert not (out / "probe_checkpoint").exists()
    ref, resumed = (next(e for e in recommendation(d)["evidence"] if e["name"] == "svd-probe")
                    for d in (tmp_path / "ref", out))
    assert resumed["suggested_rank"] == ref["suggested_rank"]
    assert resumed["details"]["learning_rate"] == ref["details"]["learning_rate"]
    assert resumed["details"]["lr_pilot"]["losses"] == pytest.approx(
        ref["details"]["lr_pilot"]["losses"], rel=1e-6)
    for r, point in ref["curve"].items():
        assert resumed["curve"][r]["loss"] == pytest.approx(point["loss"], rel=1e-6)
    assert any("continued the interrupted probe" in n for n in resumed["notes"])

    third = Command(forkserver, tmp_path, "third", argv(out), STEP_LOG=str(log))
    assert third.finish() == 0, third.output()
    assert "reused probe curve from" in third.stdout.read_text()
    assert not steps_by(log, third.proc.pid)
    assert next(e for e in recommendation(out)["evidence"] if e["name"] == "svd-probe") \
        == resumed  # the very same curve, its notes and cost included


# -------------------------------------------------------------------------------------- sweep


def test_sigterm_during_sweep_resumes_without_repeating_trials(forkserver, tiny_llama_dir,
                                                               tmp_path):
    """SIGTERM while the second point trains: the first point's trial stays finished and is not
    run again; the rerun finishes the grid with each point once, as an uninterrupted sweep."""
    rows = [{"prompt": f"n{i}:", "completion": f" {i % 7}{i % 5}"} for i in range(48)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)

    def argv(out: Path) -> list[str]:
        return ["sweep", "-m", str(tiny_llama_dir), "-d", str(data), "--ranks", "1,2",
                "--lrs", "1e-3", "--seeds", "0", "--steps", "4", "--batch-size", "4",
                "--max-length", "32", "--eval-every", "2", "--quiet", "--out", str(out)]

    log = tmp_path / "steps.log"
    run_command(forkserver, tmp_path, "reference", argv(tmp_path / "ref"))
    out = tmp_path / "run"
    first = interrupt(forkserver, tmp_path, "interrupted", argv(out), signal.SIGTERM,
                      STEP_LOG=str(log), PAUSE_RUN="2", PAUSE_STEP="3")
    finished = {p.name: p.read_text() for p in (out / "trials").glob("*.json")}
    assert len(finished) == 1
    done_point = next(iter(finished)).removesuffix(".json")
    assert steps_by(log, first.proc.pid)[done_point] == 4

    rerun = Command(forkserver, tmp_path, "rerun", argv(out), STEP_LOG=str(log))
    assert rerun.finish() == 0, rerun.output()
    trained = steps_by(log, rerun.proc.pid)
    assert done_point not in trained  # the finished trial is not run again
    assert sum(trained.values()) == 2  # the other resumed from its checkpoint at step 2
    for name, text in finished.items():
        assert (out / "trials" / name).read_text() == text
    study = optuna.load_study(study_name="lorank-sweep", storage=f"sqlite:///{out / 'sweep.db'}")
    points = Counter((p["rank"], p["lr"]) for t in study.get_trials()
                     if t.user_attrs.get(FINISHED) for p in [t.system_attrs["fixed_params"]])
    assert points == {(1, 1e-3): 1, (2, 1e-3): 1}
    ref = json.loads((tmp_path / "ref" / "sweep.json").read_text())["curve"]
    got = json.loads((out / "sweep.json").read_text())["curve"]
    assert sorted(got) == sorted(ref)
    for r in ref:
        assert got[r]["loss"] == pytest.approx(ref[r]["loss"], rel=1e-6)


# ------------------------------------------------------------------ in-process: keys and folders


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["lorank", *args])
    try:
        cli.main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def test_kept_is_reused_only_for_the_same_key(tmp_path):
    kept = Kept(tmp_path / "cache", {"model": {"files": [["a", 1, 2]]}})
    assert kept.load("m", {"x": 1}, "thing") is None
    path = kept.store("m", {"x": 1, "y": [1, 2]}, {"value": 3.5})
    assert path is not None and path.parent == tmp_path / "cache"
    assert Kept(tmp_path / "cache", kept.common).load("m", {"y": [1, 2], "x": 1}, "thing") \
        == {"value": 3.5}
    assert Kept(tmp_path / "cache", kept.common).load("m", {"x": 2, "y": [1, 2]}, "t") is None
    other = Kept(tmp_path / "cache", {"model": {"files": [["a", 1, 3]]}})  # the file changed
    assert other.load("m", {"x": 1, "y": [1, 2]}, "thing") is None
    assert content_hash({"a": 1, "b": 2}) == content_hash({"b": 2, "a": 1})
    assert Kept(None).load("m", {}, "t") is None and Kept(None).store("m", {}, 1) is None


def test_changed_model_or_data_measures_again(tiny_llama_dir, pc_data, tmp_path, one_thread):
    """The kept measurements belong to the model's files and the data's content."""
    kw = dict(max_length=64, estimators=("gradient",), calib=24, targets="q_proj",
              progress=False, out=tmp_path / "out")
    first = api.recommend(str(tiny_llama_dir), pc_data, **kw)
    assert first.inputs["reused"] == []
    again = api.recommend(str(tiny_llama_dir), pc_data, **kw)
    assert [r.split(" from ")[0] for r in again.inputs["reused"]] == [
        "reused base loss", "reused gradient spectrum"]
    assert again.evidence == first.evidence
    # keyed by the examples each measurement reads: another answer in every record
    rows = [json.loads(ln) | {"completion": " 1"} for ln in pc_data.read_text().splitlines()]
    other = write_jsonl(tmp_path / "other.jsonl", rows)
    assert api.recommend(str(tiny_llama_dir), other, **kw).inputs["reused"] == []
    config = tiny_llama_dir / "config.json"
    config.write_text(config.read_text() + "\n")  # same model, but its files changed
    assert api.recommend(str(tiny_llama_dir), pc_data, **kw).inputs["reused"] == []


def test_failed_run_leaves_no_empty_output_folder(monkeypatch, capsys, tiny_llama_dir, pc_data,
                                                  tmp_path):
    out = tmp_path / "new"
    code, _, err = run_cli(monkeypatch, capsys, "analyze", "-m", str(tiny_llama_dir), "-d",
                           str(tmp_path / "missing.jsonl"), "--out", str(out), "--quiet")
    assert code == 2 and not out.exists(), err
    mine = tmp_path / "mine"  # a folder the user made stays, even empty
    mine.mkdir()
    code, _, _ = run_cli(monkeypatch, capsys, "sweep", "-m", str(tiny_llama_dir), "-d",
                         str(tmp_path / "missing.jsonl"), "--out", str(mine), "--quiet")
    assert code == 2 and mine.is_dir()
    code, _, _ = run_cli(monkeypatch, capsys, "sweep", "-m", str(tiny_llama_dir), "-d",
                         str(tmp_path / "missing.jsonl"), "--out", str(out), "--quiet")
    assert code == 2 and not out.exists()

    import lorank.data

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lorank.data, "profile", interrupted)  # before anything finished
    code, _, err = run_cli(monkeypatch, capsys, "probe", "-m", str(tiny_llama_dir), "-d",
                           str(pc_data), "--out", str(out), "--quiet")
    assert code == 130 and "Traceback" not in err and not out.exists()


def test_a_classifier_reuses_its_head_loss_and_spectrum(tiny_bert_dir, cls_data, tmp_path,
                                                        one_thread):
    """A classifier's kept measurements: forward speed, frozen-feature head loss, the spectrum
    read after the head fit; the rerun's evidence equals the first run's."""
    kw = dict(estimators=("capacity", "gradient"), calib=16, targets="query", progress=False,
              out=tmp_path / "out")
    first = api.recommend(str(tiny_bert_dir), cls_data, **kw)
    again = api.recommend(str(tiny_bert_dir), cls_data, **kw)
    assert first.inputs["reused"] == []
    assert [r.split(" from ")[0] for r in again.inputs["reused"]] == [
        "reused forward speed", "reused frozen-feature head loss", "reused gradient spectrum"]
    # capacity's own arithmetic (microseconds) is timed anew; everything else is as measured
    costs = [[e.pop("cost_seconds") for e in rec.evidence] for rec in (first, again)]
    assert costs[1] == pytest.approx(costs[0], abs=0.05)
    assert again.evidence == first.evidence
