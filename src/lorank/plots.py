"""Plots of measured curves: validation loss against rank, and against step.

Drawn by the stages that measure them (the sweep, the probe, the benchmark), so they sit below
all of those; matplotlib loads only when a plot is drawn.
"""

from __future__ import annotations

from pathlib import Path

from lorank.util import save_figure


def plot_rank_curve(curves: dict[str, dict[int, dict[str, float]]], path: Path, *,
                    picks: dict[str, int] | None = None, title: str = "rank–loss curve") -> None:
    """Validation loss against rank (log2 axis) with error bars; each method's pick marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, curve in curves.items():
        ranks = sorted(curve)
        loss = [curve[r]["loss"] for r in ranks]
        se = [curve[r].get("se", 0.0) for r in ranks]
        ax.errorbar(ranks, loss, yerr=[2 * s for s in se], marker="o", capsize=3, label=label)
    by_rank: dict[int, list[str]] = {}  # one line per picked rank, naming every method on it
    for name, rank in (picks or {}).items():
        by_rank.setdefault(rank, []).append(name)
    for i, (rank, names) in enumerate(sorted(by_rank.items())):
        ax.axvline(rank, linestyle="--", alpha=0.6, color=f"C{(i + len(curves)) % 10}",
                   label=f"r={rank}: " + ", ".join(names))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("LoRA rank")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title)
    if by_rank:  # the legend beside the axes, so it never covers the curve
        fig.set_size_inches(10, 4)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    else:
        ax.legend(fontsize=7)
    save_figure(fig, path)
    plt.close(fig)


def plot_learning_curves(trials: list[dict], curve: dict[int, dict], path: Path) -> None:
    """Validation loss against step for each rank's runs at its best lr (one line per seed),
    to see whether runs converged and whether a rank's best lr was still improving."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, rank in enumerate(sorted(curve)):
        runs = [t for t in trials if t["rank"] == rank and t["lr"] == curve[rank]["lr"]
                and t["status"] == "ok" and t.get("curve")]
        for j, run in enumerate(sorted(runs, key=lambda t: t["seed"])):
            steps, _, val = zip(*run["curve"], strict=True)
            ax.plot(steps, val, color=f"C{i % 10}", alpha=0.8, linestyle="-" if j == 0 else ":",
                    label=f"r={rank} (lr {curve[rank]['lr']:g})" if j == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("learning curves at each rank's best lr (dotted: later seeds)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    save_figure(fig, path)
    plt.close(fig)
