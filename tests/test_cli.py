"""The CLI: every bad input gets one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import write_jsonl

from lorank import cli


def run(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """`lorank ARGS` in this process: (exit code, stdout, stderr) of the command alone."""
    monkeypatch.setattr(sys, "argv", ["lorank", *args])
    capsys.readouterr()  # what was printed before the command is not its output
    code = 0
    try:
        cli.main()
    except SystemExit as exit_:
        code = exit_.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, pattern: str) -> None:
    import re

    assert code == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    joined = " ".join(lines)
    assert re.search(pattern, joined), joined


@pytest.fixture
def model_dir(tiny_llama_dir):
    return str(tiny_llama_dir)


def test_missing_data_file(monkeypatch, capsys, model_dir, tmp_path):
    code, _, err = run(monkeypatch, capsys, "recommend", "-m", model_dir, "-d", "missing.jsonl",
                       "--out", str(tmp_path / "o"), "--quiet")
    assert_one_line_error(code, err, "data file not found: missing.jsonl")


def test_malformed_json(monkeypatch, capsys, model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": "b"}\n{"text": \n')
    code, _, err = run(monkeypatch, capsys, "recommend", "-m", model_dir, "-d", str(bad),
                       "--out", str(tmp_path / "o"), "--quiet")
    assert_one_line_error(code, err, r"bad.jsonl:3: malformed JSON")


def test_unknown_columns(monkeypatch, capsys, model_dir, tmp_path):
    path = write_jsonl(tmp_path / "cols.jsonl", [{"question": "a", "answer": "b"}])
    code, _, err = run(monkeypatch, capsys, "recommend", "-m", model_dir, "-d", str(path),
                       "--out", str(tmp_path / "o"), "--quiet")
    assert_one_line_error(code, err, r"unknown columns \['answer', 'question'\].*chat: messages")


def test_empty_dataset(monkeypatch, capsys, model_dir, tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    code, _, err = run(monkeypatch, capsys, "recommend", "-m", model_dir, "-d", str(path),
                       "--out", str(tmp_path / "o"), "--quiet")
    assert_one_line_error(code, err, "empty dataset")


def test_no_supervised_tokens(monkeypatch, capsys, model_dir, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x" * 30, "completion": "y"}] * 3)
    code, _, err = run(monkeypatch, capsys, "recommend", "-m", model_dir, "-d", str(path),
                       "--max-length", "8", "--out", str(tmp_path / "o"), "--quiet")
    assert_one_line_error(code, err, "no supervised tokens")


def test_model_not_found(monkeypatch, capsys, pc_data, tmp_path):
    code, _, err = run(monkeypatch, capsys, "recommend", "-m", "nope-model", "-d", str(pc_data),
                       "--out", str(tmp_path / "o"), "--quiet")
    assert_one_line_error(code, err, "model 'nope-model' not found.*smollm2-135m")


def test_generation_data_on_a_classifier_says_what_data_it_needs(monkeypatch, capsys,
                                                                  tiny_bert_dir, pc_data,
                                                                  tmp_path):
    code, _, err = run(monkeypatch, capsys, "analyze", "-m", str(tiny_bert_dir), "-d",
                       str(pc_data), "--out", str(tmp_path / "o"), "--quiet")
    assert_one_line_error(code, err, "is a classifier .*it needs classification data")


def test_one_label_fails_before_the_model_loads(monkeypatch, capsys, model_dir, tmp_path):
    import lorank.runs.inputs

    def must_not_load(*a, **k):
        raise AssertionError("the model was loaded before the labels were checked")

    monkeypatch.setattr(lorank.runs.inputs, "load_model", must_not_load)  # looked up there
    data = write_jsonl(tmp_path / "c.jsonl", [{"text": f"t{i}", "label": 1} for i in range(6)])
    code, _, err = run(monkeypatch, capsys, "analyze", "-m", model_dir, "-d", str(data),
                       "--out", str(tmp_path / "o"), "--quiet")
    assert_one_line_error(code, err, "every record has the label '1'; classification needs")


def test_targets_match_nothing(monkeypatch, capsys, model_dir, pc_data, tmp_path):
    code, _, err = run(monkeypatch, capsys, "recommend", "-m", model_dir, "-d", str(pc_data),
                       "--targets", "c_attn", "--out", str(tmp_path / "o"), "--quiet")
    assert_one_line_error(code, err, "matches no linear module.*q_proj")


def test_rank_too_large(monkeypatch, capsys, model_dir, pc_data, tmp_path):
    code, _, err = run(monkeypatch, capsys, "recommend", "-m", model_dir, "-d", str(pc_data),
                       "--rank", "999", "--out", str(tmp_path / "o"), "--quiet")
    assert_one_line_error(code, err, r"rank 999 exceeds min\(d_in, d_out\)")


def test_unwritable_output(monkeypatch, capsys, model_dir, pc_data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run(monkeypatch, capsys, "recommend", "-m", model_dir, "-d", str(pc_data),
                       "--out", str(blocker / "sub"), "--quiet")
    assert_one_line_error(code, err, "output directory is not writable")
    code, _, err = run(monkeypatch, capsys, "recommend", "-m", model_dir, "-d", str(pc_data),
                       "--out", str(blocker), "--quiet")
    assert_one_line_error(code, err, "is a file; expected a directory")


def test_usage_error_exit_2(monkeypatch, capsys):
    code, _, err = run(monkeypatch, capsys, "recommend", "--nope")
    assert code == 2 and "Traceback" not in err


def test_recommend_prints_table(monkeypatch, capsys, model_dir, pc_data, tmp_path):
    out_dir = tmp_path / "o[bold]x"  # printed as it is, not read as rich markup ("ox")
    code, out, _ = run(monkeypatch, capsys, "recommend", "-m", model_dir, "-d", str(pc_data),
                       "--out", str(out_dir), "--quiet", "--max-length", "64")
    assert code == 0
    assert "candidate ranks" in out and "recommended rank" in out
    flat = " ".join(out.split())
    assert f"files in {out_dir}/:" in flat
    for name in ("recommendation.json", "report.html", "adapter_config.json", "snippets.md"):
        assert (out_dir / name).exists() and name in flat
    prof = json.loads((out_dir / "recommendation.json").read_text())["inputs"]["profile"]
    line = next(x for x in out.splitlines() if x.startswith("data: "))
    assert f"{prof['examples']:,} train / {prof['val_examples']:,} val examples" in line
    assert f"{prof['supervised_tokens']:,} supervised tokens" in line
    assert f"base model pays {prof['base_loss_nats']:.3f} nats" in flat
    assert max(len(x) for x in out.splitlines()) <= 80  # rich's width without a terminal


def test_targets_command(monkeypatch, capsys, model_dir):
    code, out, _ = run(monkeypatch, capsys, "targets", "-m", model_dir, "--targets", "attention")
    assert code == 0 and "q_proj" in out and "cost per rank" in out


def test_targets_of_a_classifier_without_num_labels(monkeypatch, capsys, tiny_bert_dir,
                                                    model_dir):
    """Listing targets needs no data: a classifier's head is counted at 2 labels, and said so
    (it used to fail asking for the number of labels)."""
    from lorank.models import model_task

    assert model_task(str(tiny_bert_dir)) == "classification" and model_task(model_dir) == "causal"
    code, out, err = run(monkeypatch, capsys, "targets", "-m", str(tiny_bert_dir))
    assert code == 0, err
    assert "cost per rank" in out and "counted with a 2-label head" in " ".join(out.split())


def test_analyze_bad_calib(monkeypatch, capsys, model_dir, pc_data, tmp_path):
    code, _, err = run(monkeypatch, capsys, "analyze", "-m", model_dir, "-d", str(pc_data),
                       "--calib", "3", "--out", str(tmp_path / "o"), "--quiet")
    assert_one_line_error(code, err, "--calib 3: need at least 4 examples")


def test_analyze_bad_replay_mb(monkeypatch, capsys, model_dir, pc_data, tmp_path):
    code, _, err = run(monkeypatch, capsys, "analyze", "-m", model_dir, "-d", str(pc_data),
                       "--gradient-replay-mb", "-1", "--out", str(tmp_path / "o"), "--quiet")
    assert_one_line_error(code, err, "--gradient-replay-mb -1.0: expected a size in MiB >= 0")


def test_analyze_max_rank_above_layer(monkeypatch, capsys, model_dir, pc_data, tmp_path):
    code, _, err = run(monkeypatch, capsys, "analyze", "-m", model_dir, "-d", str(pc_data),
                       "--gradient-max-rank", "32", "--out", str(tmp_path / "o"), "--quiet")
    assert_one_line_error(code, err, r"rank 32 exceeds min\(d_in, d_out\) = 16")


def test_analyze_writes_layer_table(monkeypatch, capsys, model_dir, pc_data, tmp_path):
    code, out, _ = run(monkeypatch, capsys, "analyze", "-m", model_dir, "-d", str(pc_data),
                       "--max-length", "48", "--gradient-max-rank", "8", "--out", str(tmp_path / "o"),
                       "--gradient-replay-mb", "0", "--quiet")
    assert code == 0 and "gradient" in out
    rec = json.loads((tmp_path / "o" / "recommendation.json").read_text())
    settings = next(e for e in rec["evidence"] if e["name"] == "gradient")["details"]["settings"]
    assert settings["replay_mb"] == 0 and settings["pass_3"] == "forward+backward"
    assert (tmp_path / "o" / "gradient_layers.md").exists()
    assert (tmp_path / "o" / "adapter_config.json").exists()


def test_probe_bad_budget(monkeypatch, capsys, model_dir, pc_data, tmp_path):
    code, _, err = run(monkeypatch, capsys, "probe", "-m", model_dir, "-d", str(pc_data),
                       "--budget", "0", "--out", str(tmp_path / "o"), "--quiet")
    assert_one_line_error(code, err, "--budget 0: must be at least one step")


@pytest.mark.parametrize(("args", "message"), [
    (("--budget", "-3"), "--budget -3: must be at least one step"),
    (("--budget", "-3m"), "--budget -3m: expected a positive, finite number of minutes"),
    (("--budget", "0m"), "--budget 0m: expected a positive, finite number of minutes"),
    (("--budget", "10", "--lr", "0"), "--lr 0: learning rates must be positive"),
    (("--budget", "10", "--probe-method", "dense"), "--probe-method dense: expected svd or"),
])
def test_bad_probe_options_fail_before_anything_is_measured(monkeypatch, capsys, model_dir,
                                                            pc_data, tmp_path, args, message):
    import lorank.api

    def must_not_load(*a, **k):
        raise AssertionError("the model was loaded before the probe's options were checked")

    monkeypatch.setattr(lorank.api, "prepare_inputs", must_not_load)
    code, _, err = run(monkeypatch, capsys, "recommend", "-m", model_dir, "-d", str(pc_data),
                       *args, "--out", str(tmp_path / "o"), "--quiet")
    assert_one_line_error(code, err, message)


@pytest.mark.parametrize(("args", "message"), [
    (("--steps", "0"), "Invalid value for '--steps'"),
    (("--batch-size", "0"), "Invalid value for '--batch-size'"),
    (("--eval-every", "-2"), "Invalid value for '--eval-every'"),
    (("--max-length", "0"), "Invalid value for '--max-length'"),
    (("--skip-margin", "-1"), "Invalid value for '--skip-margin'"),
    (("--lora-alpha", "0"), "--lora-alpha 0: must be positive"),  # was silently alpha 8
    (("--lora-alpha", "-1"), "--lora-alpha -1: must be positive"),
])
def test_bad_sweep_numbers_fail_before_anything_loads(monkeypatch, capsys, model_dir, pc_data,
                                                      tmp_path, args, message):
    """Steps 0 ran "finished" trials and batch size 0 raised from the DataLoader."""
    import lorank.api

    def must_not_load(*a, **k):
        raise AssertionError("the model was loaded before the sweep's numbers were checked")

    monkeypatch.setattr(lorank.api, "prepare_inputs", must_not_load)
    code, _, err = run(monkeypatch, capsys, "sweep", "-m", model_dir, "-d", str(pc_data),
                       "--ranks", "1,2", "--seeds", "0", "--lrs", "1e-3", *args,
                       "--out", str(tmp_path / "o"), "--quiet")
    assert code == 2 and "Traceback" not in err
    assert message in " ".join(err.split()), err
    assert not (tmp_path / "o").exists()


def test_probe_with_several_lrs_runs_the_pilot_first(monkeypatch, capsys, model_dir, pc_data,
                                                     tmp_path):
    code, out, _ = run(monkeypatch, capsys, "probe", "-m", model_dir, "-d", str(pc_data),
                       "--max-length", "48", "--probe-rank", "4", "--budget", "8",
                       "--lr", "1e-2,1e-3", "--out", str(tmp_path / "o"), "--quiet")
    assert code == 0
    rec = json.loads((tmp_path / "o" / "recommendation.json").read_text())
    probe = next(e for e in rec["evidence"] if e["name"] == "svd-probe")
    pilot = probe["details"]["lr_pilot"]
    assert sorted(pilot["losses"]) == ["0.001", "0.01"] and pilot["steps_each"] == 2
    assert probe["details"]["learning_rate"] == pilot["learning_rate"]
    # the SVD probe pilots at its own rank and continues the winner: 8 steps in all, not 8 + 2
    assert pilot["rank"] == 4 and pilot["read_at"] == 2 and pilot["continued"] is True
    assert probe["details"]["steps_done"] == 8
    assert any("chosen by a pilot" in n for n in probe["notes"])


@pytest.mark.parametrize("method", ["svd", "nested"])
def test_probe_curve_ends_at_a_max_rank_off_the_powers_of_two(monkeypatch, capsys, model_dir,
                                                              pc_data, tmp_path, method):
    code, _, _ = run(monkeypatch, capsys, "probe", "-m", model_dir, "-d", str(pc_data),
                     "--max-length", "48", "--probe-rank", "6", "--budget", "4",
                     "--probe-method", method, "--out", str(tmp_path / "o"), "--quiet")
    assert code == 0
    rec = json.loads((tmp_path / "o" / "recommendation.json").read_text())
    probe = next(e for e in rec["evidence"] if e["name"] in ("probe", "svd-probe"))
    assert sorted(int(r) for r in probe["curve"]) == [1, 2, 4, 6]


def test_probe_bad_lr(monkeypatch, capsys, model_dir, pc_data, tmp_path):
    code, _, err = run(monkeypatch, capsys, "probe", "-m", model_dir, "-d", str(pc_data),
                       "--lr", "2e-3,fast", "--out", str(tmp_path / "o"), "--quiet")
    assert_one_line_error(code, err, "--lr 2e-3,fast: expected comma-separated float values")


def test_ctrl_c_exits_130_with_one_line(monkeypatch, capsys, model_dir):
    """Typer hands Ctrl-C back as a return code when not standalone; it must not become 0."""
    import lorank.models

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lorank.models, "load_model", interrupted)
    code, _, err = run(monkeypatch, capsys, "targets", "-m", model_dir)
    assert code == 130 and "Traceback" not in err
    assert "run the same command again" in err

