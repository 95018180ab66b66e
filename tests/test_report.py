"""What a user looks at: report.html (self-contained, escaped, rendered by a real browser), the
terminal summary and `--help` within 80 columns, and a recommendation.json of a few KB whose
bulky evidence sits in evidence/<name>.json.

The browser test runs headless Chromium (Debian's `chromium`); it skips where Chromium is not
installed, unless LORANK_REQUIRE_CHROMIUM=1 (scripts/test.sh sets it where it installed
Chromium), where it fails instead.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from test_cli import run

from lorank.decide import decide
from lorank.estimators.base import Evidence
from lorank.export import INLINE_BYTES, read_recommendation, write_outputs, written_files
from lorank.frameworks import export_config
from lorank.html_report import render_report
from lorank.report import print_recommendation
from lorank.targets import resolve_targets

RANKS = [1, 2, 4, 8]
SCRIPT = "<script>alert('x')</script>"
PROFILE = {"format": "prompt-completion", "examples": 270, "val_examples": 30,
           "supervised_tokens": 3199, "length_percentiles": {"p50": 48.5, "p90": 88.2,
                                                             "max": 135.0},
           "duplicate_rate": 0.0, "base_loss_nats": 4.33, "base_loss_bits": 6.25,
           "forward_seconds_per_token": 0.002}


def inputs(data: str = "train.jsonl") -> dict:
    return {"model": "smollm2-135m", "data": data, "planned_run": {"steps_over_data": 102,
                                                                   "batch_size": 8},
            "profile": dict(PROFILE), "batch_size": 8}


def sweep() -> Evidence:
    """A measured curve: ranks 1-2 clearly worse, rank 4 the pick."""
    curve = {r: {"loss": 1.0 + (0.5 if r < 4 else 0.0) + 0.001 * r, "se": 0.01} for r in RANKS}
    return Evidence("sweep", "curve", 4, interval=(4, 4), curve=curve,
                    per_rank={r: f"{c['loss']:.4f} ±0.0100 lr 0.002" for r, c in curve.items()},
                    details={"best_lr": {r: 2e-3 for r in RANKS}, "n_trials": 16,
                             "recipe": {"lora_alpha": 8.0, "use_rslora": True}},
                    cost_seconds=620.0)


def capacity(tiny_llama) -> Evidence:
    """The calibrated capacity estimate, with the details the real one carries."""
    targets = resolve_targets(tiny_llama)
    return Evidence("capacity", "estimate", 2, interval=(1, 4),
                    per_rank={r: f"holds {25 * r}%" for r in RANKS},
                    details={"total_bits": 60.0, "bits_per_param": 0.0123, "spread_log2": 0.99,
                             "adapter_params": {str(r): targets.params(r) for r in RANKS},
                             "held_out_record": {"tasks": 7, "within_tolerance": 5,
                                                 "within_tolerance_and_2x": 4,
                                                 "mean_regret": 0.156, "mean_waste": 4.2}},
                    cost_seconds=2.1)


def gradient(tiny_llama, layers: int = 1) -> Evidence:
    """A gradient estimate with per-layer ranks and bulky per-layer details (`layers` copies
    of each layer's spectra)."""
    names = [t.name for t in resolve_targets(tiny_llama).layers]
    pattern = {n: 2 ** (i % 4) for i, n in enumerate(names)}
    spectra = [{"name": n, "t_ab": [0.1 * k for k in range(64)],
                "singular_values": [1.0 / (k + 1) for k in range(64)]}
               for n in names for _ in range(layers)]
    return Evidence("gradient", "estimate", 4, interval=(2, 8), rank_pattern=pattern,
                    details={"n_examples": 32, "layers": spectra,
                             "settings": {"replay_mb": 0}}, cost_seconds=30.0)


@pytest.fixture
def swept(tiny_llama, tmp_path):
    """A recommend directory decided by a sweep, beside capacity and gradient evidence."""
    rec = decide([sweep(), capacity(tiny_llama), gradient(tiny_llama)],
                 resolve_targets(tiny_llama), ranks=RANKS, inputs=inputs())
    write_outputs(rec, tmp_path / "out")
    return rec, tmp_path / "out"


# ---------------------------------------------------------------------------------------------
# report.html without a browser


def test_dataset_text_is_escaped_in_the_report(tiny_llama, tmp_path):
    """`<script>` in the data file's name, the profile, an evidence note and a warning comes out
    as text, never as a tag; the page loads nothing from outside and holds its figures."""
    estimate = capacity(tiny_llama)
    estimate.notes.append(f"a record reads {SCRIPT}")
    rec = decide([estimate], resolve_targets(tiny_llama), ranks=RANKS,
                 inputs=inputs(data=f"{SCRIPT}.jsonl") | {"model": f"m{SCRIPT}"})
    rec.inputs["profile"]["format"] = SCRIPT
    rec.warnings.append(f"odd text: {SCRIPT}")
    write_outputs(rec, tmp_path / "out")
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert "<script" not in page.lower()
    assert page.count("&lt;script&gt;") >= 4
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//)""", page, re.I)
    assert 'src="data:image/png;base64,' in page  # the capacity figure, embedded
    assert f'<span id="rank">{rec.rank}</span>' in page


def test_report_holds_decision_curve_costs_heatmap_and_evidence(swept):
    rec, out = swept
    page = (out / "report.html").read_text(encoding="utf-8")
    for part in ('id="rank-curve"', 'id="cost"', 'id="layer-heatmap"', "<h3>sweep</h3>",
                 "<h3>capacity</h3>", "<h3>gradient</h3>", "confidence medium",
                 'href="evidence/gradient.json"'):
        assert part in page, part
    assert page.index('id="rank"') < page.index('id="rank-curve"') < page.index('id="cost"')
    assert all(f"<li>{r}</li>" in page for r in rec.rationale if "<" not in r and "'" not in r)


# ---------------------------------------------------------------------------------------------
# report.html in a real browser


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    reason = ("chromium is not installed (Debian: apt-get install chromium; scripts/test.sh "
              "installs it)")
    if os.environ.get("LORANK_REQUIRE_CHROMIUM") == "1":
        pytest.fail(f"Chromium is required here (LORANK_REQUIRE_CHROMIUM=1): {reason}")
    pytest.skip(reason)


def browse(page: Path, tmp_path: Path, *args: str) -> str:
    """Run headless Chromium on a local page; its stdout."""
    done = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1000,1400", *args,
         page.resolve().as_uri()], capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def screenshot(page: Path, tmp_path: Path, name: str) -> np.ndarray:
    import matplotlib.image

    png = tmp_path / f"{name}.png"
    browse(page, tmp_path, f"--screenshot={png}")
    return matplotlib.image.imread(png)[..., :3]


def white_like(png_base64: str) -> str:
    """A white PNG (base64) of the same pixel size as the given one."""
    import matplotlib.image

    header = base64.b64decode(png_base64[:64])  # IHDR: width and height at bytes 16-24
    width, height = struct.unpack(">II", header[16:24])
    buffer = io.BytesIO()
    matplotlib.image.imsave(buffer, np.ones((height, width, 3)), format="png")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def colourful(image: np.ndarray) -> tuple[int, int]:
    """(distinct colours, pixels whose channels differ by more than a quarter: not grey)."""
    pixels = (image.reshape(-1, 3) * 255).round().astype(np.int32)
    distinct = len(np.unique(pixels[:, 0] * 65536 + pixels[:, 1] * 256 + pixels[:, 2]))
    return distinct, int(((pixels.max(axis=1) - pixels.min(axis=1)) > 64).sum())


def test_chromium_shows_the_rank_and_the_curve(swept, tmp_path):
    rec, out = swept
    page = out / "report.html"
    dom = browse(page, tmp_path, "--dump-dom")
    assert re.search(rf'<span id="rank">\s*{rec.rank}\s*</span>', dom)
    assert "LoRA rank" in dom and 'id="rank-curve"' in dom
    shown = screenshot(page, tmp_path, "report")
    assert (shown < 0.9).any(axis=2).mean() > 0.05, "the page renders almost blank"
    # the same page with a white image of the same size for the curve: what the figure adds
    bare = tmp_path / "bare.html"
    bare.write_text(re.sub(r'(<img id="rank-curve"[^>]*src="data:image/png;base64,)([^"]+)',
                           lambda m: m.group(1) + white_like(m.group(2)), page.read_text()))
    without = screenshot(bare, tmp_path, "bare")
    (colours, saturated), (colours0, saturated0) = colourful(shown), colourful(without)
    assert colours > 500 and colours > colours0 + 200, (colours, colours0)
    assert saturated > saturated0 + 1000, (saturated, saturated0)  # the coloured curve
    assert (np.abs(shown - without).sum(axis=2) > 0.1).sum() > 10_000  # axes, labels, curve


# ---------------------------------------------------------------------------------------------
# the terminal


def summary(rec, out: Path | None, monkeypatch, command: str = "recommend") -> str:
    monkeypatch.setenv("COLUMNS", "80")
    console = Console(file=io.StringIO(), record=True)  # its width from COLUMNS
    assert console.width == 80
    print_recommendation(rec, console, out=out, command=command)
    return console.export_text()


def test_summary_fits_80_columns_and_lists_every_file(swept, monkeypatch):
    rec, out = swept
    text = summary(rec, out, monkeypatch)
    too_long = [line for line in text.splitlines() if len(line) > 80]
    assert not too_long, too_long
    assert "how sure:" in text and "the sweep trained every rank on its own" in text
    assert "sweep (decided)" in text and "says rank 4" in text
    flat = " ".join(text.split())
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == sorted(name for name, _ in written_files(rec))
    assert all(name in flat for name in written), written
    assert f"lorank export {out} --to peft" in flat


def test_summary_suggests_a_measured_curve_with_its_time(tiny_llama, tmp_path, monkeypatch):
    """Without a curve the next step is the probe at the planned run's length; its time comes
    from the measured forward speed: 102 steps x 3 x 0.002 s x 8 x 48.5 tokens + 7 ranks x 30
    examples x 48.5 tokens x 0.002 s = 258 s, about 4 minutes."""
    rec = decide([capacity(tiny_llama)], resolve_targets(tiny_llama), ranks=RANKS,
                 inputs=inputs())
    text = " ".join(summary(rec, tmp_path, monkeypatch, command="demo").split())
    assert "lorank demo again with --budget 102" in text and "about 4 minutes here" in text
    assert "4 of 7" in text and "high: 80% or more" in text
    rec.inputs["profile"]["forward_seconds_per_token"] = 0.0  # not measured: no number
    text = " ".join(summary(rec, None, monkeypatch).split())
    assert "--budget 102 (one training run of the planned 102 steps)" in text


@pytest.mark.parametrize("command", ["", "recommend", "analyze", "probe", "targets", "sweep",
                                     "bench", "demo", "inspect", "shrink", "export"])
def test_help_fits_80_columns(monkeypatch, capsys, command):
    monkeypatch.setenv("COLUMNS", "80")
    code, out, _ = run(monkeypatch, capsys, *([command] if command else []), "--help")
    assert code == 0 and "Usage:" in out
    too_long = [line for line in out.splitlines() if len(line) > 80]
    assert not too_long, too_long
    if command == "sweep":  # each option's help beside it, not a word per line
        assert "  --ranks <str>                   comma-separated ranks" in out


# ---------------------------------------------------------------------------------------------
# recommendation.json stays small


def test_bulky_evidence_goes_to_its_own_file(tiny_llama, tmp_path):
    many = gradient(tiny_llama, layers=20)
    rec = decide([sweep(), capacity(tiny_llama), many], resolve_targets(tiny_llama),
                 ranks=RANKS, inputs=inputs())
    before = len(json.dumps(rec.to_dict()))
    write_outputs(rec, tmp_path / "out")
    small = (tmp_path / "out" / "recommendation.json").read_text()
    assert before > 200_000 and len(small) < 8_000, (before, len(small))
    entry = next(e for e in json.loads(small)["evidence"] if e["name"] == "gradient")
    assert entry["evidence_file"] == "evidence/gradient.json"
    assert entry["moved"] == ["details.layers"]  # 14 layers' rank_pattern is small: kept
    assert entry["details"] == {"n_examples": 32, "settings": {"replay_mb": 0}}
    full = json.loads((tmp_path / "out" / "evidence" / "gradient.json").read_text())
    assert full == json.loads(json.dumps(rec.evidence[2]))  # nothing lost
    assert len(rec.evidence[2]["details"]["layers"]) == 20 * 14  # the API's copy is whole
    small_parts = [e for e in json.loads(small)["evidence"] if e["name"] != "gradient"]
    assert all("evidence_file" not in e for e in small_parts)  # nothing bulky there
    assert all(len(json.dumps(v)) <= INLINE_BYTES or k in ("best_lr", "recipe")
               for e in small_parts for k, v in e["details"].items())
    back = read_recommendation(tmp_path / "out")  # `lorank export` reads the small file
    assert back.rank == rec.rank == 4 and "learning_rate: 0.002" in export_config(back,
                                                                                  "axolotl")


def test_render_report_needs_no_files(tiny_llama):
    """The page renders from a Recommendation alone (no evidence files, no output folder)."""
    rec = decide([], resolve_targets(tiny_llama), ranks=RANKS)
    page = render_report(rec)
    assert "No training run measured a rank–loss curve" in page and rec.decided_by == ""
