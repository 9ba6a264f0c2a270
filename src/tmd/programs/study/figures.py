"""The study report's figures: quality against effective NFE, the training curves, the paired differences."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tmd.world.benchmark import QUALITY_DIMS, SEMANTIC_DIMS


def as_float(value: Any) -> float:
    """Records write inf / NaN as strings (JSON has neither)."""
    return float(value)


SCORE_KEYS = ("total", "quality", "semantic", "frechet", "diversity", "detect_rate", *QUALITY_DIMS, *SEMANTIC_DIMS)
TRAINED_INTERVAL = "Student-t 95% over the per-training-seed means (each the mean over the evaluation noise seeds)"
TEACHER_INTERVAL = "Student-t 95% over the evaluation noise seeds (nothing trained: no training seed)"
README_BEGIN, README_END = "<!-- tmd study {name}: begin -->", "<!-- tmd study {name}: end -->"


# ----------------------------------------------------------------------------------------------
# Plots.


def write_plots(content: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = content["rows"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for series in dict.fromkeys(r["series"] for r in rows):
        sub = sorted((r for r in rows if r["series"] == series), key=lambda r: r["effective_nfe"])
        x, y = [r["effective_nfe"] for r in sub], [r["total_mean"] for r in sub]
        err = [
            [m - (ci[0] if ci[0] is not None else m) for m, ci in zip(y, (r["total_ci95"] for r in sub))],
            [(ci[1] if ci[1] is not None else m) - m for m, ci in zip(y, (r["total_ci95"] for r in sub))],
        ]
        ax.errorbar(x, y, yerr=err, fmt="o-", capsize=3, label=series)
    ax.set_xscale("log")
    ticks = sorted({round(r["effective_nfe"], 2) for r in rows})
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks], fontsize=8)
    ax.minorticks_off()
    ax.set_xlabel("effective NFE")
    ax.set_ylabel("benchmark total")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "quality_vs_nfe.png", dpi=110)
    plt.close(fig)

    if content["curves"]:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
        for i, (_name, curve) in enumerate(sorted(content["curves"].items())):
            colour = f"C{i}"
            for j, (seed, points) in enumerate(sorted(curve["points"].items(), key=lambda kv: str(kv[0]))):
                label = curve["label"] if j == 0 else None
                totals = [as_float(p["total"]) for p in points]
                axes[0].plot([p["step"] for p in points], totals, "-", color=colour, alpha=0.8, label=label)
                offset = curve["parent_seconds"][seed]
                axes[1].plot([(offset + p["train_seconds"]) / 60 for p in points], totals, "-", color=colour, alpha=0.8)
        axes[0].set_xlabel("iteration")
        axes[1].set_xlabel("training wall-clock (min, including stage 1)")
        axes[0].set_ylabel("total (fixed eval set)")
        for ax in axes:
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "curves.png", dpi=110)
        plt.close(fig)

    if content["paired"]:
        pairs = content["paired"]
        fig, ax = plt.subplots(figsize=(7, 0.5 * len(pairs) + 1.5))
        for i, p in enumerate(pairs):
            low, high = p["diff_ci95"]
            if low is not None:
                ax.plot([low, high], [i, i], "-", color="C0")
            ax.plot([p["diff_mean"]], [i], "o", color="C0")
        ax.axvline(0, color="grey", lw=1)
        ax.set_yticks(range(len(pairs)), [f"{p['a']} - {p['b']}" for p in pairs], fontsize=8)
        ax.set_xlabel("difference in total (95% CI, paired by training seed)")
        ax.invert_yaxis()
        fig.tight_layout()
        fig.savefig(out / "paired.png", dpi=110)
        plt.close(fig)
