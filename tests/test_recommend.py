"""recommend end to end on tiny local models; exports that PEFT loads; the decision's inputs."""

from __future__ import annotations

import json

import pytest
from peft import LoraConfig, get_peft_model
from transformers import TrainerCallback

from lorank import api
from lorank.errors import LorankError
from lorank.models import load_model, resolve_source


def test_local_directory_loads(tiny_llama_dir):
    loaded = load_model(str(tiny_llama_dir))
    assert loaded.task == "causal" and loaded.pad_token_id == 0


def test_new_classification_head_depends_on_the_seed_only(tiny_bert_dir):
    """The head the checkpoint lacks is drawn from `seed`, whatever the process's RNG did
    before: two sweep workers must train the same model."""
    import torch

    def head(seed: int):
        return load_model(str(tiny_bert_dir), task="classification", num_labels=3,
                          seed=seed).model.classifier.weight.detach().clone()

    torch.manual_seed(123)
    first = head(0)
    torch.rand(1000)  # a different global RNG state
    assert torch.equal(first, head(0))
    assert not torch.equal(first, head(1))
    after = torch.rand(1)
    torch.manual_seed(123)
    torch.rand(1000)
    assert torch.equal(after, torch.rand(1))  # loading left the global RNG alone


def test_unknown_model_lists_aliases():
    with pytest.raises(LorankError, match="not found.*smollm2-135m, minilm-l6"):
        resolve_source("no-such-model")


def test_missing_gguf():
    with pytest.raises(LorankError, match="model file not found: /nope/m.gguf"):
        resolve_source("/nope/m.gguf")


def test_recommend_causal_writes_peft_loadable_config(tiny_llama_dir, pc_data, tmp_path):
    out = tmp_path / "out"
    rec = api.recommend(str(tiny_llama_dir), pc_data, out=out, progress=False, max_length=64)
    saved = json.loads((out / "recommendation.json").read_text())
    for key in ("rank", "lora_alpha", "use_rslora", "target_modules", "rank_pattern",
                "trainable_params", "memory", "confidence", "evidence", "rationale", "warnings",
                "inputs"):
        assert key in saved, key
    assert saved["inputs"]["data_hash"] and saved["inputs"]["versions"]["peft"]
    assert saved["evidence"][0]["name"] == "capacity" and saved["evidence"][0]["cost_seconds"] > 0
    config = LoraConfig.from_pretrained(str(out))
    assert config.r == rec.rank and config.use_rslora
    model = load_model(str(tiny_llama_dir)).model
    peft_model = get_peft_model(model, config)
    assert peft_model.get_nb_trainable_parameters()[0] == rec.trainable_params


def test_recommend_is_deterministic(tiny_llama_dir, pc_data):
    a = api.recommend(str(tiny_llama_dir), pc_data, progress=False, seed=3, max_length=64)
    b = api.recommend(str(tiny_llama_dir), pc_data, progress=False, seed=3, max_length=64)
    def strip(rec):  # timings are measurements, not decisions
        d = {k: v for k, v in rec.to_dict().items() if k != "evidence"}
        d["inputs"]["profile"].pop("forward_seconds_per_token")
        return d

    assert strip(a) == strip(b)
    assert [e["suggested_rank"] for e in a.evidence] == [e["suggested_rank"] for e in b.evidence]


def test_capacity_estimate_grows_with_data_and_records_the_planned_run(tiny_llama_dir, tmp_path):
    """More to learn, a rank no lower; the default decides from the calibrated capacity
    estimate, and the planned run is recorded (steps x batch over the examples = epochs)."""
    from conftest import write_jsonl

    small = write_jsonl(tmp_path / "s.jsonl", [{"text": "w1 "} for _ in range(4)])
    big = write_jsonl(tmp_path / "b.jsonl", [{"text": f"w{i} " * 30} for i in range(400)])
    r_small = api.recommend(str(tiny_llama_dir), small, progress=False, max_length=128,
                            estimators=("capacity",), steps=6, batch_size=2)
    r_big = api.recommend(str(tiny_llama_dir), big, progress=False, max_length=128,
                          estimators=("capacity",))
    bits = [r.evidence[0]["details"]["total_bits"] for r in (r_small, r_big)]
    assert bits[0] < bits[1] and r_small.rank <= r_big.rank
    assert r_small.rank < r_big.rank or r_small.rank == r_small.candidates[-1]["rank"]
    assert r_big.evidence[0]["kind"] == "estimate"
    assert r_big.rationale[0].startswith("capacity: the data holds about")
    run = r_small.inputs["planned_run"]
    assert run["steps"] == 6 and run["batch_size"] == 2
    assert run["epochs_over_data"] == pytest.approx(6 * 2 / r_small.inputs["profile"]["examples"])


def test_recommend_classification(tiny_bert_dir, cls_data, tmp_path):
    out = tmp_path / "cls"
    rec = api.recommend(str(tiny_bert_dir), cls_data, out=out, progress=False)
    assert rec.task_type == "SEQ_CLS" and rec.modules_to_save == ["classifier"]
    config = LoraConfig.from_pretrained(str(out))
    model = load_model(str(tiny_bert_dir), num_labels=3, task="classification").model
    assert get_peft_model(model, config).get_nb_trainable_parameters()[0] == rec.trainable_params


def test_forced_rank_checked(tiny_llama_dir, pc_data):
    with pytest.raises(LorankError, match="exceeds min"):
        api.recommend(str(tiny_llama_dir), pc_data, rank=64, progress=False)
    rec = api.recommend(str(tiny_llama_dir), pc_data, rank=4, progress=False)
    assert rec.rank == 4 and "forced" in rec.rationale[0]


def test_format_does_not_fit_model(tiny_llama_dir, cls_data):
    loaded = load_model(str(tiny_llama_dir))
    with pytest.raises(LorankError, match="does not fit a causal model"):
        api.recommend(loaded, cls_data, progress=False)


def test_recommend_with_budget_adds_probe_curve(tiny_llama_dir, pc_data, tmp_path):
    out = tmp_path / "probe"
    rec = api.recommend(str(tiny_llama_dir), pc_data, budget="6", probe_rank=4,
                        max_length=64, out=out, progress=False)
    names = [e["name"] for e in rec.evidence]
    assert names == ["capacity", "svd-probe"]
    probe = rec.evidence[1]
    assert sorted(int(r) for r in probe["curve"]) == [1, 2, 4]
    assert probe["details"]["steps"] == 6 and probe["cost_seconds"] > 0
    cost = probe["details"]["cost"]  # a plain run at R plus its truncations: at least one run
    assert cost["cost_vs_one_run"] >= 1.0 and cost["cost_steps"] >= 6
    assert (out / "probe_curve.png").stat().st_size > 0
    assert rec.rank in (1, 2, 4) and "svd-probe" in rec.rationale[0]


def test_bad_budget(tiny_llama_dir, pc_data):
    with pytest.raises(LorankError, match="--budget soon: expected training steps"):
        api.recommend(str(tiny_llama_dir), pc_data, budget="soon", progress=False)


def test_budget_in_minutes_uses_measured_speed(tiny_llama_dir, pc_data):
    from lorank import data as data_mod

    loaded = load_model(str(tiny_llama_dir))
    prep = data_mod.prepare(pc_data, loaded.tokenizer)
    prof = data_mod.profile(prep, loaded.model, sample=4, pad_token_id=0, progress=False)
    assert prof.forward_seconds_per_token > 0
    one, _ = api.parse_budget("1m", prof, 8, len(prep.train))
    two, text = api.parse_budget("2m", prof, 8, len(prep.train))
    assert two >= 2 * one - 1 and "estimated" in text


def test_gradient_evidence_in_recommend(tiny_llama_dir, pc_data, tmp_path):
    out = tmp_path / "g"
    rec = api.recommend(str(tiny_llama_dir), pc_data, max_length=64, out=out, progress=False,
                        estimators=("capacity", "gradient"))
    grad = next(e for e in rec.evidence if e["name"] == "gradient")
    assert grad["kind"] == "estimate" and grad["cost_seconds"] > 0
    assert len(grad["details"]["layer_table"]) == 14
    assert (out / "gradient_layers.md").read_text().count("model.layers.") == 14
    assert (out / "gradient_q_proj.png").stat().st_size > 0
    assert rec.rationale[0].startswith("capacity:")  # the calibrated estimate decides
    assert any(r.startswith("gradient says rank") and "not used for the rank" in r
               for r in rec.rationale)


def test_gradient_on_classification_fits_head_on_a_copy(tiny_bert_dir, cls_data):
    loaded = load_model(str(tiny_bert_dir), task="classification", num_labels=3)
    before = loaded.model.classifier.weight.detach().clone()
    rec = api.recommend(loaded, cls_data, progress=False, estimators=("gradient",))
    grad = rec.evidence[0]
    assert grad["notes"][0].startswith("head 'classifier' fitted on frozen features")
    assert (loaded.model.classifier.weight == before).all()


def test_probe_cost_is_priced_at_its_own_pace():
    from lorank.api import probe_cost

    # 10 steps in 100 s of training (10 s/step); 50 s scoring 500 example-rank pairs (0.1 s each)
    cost = probe_cost(150.0, 100.0, 10, 50.0, 500, steps=10, n_val=50)
    assert cost["seconds_per_step"] == 10.0 and cost["cost_steps"] == 15.0
    # one plain run: 10 steps + one final evaluation of 50 examples x 0.1 s = 105 s
    assert cost["one_run_steps"] == 10.5
    assert cost["cost_vs_one_run"] == round(150 / 105, 3)



# ---------------------------------------------------------------------------- probe resume


class StepSpy(TrainerCallback):
    """Counts the training steps this run takes; raises Ctrl-C at `stop_at`."""

    def __init__(self, stop_at: int | None = None):
        self.stop_at, self.done = stop_at, 0

    def on_step_end(self, args, state, control, **kwargs):
        self.done += 1
        if state.global_step == self.stop_at:
            raise KeyboardInterrupt("simulated Ctrl-C")


@pytest.fixture
def probe_inputs(tiny_llama_dir, pc_data, monkeypatch):
    """run_probe's inputs on the tiny Llama, and a spy slipped into every training run."""
    from lorank import data as data_mod
    from lorank import train
    from lorank.estimators.probe import nested, pilot
    from lorank.targets import resolve_targets

    loaded = load_model(str(tiny_llama_dir))
    prep = data_mod.prepare(pc_data, loaded.tokenizer, max_length=64)
    prof = data_mod.profile(prep, loaded.model, sample=4, pad_token_id=0, progress=False)
    spy = StepSpy()
    real = train.train_lora

    def spied(*args, callbacks=(), **kwargs):
        return real(*args, callbacks=[*callbacks, spy], **kwargs)

    monkeypatch.setattr(train, "train_lora", spied)
    monkeypatch.setattr(nested, "train_lora", spied)  # nested_probe
    monkeypatch.setattr(pilot, "train_lora", spied)  # the lr pilot
    return (loaded, prep, resolve_targets(loaded.model), prof), spy


@pytest.mark.parametrize("method,lr,run_dir", [
    ("svd", 2e-3, "run"),
    ("nested", 2e-3, "nested"),
    ("svd", [2e-3, 1e-3], "pilot/lr0.002"),  # the pilot is not rerun; its winner continues
])
def test_interrupted_probe_resumes_and_cleans_up(probe_inputs, tmp_path, method, lr, run_dir):
    """`lorank probe` run again after Ctrl-C continues from OUT/probe_checkpoint/ (the CLI
    says "finished work is kept"), ends where an uninterrupted probe ends, and removes it."""
    args, spy = probe_inputs
    kw = dict(method=method, max_rank=4, budget="8", lr=lr, progress=False)
    spy.stop_at = 5  # checkpoints every 8 // 4 = 2 steps: the last one before Ctrl-C is 4
    with pytest.raises(KeyboardInterrupt):
        api.run_probe(*args, out=tmp_path, **kw)
    assert (tmp_path / "probe_checkpoint" / run_dir / "checkpoint-4").is_dir(), \
        sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("checkpoint-*"))
    spy.stop_at, spy.done = None, 0
    resumed = api.run_probe(*args, out=tmp_path, **kw)
    resumed_steps = spy.done
    assert any("continued the interrupted probe" in n for n in resumed.notes)
    assert not (tmp_path / "probe_checkpoint").exists()
    scratch = api.run_probe(*args, **kw)  # no out: nothing kept, nothing resumed
    assert not any("continued the interrupted" in n for n in scratch.notes)
    done = scratch.details["steps_done"]  # 8, or fewer when the nested probe stops early
    assert resumed_steps == done - 4 and resumed.details["steps_done"] == done
    assert resumed.suggested_rank == scratch.suggested_rank
    for r, point in scratch.curve.items():
        assert resumed.curve[r]["loss"] == pytest.approx(point["loss"], rel=1e-4)


def test_probe_checkpoint_of_other_inputs_is_not_resumed(probe_inputs, tmp_path):
    args, spy = probe_inputs
    kw = dict(max_rank=4, budget="8", progress=False)
    spy.stop_at = 5
    with pytest.raises(KeyboardInterrupt):
        api.run_probe(*args, out=tmp_path, lr=2e-3, **kw)
    spy.stop_at, spy.done = None, 0
    other = api.run_probe(*args, out=tmp_path, lr=1e-3, **kw)  # another recipe: start afresh
    assert spy.done == 8
    assert any("made with other inputs" in n for n in other.notes)
    assert not (tmp_path / "probe_checkpoint").exists()
