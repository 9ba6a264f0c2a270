"""The demo's report: JSON rows, a Markdown table with what it shows, a quality-vs-cost plot, a GIF grid."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np
import torch

from tmd.world.benchmark import format_table

FRAME_MS = 250
"""How long the GIF shows each frame: imageio's GIF writer reads ``duration`` in milliseconds."""

ROW_NOTES = {
    "tmd_stage1": "`tmd_stage1` rows are the student after stage 1 only.",
    "linvideo": "`linvideo` rows are the LinVideo-linearised teacher, sampled like the teacher with CFG.",
    "linvideo_tmd": "`linvideo_tmd` rows are TMD (both stages, the same budgets) distilled from the `linvideo` model "
    "instead of the teacher.",
}
"""What a row of the table is, for the methods whose name does not say it; only rows present are described."""

TABLE_KEYS = (
    "method",
    "outer_steps",
    "inner_steps",
    "effective_nfe",
    "latency_ms",
    "speedup_vs_teacher",
    "total",
    "quality",
    "semantic",
    "frechet",
    "diversity",
)


def _best(rows: list[dict], method: str, outer: int | None = None) -> dict | None:
    candidates = [r for r in rows if r["method"] == method and (outer is None or r["outer_steps"] == outer)]
    return max(candidates, key=lambda r: r["total"]) if candidates else None


def findings(rows: list[dict]) -> list[str]:
    """Plain sentences on where TMD stands against the teacher and DMD2, from the measured rows."""
    teacher = max((r for r in rows if r["method"] == "teacher"), key=lambda r: r["outer_steps"])
    lines = [f"Teacher {teacher['outer_steps']}x2 NFE: total {teacher['total']:.3f} at {teacher['latency_ms']:.0f} ms per video."]
    for outer in (2, 1):
        tmd, dmd = _best(rows, "tmd", outer), _best(rows, "dmd2", outer)
        if tmd is None:
            continue
        change = 100 * (tmd["total"] - teacher["total"]) / teacher["total"]
        line = (
            f"TMD M={outer} (best N={tmd['inner_steps']}, {tmd['effective_nfe']:.2f} NFE): total {tmd['total']:.3f}, "
            f"{change:+.1f}% relative to the teacher, {tmd['speedup_vs_teacher']:.1f}x faster"
        )
        if dmd is not None:
            verdict = "above" if tmd["total"] > dmd["total"] else "below"
            line += f"; {verdict} DMD2 {outer}-step ({dmd['total']:.3f})"
        lines.append(line + ".")
    linearised = _best(rows, "linvideo")
    if linearised is not None:
        steps = linearised["outer_steps"]
        same = next((r for r in rows if r["method"] == "teacher" and r["outer_steps"] == steps), None)
        versus = f"; the teacher at {steps} steps: {same['total']:.3f} at {same['latency_ms']:.0f} ms" if same else ""
        lines.append(
            f"Linearised teacher (LinVideo, sampled like the teacher with CFG) at {steps} steps: total "
            f"{linearised['total']:.3f} at {linearised['latency_ms']:.0f} ms per video{versus}."
        )
    lines.extend(_linearised_tmd(rows))
    target = _best(rows, "tmd", 2)
    if target is not None:
        dmd_best = max((r["total"] for r in rows if r["method"] == "dmd2"), default=float("nan"))
        met = (
            (teacher["total"] - target["total"]) <= 0.02 * teacher["total"]
            and target["total"] > dmd_best
            and target["speedup_vs_teacher"] >= 20
        )
        lines.append(
            "Target (TMD M=2 within 2% of the teacher, above DMD2, >= 20x faster): " + ("met." if met else "NOT met in this run.")
        )
    return lines


def _linearised_tmd(rows: list[dict]) -> list[str]:
    """LinVideo then TMD against plain TMD at the same M x N: what linearising the teacher costs in quality
    and gains in latency once both are few-step."""
    best = _best(rows, "linvideo_tmd", 2) or _best(rows, "linvideo_tmd")
    if best is None:
        return []
    outer, inner = best["outer_steps"], best["inner_steps"]
    line = (
        f"Linearised teacher + TMD, M={outer} x N={inner} (its best N at M={outer}, {best['effective_nfe']:.2f} NFE): "
        f"total {best['total']:.3f} at {best['latency_ms']:.0f} ms per video"
    )
    plain = next((r for r in rows if r["method"] == "tmd" and (r["outer_steps"], r["inner_steps"]) == (outer, inner)), None)
    if plain is not None:
        change = 100 * (best["total"] - plain["total"]) / plain["total"]
        line += f"; plain TMD at the same M x N: {plain['total']:.3f} at {plain['latency_ms']:.0f} ms ({change:+.1f}% total)"
    return [line + "."]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for method in dict.fromkeys(r["method"] for r in rows):
        sub = sorted((r for r in rows if r["method"] == method), key=lambda r: r["effective_nfe"])
        for ax, key in zip(axes, ("effective_nfe", "latency_ms")):
            ax.plot([r[key] for r in sub], [r["total"] for r in sub], "o-", label=method)
    for ax, label in zip(axes, ("effective NFE", "latency per video (ms)")):
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("benchmark total")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("Synthetic world: quality against cost")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def gif_grid(samples: dict[str, torch.Tensor], path: Path, scale: int = 2, label_width: int = 96) -> None:
    """One row per sampler (named in a left margin), one column per prompt (same noise), frames animated."""
    import imageio.v2 as imageio
    from PIL import Image, ImageDraw

    rows = [torch.cat(list(videos), dim=-1) for videos in samples.values()]  # each (3, F, H, W * prompts)
    grid = torch.cat(rows, dim=-2)  # (3, F, H * samplers, W * prompts)
    frames = ((grid.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    frames = np.repeat(np.repeat(frames, scale, axis=1), scale, axis=2)
    margin = Image.new("RGB", (label_width, frames.shape[1]), "white")
    draw = ImageDraw.Draw(margin)
    row_height = frames.shape[1] // len(samples)
    for i, label in enumerate(samples):
        draw.text((3, i * row_height + row_height // 2 - 5), label, fill="black")
    labels = np.asarray(margin)
    imageio.mimsave(path, [np.concatenate([labels, frame], axis=1) for frame in frames], duration=FRAME_MS, loop=0)


def write_report(out: Path, report: dict, samples: dict[str, torch.Tensor], prompts: list[str]) -> None:
    rows = report["rows"]
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(rows, out / "quality_vs_cost.png")
    gif_grid(samples, out / "samples.gif")
    table = format_table([{k: r[k] if r[k] is not None else "-" for k in TABLE_KEYS} for r in rows])
    timings = ", ".join(f"{k} {v:.0f} s" for k, v in report["timings_s"].items())
    text = [
        "# tmd demo report",
        "",
        f"Preset `{report['preset']}`, teacher CFG {report['guidance']}, shift {report['shift']}; "
        f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}.",
        f"Wall-clock: {timings}.",
        "",
        f"Every row samples the same {report['videos_scored']} videos (the benchmark's fixed prompt set, same noise); latency is the",
        "median of 3 single-video samples after a warm-up.",
        *[note for method, note in ROW_NOTES.items() if any(r["method"] == method for r in rows)],
        "",
        "```",
        table,
        "```",
        "",
        "## What it shows",
        "",
        *[f"- {line}" for line in findings(rows)],
        "",
        "Plot: `quality_vs_cost.png`. Samples (rows: samplers, named on the left; columns: "
        + "; ".join(prompts)
        + "): `samples.gif`.",
        "",
    ]
    (out / "report.md").write_text("\n".join(text))
