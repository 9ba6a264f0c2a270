"""``tmd study --report``: tables with intervals, paired differences, variance components and plots,
from the committed run records alone (no weights, nothing sampled).

Output in the study's ``report_dir``: ``report.md``, ``results.json``, ``quality_vs_nfe.png``,
``curves.png`` (runs trained with ``train.eval_every``) and ``paired.png``. Everything is a function of
the records and the study file, so the same records give the same files on any machine.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from tmd.config import shipped_configs
from tmd.eval.stats import LEVEL, paired_difference, t_interval, variance_components
from tmd.programs.study.figures import as_float, write_plots
from tmd.programs.study.plan import Run, read_records, write_json
from tmd.programs.study.spec import TEACHER, StudyConfig, row_names
from tmd.world.benchmark import QUALITY_DIMS, SEMANTIC_DIMS, format_table

SCORE_KEYS = ("total", "quality", "semantic", "frechet", "diversity", "detect_rate", *QUALITY_DIMS, *SEMANTIC_DIMS)
TRAINED_INTERVAL = "Student-t 95% over the per-training-seed means (each the mean over the evaluation noise seeds)"
TEACHER_INTERVAL = "Student-t 95% over the evaluation noise seeds (nothing trained: no training seed)"
README_BEGIN, README_END = "<!-- tmd study {name}: begin -->", "<!-- tmd study {name}: end -->"


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _train_seconds(record: dict[str, Any], records_by_key: dict[str, dict[str, Any]]) -> float | None:
    """A run's training wall-clock including its chain of parents (TMD: stage 1 + stage 2); None if a
    parent's record is missing."""
    seconds = 0.0
    while record is not None:
        seconds += record["wall_seconds"].get("train", 0.0)
        parent = record.get("parent")
        if parent is None:
            return seconds
        record = records_by_key.get(parent)
    return None


def collect(study: StudyConfig, runs: list[Run], records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The report's content: rows, paired differences, curves and what is still missing."""
    by_name: dict[str, dict[int | None, Run]] = defaultdict(dict)
    for run in runs:
        by_name[run.name][run.seed] = run
    rows, missing = [], []
    noise = study.eval.noise_seeds
    for row_name, (spec, run_name, (outer, inner)) in row_names(study).items():
        grid, per_seed_scores, seconds, configs = {}, {}, [], []
        for seed, run in by_name[run_name].items():
            record = records.get(run.key)
            if record is None:
                missing.append(f"{run_name} seed {seed}" if seed is not None else run_name)
                continue
            scores = {s["noise_seed"]: s for s in record["scores"] if (s["outer_steps"], s["inner_steps"]) == (outer, inner)}
            grid[seed] = [scores[n]["total"] for n in noise]
            per_seed_scores[seed] = [scores[n] for n in noise]
            seconds.append(_train_seconds(record, records))
            configs.append(record["config"])
        if not grid:
            continue
        all_scores = [s for scores in per_seed_scores.values() for s in scores]
        trained = spec.method != TEACHER
        seeds = sorted(grid) if trained else []
        interval = t_interval([_mean(grid[s]) for s in seeds]) if trained else t_interval(grid[None])
        row = {
            "name": row_name,
            "label": _row_label(spec, run_name, outer, inner),
            "series": spec.series or spec.label or run_name,
            "method": spec.method,
            "outer_steps": outer,
            "inner_steps": inner,
            "effective_nfe": all_scores[0]["effective_nfe"],
            "seeds": seeds,
            "noise_seeds": noise,
            "videos": sum(s["videos"] for s in all_scores),
            "total_mean": interval.mean,
            "total_ci95": interval.as_list(),
            "interval": TRAINED_INTERVAL if trained else TEACHER_INTERVAL,
            "per_seed_total": {str(s): _mean(grid[s]) for s in seeds},
            "means": {k: _mean([as_float(s[k]) for s in all_scores]) for k in SCORE_KEYS},
            "variance": variance_components([grid[s] for s in seeds] if trained else [grid[None]]).as_dict()
            if len(noise) > 1
            else None,
            "complete": len(grid) == len(study.run_seeds(run_name)),
        }
        if trained:
            train = configs[0]["train"]
            row.update(
                steps=train["steps"],
                batch_size=train["batch_size"],
                lr=train["lr"],
                train_minutes=None if None in seconds else _mean(seconds) / 60,
            )
        rows.append(row)
    by_row = {r["name"]: r for r in rows}
    paired = []
    for pair in study.paired:
        a, b = by_row.get(pair.a), by_row.get(pair.b)
        if a is None or b is None or not set(a["seeds"]) & set(b["seeds"]):
            continue
        diff = paired_difference(
            {int(k): v for k, v in a["per_seed_total"].items()}, {int(k): v for k, v in b["per_seed_total"].items()}
        )
        paired.append(
            {
                "a": pair.a,
                "b": pair.b,
                "diff_mean": diff.interval.mean,
                "diff_ci95": diff.interval.as_list(),
                "seeds": diff.seeds,
                "interval": "Student-t 95% over the per-training-seed differences a - b",
            }
        )
    curves = {}
    for run_name, seeds in by_name.items():
        points = {seed: records[run.key]["curve"] for seed, run in seeds.items() if records.get(run.key, {}).get("curve")}
        if points:
            offsets = {}
            for seed, run in seeds.items():
                if seed in points:  # the parents' training time; 0 while a parent's record is missing
                    chain = _train_seconds(records[run.key], records)
                    offsets[seed] = 0.0 if chain is None else chain - records[run.key]["wall_seconds"]["train"]
            curves[run_name] = {"label": study.runs[run_name].label or run_name, "points": points, "parent_seconds": offsets}
    return {"rows": rows, "paired": paired, "curves": curves, "missing": sorted(set(missing))}


def _row_label(spec, run_name: str, outer: int, inner: int | None) -> str:
    label = spec.label or run_name
    if len(spec.score) == 1:
        return label
    if inner is not None:
        return f"{label} {outer}x{inner}"
    return f"{label} {outer} step" + ("s" if outer != 1 else "")


# ----------------------------------------------------------------------------------------------
# Text.


def _num(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if math.isfinite(value) else str(value)


def _ci(mean: float, ci: list[float | None]) -> str:
    return f"{_num(mean)} [{_num(ci[0])}, {_num(ci[1])}]"


def _pipe(header: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in body)]


def main_table(rows: list[dict[str, Any]]) -> list[str]:
    body = [
        [
            r["label"],
            r["method"],
            str(r["outer_steps"]),
            "-" if r["inner_steps"] is None else str(r["inner_steps"]),
            _num(r["effective_nfe"], 2),
            str(len(r["seeds"])) if r["seeds"] else "-",
            str(r["videos"]),
            _ci(r["total_mean"], r["total_ci95"]),
            *(_num(r["means"][k]) for k in ("quality", "semantic", "frechet", "diversity")),
        ]
        for r in rows
    ]
    return _pipe(
        [
            "row",
            "method",
            "M",
            "N",
            "eff. NFE",
            "train seeds",
            "videos",
            "total [95% CI]",
            "quality",
            "semantic",
            "frechet",
            "diversity",
        ],
        body,
    )


def _runs(n: int) -> str:
    return f"{n} run" + ("s" if n != 1 else "")


def _count(values) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for value in values:
        counts[value] += 1
    return counts


def _machines(records: list[dict[str, Any]]) -> list[str]:
    counts = _count(
        f"{m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch thread(s), torch {m['torch']}"
        + (f", {m['gpu']}" if m.get("gpu") else "")
        for m in (r["machine"] for r in records)
    )
    return [f"{text} ({_runs(n)})" for text, n in sorted(counts.items())]


def _commits(records: list[dict[str, Any]]) -> str:
    counts = _count((g["commit"] or "unknown")[:10] + ("+dirty" if g["dirty"] else "") for g in (r["git"] for r in records))
    return ", ".join(f"`{c}` ({_runs(n)})" for c, n in sorted(counts.items()))


def _datasets(records: list[dict[str, Any]]) -> list[str]:
    """A line per dataset the records trained on, from the ``synthesize.json`` each record holds."""
    used: dict[str, tuple[dict[str, Any], set[str]]] = {}
    for record in records:
        if record.get("dataset"):
            used.setdefault(record["dataset"]["key"], (record["dataset"], set()))[1].add(record["name"])
    lines = []
    for key, (dataset, names) in sorted(used.items()):
        made = dataset["synthesize"]
        lines.append(
            f"- Dataset `{dataset['name']}` ({key[:8]}): {made['entries']} samples of the world teacher, "
            f"{made['videos_per_prompt']} per prompt ({made['scheduler']}, {made['steps']} steps, CFG {made['guidance']}, "
            f"shift {made['shift']}, noise seeds {made['seed']} + i; `tmd synthesize`), trained on by {', '.join(sorted(names))}."
        )
    return lines


def dimension_table(rows: list[dict[str, Any]]) -> list[str]:
    keys = (*QUALITY_DIMS, *SEMANTIC_DIMS, "detect_rate")
    return _pipe(["row", *keys], [[r["label"], *(_num(r["means"][k], 3) for k in keys)] for r in rows])


def markdown(
    study: StudyConfig, study_file: str, records_dir: str, content: dict[str, Any], records: list[dict[str, Any]]
) -> str:
    rows, paired = content["rows"], content["paired"]
    trained = [r for r in records if r["method"] != TEACHER]
    train_hours = sum(r["wall_seconds"].get("train", 0.0) + r["wall_seconds"]["score"] for r in records) / 3600
    load = [
        x
        for r in records
        if r["machine"].get("load_average")
        for x in (r["machine"]["load_average"][0], r["machine"]["load_average_end"][0])
    ]
    lines = [
        f"# Study `{study.name}`",
        "",
        *([study.description.strip(), ""] if study.description else []),
        f"Train: `tmd study --config {study_file} --jobs 2` (resumes; `--dry-run` lists the runs and their state). "
        f"This report: `tmd study --config {study_file} --report`, from the run records in `{records_dir}/` alone.",
        "",
        f"- Evaluation: every row on the same {len(study.eval.noise_seeds)} noise seeds {study.eval.noise_seeds} x the 72 "
        "prompts of the world benchmark (72 videos per noise seed; inner and re-noising noise seeded alike).",
        f"- Records: {_runs(len(records))}, {len(trained)} of them trained; sum of their wall-clock (training + scoring) "
        f"{train_hours:.2f} h, i.e. about {train_hours / 2:.2f} h with `--jobs 2`.",
        *[f"- Machine: {m}" for m in _machines(records)],
        *([f"- Load average (1 min) at run starts and ends: {min(load):.2f} - {max(load):.2f}"] if load else []),
        f"- Code: {_commits(records)} (the git commit each run started with)." if records else "- Code: no records yet.",
        *[f"- Recorded by `{c}` ({_runs(n)})" for c, n in sorted(_count(r["command"] for r in records).items())],
        *_datasets(records),
    ]
    if content["missing"]:
        lines.append(f"- **Not yet recorded** ({len(content['missing'])}): {', '.join(content['missing'])}.")
    lines += [
        "",
        "## Results",
        "",
        f"Total: mean and {LEVEL:.0%} interval. {TRAINED_INTERVAL} for trained rows; "
        f"{TEACHER_INTERVAL.lower()} for the teacher. `train seeds`: students trained per row; `videos`: all "
        "scored videos of the row; quality ... diversity: means over all of them.",
        "",
        *main_table(rows),
        "",
    ]
    if rows:
        lines += ["Per dimension (means over the same videos; `tmd.world.benchmark`):", "", *dimension_table(rows), ""]
    if paired:
        lines += [
            "## Paired differences",
            "",
            "a - b, paired by training seed (seed i of a against seed i of b, both on the same evaluation noise): "
            "Student-t 95% interval of the per-seed differences.",
            "",
            *_pipe(
                ["a", "b", "pairs (seeds)", "a - b [95% CI]", "interval excludes 0"],
                [
                    [
                        p["a"],
                        p["b"],
                        f"{len(p['seeds'])} ({', '.join(map(str, p['seeds']))})",
                        _ci(p["diff_mean"], p["diff_ci95"]),
                        "-" if p["diff_ci95"][0] is None else ("yes" if p["diff_ci95"][0] > 0 or p["diff_ci95"][1] < 0 else "no"),
                    ]
                    for p in paired
                ],
            ),
            "",
        ]
    with_variance = [r for r in rows if r["variance"]]
    if with_variance:
        lines += [
            "## Where the spread comes from",
            "",
            "Two-way crossed random-effects ANOVA without replication of each row's training seed x noise seed "
            "grid of totals (`tmd.eval.stats.variance_components`, method of moments, negative estimates set "
            "to 0): sd of the training seed, of the noise draw every student shares, and of the student x noise "
            "residual; `training share`: the training seed's part of one 72-video score's variance; `sd of mean`: "
            "the standard error the training-seed interval stands for (shared noise excluded: it cancels "
            "between rows scored on the same noise); `sd of mean, new noise`: with it, what the row's absolute "
            "value would move by on another evaluation draw. The teacher has no training seed: all its "
            "variance is evaluation noise.",
            "",
            *_pipe(
                ["row", "sd train", "sd noise shared", "sd residual", "training share", "sd of mean", "sd of mean, new noise"],
                [
                    [
                        r["label"],
                        *(_num(math.sqrt(r["variance"][k])) for k in ("training", "noise_shared", "residual")),
                        "-" if r["variance"]["training_share"] is None else f"{r['variance']['training_share']:.0%}",
                        *(_num(math.sqrt(r["variance"][k])) for k in ("mean_variance", "mean_variance_new_noise")),
                    ]
                    for r in with_variance
                ],
            ),
            "",
        ]
    budget = [r for r in rows if r["method"] != TEACHER]
    if budget:
        lines += [
            "## Budgets",
            "",
            "Iterations, batch and learning rate of each row's run; minutes: training wall-clock "
            "per training seed, including the parent stage (TMD: stage 1 + stage 2).",
            "",
            *_pipe(
                ["row", "iterations", "batch", "lr", "train minutes"],
                [
                    [r["label"], str(r["steps"]), str(r["batch_size"]), f"{r['lr']:g}", _num(r["train_minutes"], 1)]
                    for r in budget
                ],
            ),
            "",
        ]
    lines += ["## Plots", "", "- `quality_vs_nfe.png`: total against effective NFE, error bars the 95% intervals."]
    if content["curves"]:
        lines.append(
            "- `curves.png`: the EMA generator's total on the fixed `train.eval_videos` set against iteration and "
            "against training wall-clock (stage-2 curves start after their stage 1's time); one line per seed."
        )
    if paired:
        lines.append("- `paired.png`: the paired differences with their intervals.")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------


def readme_table(content: dict[str, Any]) -> str:
    return "\n".join(main_table(content["rows"]))


def update_readme(path: Path, name: str, table: str) -> None:
    """Replace the block between the study's markers in ``path`` with ``table``."""
    begin, end = README_BEGIN.format(name=name), README_END.format(name=name)
    text = path.read_text()
    if begin not in text or end not in text:
        raise ValueError(f"{path} has no '{begin}' ... '{end}' block to write the table into")
    head, rest = text.split(begin, 1)
    path.write_text(f"{head}{begin}\n{table}\n{end}{rest.split(end, 1)[1]}")


def write_report(study: StudyConfig, study_file: Path, runs: list[Run], records_dir: Path, readme: Path | None = None) -> Path:
    """Write the report from the records of ``runs``; returns the path of ``report.md``."""
    records = read_records(records_dir, list(dict.fromkeys(r.key for r in runs)))
    content = collect(study, runs, records)
    out = Path(study.report_dir)
    out.mkdir(parents=True, exist_ok=True)
    shown = study_file.name if study_file.resolve().parent == shipped_configs().resolve() else str(study_file)
    write_json(
        out / "results.json",
        {"study": study.name, "rows": content["rows"], "paired": content["paired"], "missing": content["missing"]},
    )
    (out / "report.md").write_text(
        markdown(study, shown, str(records_dir), content, sorted(records.values(), key=lambda r: r["key"]))
    )
    write_plots(content, out)
    if readme is not None:
        update_readme(Path(readme), study.name, readme_table(content))
    if content["rows"]:
        print(
            format_table(
                [
                    {
                        "row": r["label"],
                        "eff_nfe": r["effective_nfe"],
                        "seeds": len(r["seeds"]),
                        "videos": r["videos"],
                        "total": r["total_mean"],
                        "ci_low": r["total_ci95"][0],
                        "ci_high": r["total_ci95"][1],
                    }
                    for r in content["rows"]
                ]
            )
        )
    return out / "report.md"
