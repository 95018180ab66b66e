"""Summary: a recommendation in plain words, shared by the terminal summary and report.html.

What each estimator measured and what it says (`measured_lines`), what the confidence level
means for the evidence that decided and why it is that level (`confidence_words`), and what to
do next (`next_step`), with the time a measured curve would take here when the data profile
measured the forward speed (`probe_minutes`).
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from lorank.decide import Recommendation
from lorank.planned_run import step_seconds

PROBE_RANKS = 7  # ranks 1, 2, 4, ..., 64 that the default probe (max rank 64) reads
LEVELS = "high: 80% or more, medium: 50% or more, low: less"


def deciding_evidence(rec: Recommendation) -> dict[str, Any] | None:
    """The evidence `decide` took the rank and confidence from (`rec.decided_by`), if any."""
    return next((e for e in rec.evidence if e.get("name") == rec.decided_by), None) \
        if rec.decided_by else None


def _says(e: dict[str, Any]) -> str:
    rank, interval = e.get("suggested_rank"), e.get("interval")
    if rank is None:
        return "no rank"
    if interval and interval[0] != interval[1]:
        return f"rank {rank} (range {interval[0]}–{interval[1]})"
    return f"rank {rank}"


def _what(e: dict[str, Any]) -> str:
    """What one estimator measured, in a phrase."""
    name, kind, d = e.get("name"), e.get("kind"), e.get("details") or {}
    curve = e.get("curve") or {}
    if name == "capacity" and kind == "estimate" and "bits_per_param" in d:
        return (f"bits the data holds to learn ({d.get('total_bits', 0):,.0f}, from the base "
                f"model's loss) against what adapters store at the rate the benchmark's runs "
                f"show ({d['bits_per_param']:.4f} bits per parameter); no training")
    if name == "capacity":
        return ("bits the data holds to learn against an adapter's full capacity, a loose "
                "ceiling; no training")
    if name == "gradient":
        n = d.get("n_examples")
        return ("gradient directions that replicate across two halves of "
                + (f"{n} calibration examples" if n else "the calibration examples")
                + ", per layer; no training")
    if name in ("probe", "svd-probe") and curve:
        how = "read by SVD truncation" if name == "svd-probe" else "nested-dropout training"
        steps = d.get("steps_done") or d.get("steps")
        return (f"validation loss at every rank up to {max(int(r) for r in curve)} from one "
                f"training run" + (f" of {steps} steps" if steps else "") + f", {how}"
                + (f", on {d['n_val']} validation examples" if d.get("n_val") else ""))
    if name == "sweep":
        n = d.get("n_trials")
        return ("validation loss of " + (f"{n} " if n else "")
                + "independent training runs (ranks x learning rates x seeds)")
    return f"a {kind or 'measurement'}"


def measured_lines(rec: Recommendation) -> list[str]:
    """One sentence per estimator: its name and cost, what it measured, the rank it says."""
    lines = []
    for e in rec.evidence:
        cost = e.get("cost_seconds") or 0.0
        took = f"{cost:.1f} s" if cost < 120 else f"{cost / 60:.1f} min"
        mark = " (decided)" if e.get("name") == rec.decided_by else ""
        lines.append(f"{e.get('name')}{mark}, {took}: {_what(e)}; says {_says(e)}")
    return lines


def confidence_words(rec: Recommendation) -> str:
    """What `rec.confidence` means for the evidence that decided, and why it has that level."""
    level, e = rec.confidence, deciding_evidence(rec)
    if e is None:
        return (f"confidence {level}: no estimator gave a rank, so nothing about this data "
                "backs it; a measured curve (--budget) would")
    name, kind, d = e.get("name"), e.get("kind"), e.get("details") or {}
    if kind == "ceiling":
        return (f"confidence {level}: only a loose ceiling was measured (every bit the data "
                "holds, stored at an adapter's full capacity); the right rank can be higher")
    if name == "capacity":
        record = d.get("held_out_record") or {}
        hits = (f": {record['within_tolerance_and_2x']} of {record['tasks']}"
                if record.get("tasks") else "")
        return (f"confidence {level}: the share of benchmark tasks on which this estimate, "
                "fitted without the task, picked a rank within tolerance of the best loss and "
                f"at most 2x the right rank{hits} ({LEVELS}). It reads the data; no training "
                "run checked it")
    if kind == "curve" and name == "sweep":
        return (f"confidence {level}: the sweep trained every rank on its own. high: every "
                "run of its grid finished with 2 or more seeds per rank; medium: fewer; low: "
                "its curve is still falling or zig-zags by more than its tolerance")
    if kind == "curve":
        share = (d.get("rank_distribution") or {}).get(str(e.get("suggested_rank")))
        picked = f" ({share:.0%} did here)" if isinstance(share, (int, float)) else ""
        return (f"confidence {level}: the share of bootstrap resamples of the validation "
                f"examples that pick the same rank{picked} ({LEVELS}); low also when the "
                "curve is still falling or zig-zags by more than its tolerance")
    return (f"confidence {level}: medium when the per-layer counts agree within a factor 4, "
            "low when they spread wider, reach the rank limit, or sit far above the capacity "
            "ceiling; this count has not tracked the right rank on the benchmark")


def probe_minutes(rec: Recommendation, steps: int) -> float | None:
    """Estimated minutes of a default probe here: `steps` training steps plus reading
    PROBE_RANKS ranks on the validation set, from the forward speed the data profile measured
    (`planned_run.step_seconds`); None when no speed was measured."""
    prof = rec.inputs.get("profile") or {}
    speed = prof.get("forward_seconds_per_token") or 0.0
    median = (prof.get("length_percentiles") or {}).get("p50")
    batch = (rec.inputs.get("planned_run") or {}).get("batch_size") or rec.inputs.get(
        "batch_size")
    if not (speed > 0 and median and batch):
        return None
    reading = PROBE_RANKS * (prof.get("val_examples") or 0) * median * speed
    return (steps * step_seconds(speed, int(batch), float(median)) + reading) / 60


def _minutes(minutes: float | None) -> str:
    if minutes is None:
        return ""
    if minutes < 1:
        return ", under a minute here"
    return f", about {minutes:.0f} minutes here" if minutes < 90 else \
        f", about {minutes / 60:.1f} hours here"


def next_step(rec: Recommendation, out: Path | None = None, command: str = "recommend"
              ) -> list[str]:
    """What to do next, most useful first: measure a curve when none decided (the planned
    run's steps as `--budget`, with its estimated time), check a probe with a sweep, train a
    swept rank; then the report and the framework exports."""
    steps = []
    e = deciding_evidence(rec)
    name = e.get("name") if e else None
    planned = (rec.inputs.get("planned_run") or {}).get("steps_over_data")
    if e is None or e.get("kind") != "curve":
        budget = int(planned) if planned else 200
        where = "lorank demo" if command == "demo" else "lorank recommend"
        steps.append(f"for a measured rank–loss curve, run {where} again with --budget "
                     f"{budget} (one training run of the planned {budget} steps"
                     f"{_minutes(probe_minutes(rec, budget))})")
    elif name in ("probe", "svd-probe"):
        pick = rec.rank
        ranks = ",".join(str(r) for r in sorted({max(1, pick // 2), pick, 2 * pick}))
        model = rec.inputs.get("model") or "MODEL"
        data = rec.inputs.get("data") or "DATA"
        steps.append("to check the probe, train each rank on its own: lorank sweep -m "
                     f"{shlex.quote(str(model))} -d {shlex.quote(str(data))} --ranks {ranks}"
                     + (f" --steps {planned}" if planned else ""))
    else:
        steps.append(f"train rank {rec.rank} with the sweep's best learning rate at it "
                     "(in the exported configs)")
    if out is not None:
        steps.append(f"open {out / 'report.html'} for the curves, the cost per rank and "
                     "every estimator's evidence")
        steps.append(f"one framework's config: lorank export {out} --to peft (or trl, "
                     "axolotl, llamafactory, unsloth, torchtune)")
    return steps
