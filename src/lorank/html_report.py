"""report.html: one self-contained page that shows a recommendation and its evidence.

From the top: the decision and its reasons (with what the confidence means), the rank–loss
curve(s) with ±2 SE error bars and the pick marked where a probe or sweep measured one (else
the capacity estimate's bits per rank), the cost per rank as a table, the per-layer ranks as a
heatmap where there are any, each estimator's evidence, the inputs and the files written.
Figures are matplotlib PNGs embedded as base64 data URIs: no external URL, no script. Every
piece of text that comes from the data, the model or the file system is escaped.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from typing import Any
from urllib.parse import quote

from lorank.decide import Recommendation
from lorank.plots import capacity_figure, figure_png, heatmap_figure, rank_curve_figure
from lorank.report import human_bytes, human_count, profile_lines
from lorank.summary import confidence_words, measured_lines, next_step

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; color: #1d232a; margin: 24px auto;
       max-width: 960px; padding: 0 16px; }
h1 { font-size: 30px; margin: 0 0 4px; } h2 { font-size: 20px; margin: 28px 0 8px;
     border-bottom: 1px solid #d5dae0; padding-bottom: 3px; }
.decision { font-size: 17px; } .muted { color: #5b6570; }
.conf { display: inline-block; padding: 1px 8px; border-radius: 4px; color: #fff; }
.conf-high { background: #2e7d32; } .conf-medium { background: #b26a00; }
.conf-low { background: #b3261e; } .conf-unknown { background: #5b6570; }
.warn { color: #8a4b00; } img { max-width: 100%; height: auto; }
table { border-collapse: collapse; margin: 6px 0; font-size: 14px; }
th, td { border: 1px solid #d5dae0; padding: 3px 8px; text-align: right; }
th { background: #f2f4f6; } td.l, th.l { text-align: left; }
tr.pick td { background: #e7f3e8; font-weight: 600; }
pre { background: #f6f8fa; padding: 8px; overflow-x: auto; font-size: 12px; }
.evidence { border: 1px solid #d5dae0; border-radius: 6px; padding: 4px 12px; margin: 10px 0; }
"""

_BLOCK = re.compile(r"\.(\d+)\.")  # the index of a repeated transformer block in a module name


def esc(value: Any) -> str:
    """Text as HTML, quotes included (for attributes too)."""
    return html.escape(str(value), quote=True)


def _img(png: bytes, alt: str, ident: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img id="{esc(ident)}" alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def _curves(rec: Recommendation) -> dict[str, dict[int, dict[str, float]]]:
    """Each evidence's measured rank–loss curve with at least two finite points."""
    found = {}
    for e in rec.evidence:
        curve = {int(r): c for r, c in (e.get("curve") or {}).items()
                 if isinstance(c, dict) and isinstance(c.get("loss"), (int, float))
                 and math.isfinite(c["loss"])}
        if len(curve) >= 2:
            found[str(e.get("name"))] = curve
    return found


def curve_section(rec: Recommendation) -> str:
    """The measured curve(s) with the pick marked; else the capacity estimate's bits per rank;
    else a sentence saying that nothing was measured along ranks."""
    curves = _curves(rec)
    if curves:
        picks = {"recommended": rec.rank}
        for e in rec.evidence:
            if str(e.get("name")) in curves and e.get("suggested_rank") is not None:
                picks[str(e.get("name"))] = int(e["suggested_rank"])
        fig = rank_curve_figure(curves, picks=picks,
                                title="validation loss by rank (error bars ±2 SE)")
        return ("<h2>Rank–loss curve</h2>" + _img(figure_png(fig), "rank-loss curve",
                                                  "rank-curve"))
    capacity = next((e for e in rec.evidence if e.get("name") == "capacity"), None)
    d = (capacity or {}).get("details") or {}
    if d.get("adapter_params") and d.get("total_bits") and d.get("bits_per_param"):
        stored = {int(r): float(p) * float(d["bits_per_param"])
                  for r, p in d["adapter_params"].items()}
        fig = capacity_figure(stored, float(d["total_bits"]),
                              spread_log2=float(d.get("spread_log2") or 0.0), pick=rec.rank,
                              title="capacity: bits to learn against bits each rank stores")
        return ("<h2>Capacity by rank</h2><p class=\"muted\">No training run measured a "
                "rank–loss curve here; this is the capacity estimate's evidence: the smallest "
                "rank whose adapter stores the data's bits is picked. <code>--budget</code> "
                "adds a measured curve.</p>"
                + _img(figure_png(fig), "capacity by rank", "capacity-curve"))
    return ("<h2>Rank–loss curve</h2><p class=\"muted\">No training run measured a rank–loss "
            "curve here; <code>--budget</code> adds one.</p>")


def cost_table(rec: Recommendation) -> str:
    """Cost per candidate rank (parameters, adapter size, training memory) and what each
    estimator says there; the recommended rank's row marked."""
    names = [str(e.get("name")) for e in rec.evidence]
    head = "".join(f"<th>{esc(c)}</th>" for c in
                   ("rank", "trainable params", "adapter", "training memory", *names))
    rows = []
    for row in rec.candidates:
        says = row.get("says") or {}
        cells = [str(row["rank"]) + (" ←" if row["rank"] == rec.rank else ""),
                 human_count(row["params"]), human_bytes(row["adapter_bytes"]),
                 human_bytes(row["memory_total"]), *[says.get(n, "") for n in names]]
        mark = ' class="pick"' if row["rank"] == rec.rank else ""
        rows.append(f"<tr{mark}>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>")
    return ("<h2>Cost per rank</h2><table id=\"cost\"><tr>" + head + "</tr>" + "".join(rows)
            + "</table>")


def layer_grid(ranks: dict[str, int]) -> tuple[list[list[float | None]], list[str], list[str]]:
    """Per-layer ranks as (grid, row labels, column labels): one row per transformer block
    (its index in the module name; "other" for modules outside blocks), one column per kind
    of layer (`lorank.targets.layer_kinds`)."""
    from lorank.targets import layer_kinds

    kinds = layer_kinds(list(ranks))
    blocks = {n: (int(m.group(1)) if (m := _BLOCK.search(f".{n}.")) else None) for n in ranks}
    rows = sorted({b for b in blocks.values() if b is not None})
    labels = [f"block {b}" for b in rows]
    if any(b is None for b in blocks.values()):
        labels.append("other")
    cols = sorted(set(kinds.values()))
    grid: list[list[float | None]] = [[None] * len(cols) for _ in labels]
    for name, rank in ranks.items():
        b = blocks[name]
        i = rows.index(b) if b is not None else len(labels) - 1
        grid[i][cols.index(kinds[name])] = float(rank)
    return grid, labels, cols


def heatmap_section(rec: Recommendation) -> str:
    """The recommended per-layer ranks (`rank_pattern`, other targets at the global rank) or,
    without one, an estimator's per-layer ranks as reported; empty when neither exists."""
    if rec.rank_pattern:
        # every layer an estimator measured, at the global rank unless the pattern says not
        known = {n for e in rec.evidence for n in (e.get("rank_pattern") or {})}
        ranks = dict.fromkeys(sorted(known), rec.rank) | dict(rec.rank_pattern)
        title = "recommended rank per layer (rank_pattern)"
        note = (f"{len(rec.rank_pattern)} layers at their own rank; every other target layer "
                f"at the global rank {rec.rank}.")
    else:
        e = next((e for e in rec.evidence if e.get("rank_pattern")), None)
        if e is None:
            return ""
        ranks = dict(e["rank_pattern"])
        title = f"{e.get('name')}: rank per layer (reported, not used)"
        note = (f"{e.get('name')} measured a rank per layer; the recommendation uses one "
                f"rank ({rec.rank}) for every layer.")
    fig = heatmap_figure(*layer_grid(ranks), title=title)
    return (f"<h2>Per-layer ranks</h2><p class=\"muted\">{esc(note)}</p>"
            + _img(figure_png(fig), title, "layer-heatmap"))


def _json_block(value: Any) -> str:
    return f"<pre>{esc(json.dumps(value, indent=1, default=str))}</pre>"


def evidence_section(rec: Recommendation, moved: dict[str, str]) -> str:
    """Each estimator: what it measured and says, its assumptions and notes, its per-rank
    words, and its details (collapsed; bulky parts named by their evidence file)."""
    parts = ["<h2>Evidence</h2>"]
    for e, line in zip(rec.evidence, measured_lines(rec), strict=True):
        name = str(e.get("name"))
        items = [f"<p>{esc(line)}</p>"]
        for title, key in (("assumptions", "assumptions"), ("notes", "notes")):
            if e.get(key):
                items.append(f"<p class=\"muted\">{title}:</p><ul>"
                             + "".join(f"<li>{esc(x)}</li>" for x in e[key]) + "</ul>")
        details = {k: v for k, v in (e.get("details") or {}).items()
                   if len(json.dumps(v, default=str)) <= 2000}
        left_out = sorted(set(e.get("details") or {}) - set(details))
        if details:
            items.append("<details><summary>details</summary>" + _json_block(details)
                         + "</details>")
        if name in moved:
            items.append(f"<p class=\"muted\">the whole evidence, per-layer details "
                         f"included: <a href=\"{esc(quote(moved[name]))}\">{esc(moved[name])}"
                         "</a></p>")
        elif left_out:
            items.append(f"<p class=\"muted\">left out here for size: "
                         f"{esc(', '.join(left_out))} (in recommendation.json)</p>")
        parts.append(f"<div class=\"evidence\"><h3>{esc(name)}</h3>{''.join(items)}</div>")
    return "".join(parts) if rec.evidence else ""


def inputs_section(rec: Recommendation, files: list[tuple[str, str]]) -> str:
    """The data profile, the inputs (model, data, planned run), versions and the files."""
    inputs = dict(rec.inputs)
    parts = ["<h2>Inputs</h2>"]
    if inputs.get("profile"):
        parts.append("<p>" + "<br>".join(esc(x) for x in profile_lines(inputs["profile"]))
                     + "</p>")
    rows = [(k, inputs[k]) for k in ("model", "model_path", "data", "val_data", "data_hash",
                                     "format", "targets", "max_length", "seed")
            if inputs.get(k) is not None]
    rows.append(("target_modules", ", ".join(rec.target_modules)))
    if rec.modules_to_save:
        rows.append(("modules_to_save", ", ".join(rec.modules_to_save)))
    parts.append("<table>" + "".join(f"<tr><th class=\"l\">{esc(k)}</th><td class=\"l\">"
                                     f"{esc(v)}</td></tr>" for k, v in rows) + "</table>")
    if inputs.get("planned_run"):
        parts.append("<p>planned run:</p>" + _json_block(inputs["planned_run"]))
    if files:
        parts.append("<h2>Files</h2><table>" + "".join(
            f"<tr><td class=\"l\"><a href=\"{esc(quote(name))}\">{esc(name)}</a></td>"
            f"<td class=\"l\">{esc(what)}</td></tr>" for name, what in files) + "</table>")
    if inputs.get("versions"):
        parts.append("<p class=\"muted\">" + esc(", ".join(
            f"{k} {v}" for k, v in inputs["versions"].items())) + "</p>")
    return "".join(parts)


def render_report(rec: Recommendation, files: list[tuple[str, str]] | None = None,
                  evidence_files: dict[str, str] | None = None) -> str:
    """The whole page as one HTML string. `files`: (name relative to the page, what it holds)
    for the files written beside it; `evidence_files`: evidence name -> the file beside the
    page that holds its whole evidence (linked from that evidence)."""
    files = files or []
    moved = evidence_files or {}
    level = rec.confidence if rec.confidence in ("high", "medium", "low") else "unknown"
    memory = rec.memory.get("total")
    model = rec.inputs.get("model")
    title = f"lorank: rank {rec.rank}" + (f" for {model}" if model else "")
    scale = "rsLoRA, scale alpha/sqrt(r)" if rec.use_rslora else "scale alpha/r"
    decision = (f"lora_alpha {rec.lora_alpha:g} ({scale}); "
                f"{human_count(rec.trainable_params)} trainable parameters"
                + (f"; about {human_bytes(memory)} to train" if memory else "")
                + (f"; {len(rec.rank_pattern)} layers at their own rank" if rec.rank_pattern
                   else ""))
    top = [f"<h1>LoRA rank <span id=\"rank\">{rec.rank}</span></h1>",
           f"<p class=\"decision\">{esc(decision)}</p>",
           f"<p><span class=\"conf conf-{level}\">confidence {esc(rec.confidence)}</span> "
           f"{esc(confidence_words(rec).split(': ', 1)[-1])}</p>"]
    if rec.rationale:
        top.append("<h2>Why</h2><ul>" + "".join(f"<li>{esc(r)}</li>" for r in rec.rationale)
                   + "</ul>")
    if rec.warnings:
        top.append("<ul class=\"warn\">" + "".join(f"<li>warning: {esc(w)}</li>"
                                                   for w in rec.warnings) + "</ul>")
    steps = next_step(rec)
    top.append("<p><b>Next:</b> " + esc("; ".join(steps)) + "</p>")
    body = "".join([*top, curve_section(rec), cost_table(rec), heatmap_section(rec),
                    evidence_section(rec, moved), inputs_section(rec, files)])
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{esc(title)}</title><style>{STYLE}</style></head>\n<body>{body}"
            "</body></html>\n")
