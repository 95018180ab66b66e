"""The calibrated capacity estimate: the efficiency fit on planted tasks, leave-one-task-out,
the epochs slope from same-data pairs, the frozen-feature bits of a classifier, the planned
run, the confidence mapping, and the shipped fit reproduced from the stored sweeps."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lorank.data import DataProfile
from lorank.decide import calibrated_confidence
from lorank.errors import LorankError
from lorank.estimators.capacity import (
    CALIBRATION_FILE,
    CalibrationRow,
    Efficiency,
    calibrate,
    capacity_evidence,
    cross_fitted_bits,
    epochs_slope,
    fit_efficiency,
    leave_one_task_out,
    load_calibration,
    pick_rank,
)
from lorank.planned_run import DEFAULT_EPOCHS, PlannedRun

RANKS = (1, 2, 4, 8, 16, 32, 64)
PARAMS = {r: 1000.0 * r for r in RANKS}


def planted_row(task: str, r_star: int, log2_e: float, *, epochs: float = 1.0,
                slope: float = 0.0, data_hash: str = "") -> CalibrationRow:
    """A task whose bits fill rank r_star exactly at the planted efficiency; acceptable from
    r_star up (a knee), losses falling to r_star then flat."""
    e = 2 ** (log2_e + slope * math.log2(epochs))
    bits = 0.9 * e * PARAMS[r_star]  # strictly inside rank r_star, above r_star / 2
    return CalibrationRow(task=task, kind="generation", bits=bits, params=dict(PARAMS),
                          acceptable=[r for r in RANKS if r >= r_star], r_star=r_star,
                          epochs=epochs, data_hash=data_hash,
                          losses={r: 1.0 + max(0, math.log2(r_star / r)) for r in RANKS})


def test_pick_rank_is_the_smallest_that_holds_the_bits():
    assert pick_rank(1500, PARAMS, 1.0) == 2
    assert pick_rank(1000, PARAMS, 1.0) == 1
    assert pick_rank(10**9, PARAMS, 1.0) == 64  # nothing holds it: the largest


def test_one_planted_efficiency_is_recovered_held_out():
    rows = [planted_row(f"t{r}", r, -6.0) for r in (2, 4, 8, 16, 32)]
    eff = fit_efficiency(rows)
    assert all(pick_rank(r.bits, r.params, eff.bits_per_param(1.0)) == r.r_star for r in rows)
    loto = leave_one_task_out(rows)
    assert [v["pick"] for v in loto.values()] == [2, 4, 8, 16, 32]
    assert all(v["acceptable"] and v["within_2x"] for v in loto.values())


def test_a_task_off_the_shared_efficiency_is_missed_held_out():
    """A task storing 16x less per parameter than the others needs 16x the rank; fitted on the
    others, its pick is too low, and the record says so instead of fitting toward it."""
    rows = [planted_row(f"t{r}", r, -6.0) for r in (2, 4, 8)] + [planted_row("odd", 32, -10.0)]
    loto = leave_one_task_out(rows)
    assert loto["odd"]["pick"] == 2 and not loto["odd"]["acceptable"]
    assert loto["odd"]["regret"] > 0 and loto["odd"]["waste"] < 1


def test_epochs_slope_comes_from_same_data_pairs():
    rows = [planted_row("a1", 8, -6.0, epochs=1.0, slope=0.5, data_hash="A"),
            planted_row("a3", 8, -6.0, epochs=4.0, slope=0.5, data_hash="A"),
            planted_row("b", 4, -6.0, epochs=1.0, data_hash="B")]
    assert epochs_slope(rows) == pytest.approx(0.5, abs=1e-9)
    assert epochs_slope([r for r in rows if r.task != "a3"]) == 0.0  # no pair, no slope
    eff = fit_efficiency(rows)
    assert eff.epochs_slope == pytest.approx(0.5, abs=1e-4)
    assert eff.bits_per_param(4.0) == pytest.approx(2 * eff.bits_per_param(1.0), rel=1e-3)


def test_a_kind_with_one_task_borrows_the_others_fit():
    """One classification task gets no fit of its own (it would be fitted toward that task):
    it and its held-out score use the generation tasks' efficiency."""
    rows = [planted_row(f"t{r}", r, -6.0) for r in (2, 8, 32)]
    odd = planted_row("cls", 4, -2.0)
    odd.kind = "classification"
    fit = calibrate([*rows, odd])
    assert fit["fits"]["classification"]["borrowed"]
    assert fit["fits"]["classification"]["efficiency"] == fit["fits"]["generation"]["efficiency"]
    assert fit["leave_one_task_out"]["cls"]["fitted_on"] == ["t2", "t8", "t32"]
    assert "cls" not in fit["leave_one_task_out"]["t8"]["fitted_on"]


def test_calibration_record_round_trips_and_summarizes():
    rows = [planted_row(f"t{r}", r, -6.0) for r in (2, 8, 32)]
    fit = calibrate(rows)
    assert [CalibrationRow.from_dict(d) for d in fit["rows"]] == rows
    assert fit["loto_summary"]["tasks"] == 3
    assert fit["loto_summary"]["within_tolerance_and_2x"] == 3
    assert fit["loto_summary"]["mean_waste"] == pytest.approx(1.0)
    assert json.loads(json.dumps(fit)) == fit


def test_cross_fitted_bits_read_what_features_separate():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(300) % 3
    separable = torch.randn(300, 8, generator=g, dtype=torch.float64) * 0.1
    separable[:, 0] += y.double() * 5
    noise = torch.randn(300, 8, generator=g, dtype=torch.float64)
    assert cross_fitted_bits(separable, y, 3) < 0.1
    assert cross_fitted_bits(noise, y, 3) == pytest.approx(math.log2(3), abs=0.15)


def _profile(task: str = "causal", bits_per_token: float = 4.0, tokens: int = 10_000
             ) -> DataProfile:
    return DataProfile(format="prompt-completion", task=task, examples=500, val_examples=50,
                       supervised_tokens=tokens, total_tokens=2 * tokens,
                       length_percentiles={"p50": 10, "p90": 20, "p99": 30, "max": 40},
                       duplicate_rate=0.0, dropped=0, base_loss_bits=bits_per_token,
                       base_loss_sample=64)


class _Targets:
    head_params = 0

    def params(self, rank: int) -> int:
        return int(PARAMS[rank])


def test_capacity_estimate_grows_with_the_bits_and_records_the_run():
    calibration = calibrate([planted_row(f"t{r}", r, -6.0) for r in (2, 8, 32)])
    small = capacity_evidence(_profile(bits_per_token=0.5, tokens=100), _Targets(), list(RANKS),
                              calibration=calibration, run=PlannedRun(steps=30, batch_size=10))
    large = capacity_evidence(_profile(bits_per_token=0.5, tokens=1_500), _Targets(), list(RANKS),
                              calibration=calibration)
    assert small.kind == "estimate" and small.suggested_rank < large.suggested_rank
    assert small.details["epochs"] == pytest.approx(30 * 10 / 500)
    assert large.details["epochs"] == DEFAULT_EPOCHS
    lo, hi = small.interval
    assert lo <= small.suggested_rank <= hi
    assert small.details["held_out_record"]["tasks"] == 3
    ceiling = capacity_evidence(_profile(), _Targets(), list(RANKS), calibration=None)
    assert ceiling.kind == "ceiling"


def test_planned_run_converts_and_refuses_bad_values():
    assert PlannedRun(steps=50, batch_size=8).epochs_over(200) == 2.0
    assert PlannedRun(epochs=2.0, batch_size=8).steps_over(200) == 50
    assert PlannedRun().epochs_over(10) == DEFAULT_EPOCHS
    for bad in ({"epochs": 1.0, "steps": 3}, {"epochs": -1.0}, {"epochs": float("nan")},
                {"steps": 0}, {"batch_size": 0}, {"lr": 0.0}):
        with pytest.raises(LorankError):
            PlannedRun(**bad)


@pytest.mark.parametrize(("hits", "level"), [(7, "high"), (4, "medium"), (3, "low")])
def test_confidence_maps_to_the_measured_hit_rate(hits, level):
    record = {"tasks": 7, "within_tolerance": 7, "within_tolerance_and_2x": hits,
              "mean_regret": 0.01, "mean_waste": 2.0}
    got, sentence = calibrated_confidence(record)
    assert got == level and f"{hits} of 7" in sentence
    assert calibrated_confidence(None)[0] == "low"


def test_shipped_fit_is_reproduced_from_the_stored_sweeps():
    """benchmarks/calibrate_capacity.py's output, recomputed from benchmarks/results: the
    constants recommend ships are the ones the stored sweeps give, not set by hand."""
    from lorank.bench.score import calibration_rows

    results = Path(__file__).parents[1] / "benchmarks" / "results"
    shipped = load_calibration(CALIBRATION_FILE)
    assert shipped is not None
    refit = json.loads(json.dumps(calibrate(calibration_rows(results))))
    assert refit == shipped
    for fit in shipped["fits"].values():  # far below an adapter's 2 bits per parameter
        assert Efficiency(**fit["efficiency"]).bits_per_param(1.0) < 0.1
