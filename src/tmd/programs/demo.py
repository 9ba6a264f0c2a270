"""``tmd demo``: the whole story on the synthetic world, measured in one run.

Shipped teacher -> TMD stage 1 (TM-MeanFlow) -> TMD stage 2 (DMD2-v with head rollout) for TMD-N2 and
TMD-N4 (H = 1 of 6 blocks, the paper's H/L = 5/30) at M = 1 and 2, and the DMD2-v baseline at 1, 2 and 3
steps, each a student trained for its own step count with the same budget as the paper's Table 1 -> every
sampler scored on the same prompts and noise -> report.
With ``--methods all`` every baseline too, and TMD once more on LinVideo's linearised teacher.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tmd import flow
from tmd.config import RunConfig, from_dict
from tmd.eval.report import write_report
from tmd.eval.samplers import evaluate_sampler
from tmd.methods import get_method
from tmd.sampling import sample_teacher, sample_tmd
from tmd.train.run import TrainedRun, train_run
from tmd.world.benchmark import format_table
from tmd.world.data import WorldAssets, eval_prompts


@dataclass
class Preset:
    """Budgets of one demo; ``quick`` is sized for a 2-core CPU (33 min measured with other jobs sharing it: docs/results.md)."""

    stage1_steps: int
    stage2_steps: int
    batch_size: int
    head_blocks: int
    teacher_steps: tuple[int, ...]
    eval_seeds: int  # videos per prompt in the scored set (72 prompts each)
    lr: float = 1e-4  # stage 2 and the baselines
    stage1_lr: float = 3e-4  # Table 7: stage 1 at 3x stage 2's learning rate
    generator_every: int = 5
    gan_weight: float = 0.03
    one_step_factor: int = 3  # Table 7: M = 1 students distil 3x longer (12k vs 4k iterations)


PRESETS = {
    # stage 1 : stage 2 = 3 : 4 as Table 7; M = 1 at the M = 2 budget to keep the 11 runs near half an hour
    "quick": Preset(
        stage1_steps=225,
        stage2_steps=300,
        batch_size=8,
        head_blocks=1,
        teacher_steps=(50, 8, 4, 2, 1),
        eval_seeds=1,
        one_step_factor=1,
    ),
    "full": Preset(
        stage1_steps=1500, stage2_steps=2000, batch_size=32, head_blocks=1, teacher_steps=(50, 16, 8, 4, 2, 1), eval_seeds=4
    ),
}
"""``full`` is for a GPU (or a patient CPU)."""

METHOD_SETS = {
    "default": ("tmd", "dmd2"),
    "all": ("tmd", "dmd2", "decoupled_dmd", "phased_dmd", "tdm", "mdt_dist", "meanflow", "linvideo", "rcm", "anyflow"),
}
TMD_STUDENTS = ((1, 2), (1, 4), (2, 2), (2, 4))
"""(M, N) of the TMD students: TMD-N2 and TMD-N4 at one and two outer steps, as the paper's Table 1."""
DMD2_STEPS = (1, 2, 3)
LINVIDEO_TMD = (2, 2)
GRID_PROMPTS = (
    "a red circle moving right",
    "a green square moving up",
    "a blue triangle moving left",
    "a yellow circle moving down",
)


def _run_config(
    method: str,
    method_cfg: dict,
    preset: Preset,
    out: Path,
    assets: str | None,
    seed: int,
    linearised_teacher: Path | None = None,
) -> RunConfig:
    return from_dict(
        RunConfig,
        {
            "method_name": method,
            "data_kind": "world",
            "method": method_cfg,
            "data": {"assets": assets, "linearised_teacher": None if linearised_teacher is None else str(linearised_teacher)},
            "train": {
                "steps": _steps(method, method_cfg, preset),
                "batch_size": preset.batch_size,
                "lr": preset.stage1_lr if method == "tm" else preset.lr,
                "betas": [0.9, 0.99],
                "weight_decay": 0.01,
                "ema_decay": 0.99,
                "seed": seed,
                "log_every": 10,
                "checkpoint_every": 10**6,
                "out_dir": str(out),
                "tensorboard": False,
                "device": "cpu",
            },
        },
        source=f"tmd demo preset ({method})",
    )


def _steps(method: str, method_cfg: dict, preset: Preset) -> int:
    if method == "tm":
        return preset.stage1_steps
    one_step = method in ("tmd", "dmd2") and method_cfg.get("outer_steps") == 1
    return preset.stage2_steps * (preset.one_step_factor if one_step else 1)


def _latency_ms(sample: Callable[[], torch.Tensor], repeats: int = 3) -> float:
    """Median wall-clock of one single-video sample after a warm-up run."""
    sample()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sample()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


class Demo:
    def __init__(self, out: Path, preset: str = "quick", assets: str | None = None, seed: int = 0, progress: bool = True):
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        self.out, self.preset_name, self.preset, self.seed = Path(out), preset, PRESETS[preset], seed
        self.assets_path = assets
        self.assets = WorldAssets(assets)
        self.teacher = self.assets.teacher
        self.guidance, self.shift = self.assets.guidance, self.assets.shift
        self.progress = progress
        self.samplers: dict[str, tuple[dict, Callable]] = {}
        self.timings: dict[str, float] = {}

    # -- training ------------------------------------------------------------------------------

    def _train(self, name: str, method: str, method_cfg: dict, linearised_teacher: Path | None = None) -> TrainedRun:
        cfg = _run_config(
            method, method_cfg, self.preset, self.out / "runs" / name, self.assets_path, self.seed, linearised_teacher
        )
        cfg.train.progress = self.progress
        start = time.perf_counter()
        run = train_run(cfg, assets=self.assets)
        self.timings[name] = time.perf_counter() - start
        return run

    def _baseline_config(self, method: str) -> dict:
        p = self.preset
        cfg: dict[str, Any] = {"guidance": self.guidance}
        if method == "phased_dmd":
            cfg["phase_steps"] = p.stage2_steps // 2
        if method == "rcm":  # sCM alone for the paper's first 10% of iterations
            cfg["tangent_warmup"] = p.stage2_steps // 10
        if method == "anyflow":  # one stage: on-policy DMD from the teacher, the flow-map loss co-trained
            cfg.update(stage="onpolicy", fuse_guidance=self.guidance)
        if method == "linvideo":
            # the paper's share of linear layers (the method's default); selective transfer takes the first half of the budget
            cfg.update(shift=self.shift, trajectory_steps=8, selection_steps=p.stage2_steps // 2)
        return cfg

    def _distill_config(self, outer_steps: int) -> dict:
        p = self.preset
        return {
            "guidance": self.guidance,
            "generator_every": p.generator_every,
            "gan_weight": p.gan_weight,
            "outer_steps": outer_steps,
        }

    def _train_tmd(
        self, name: str, outer: int, inner: int, linearised_teacher: Path | None = None
    ) -> tuple[TrainedRun, TrainedRun]:
        """TMD stage 1 then stage 2 of the M = ``outer``, N = ``inner`` student (runs ``{name}_stage1``, ``{name}_stage2``)."""
        student = {"head_blocks": self.preset.head_blocks, "outer_steps": outer, "inner_steps": inner}
        stage1 = self._train(f"{name}_stage1", "tm", student, linearised_teacher)
        stage2 = self._train(
            f"{name}_stage2",
            "tmd",
            {**self._distill_config(outer), **student, "init_from": str(stage1.weights)},
            linearised_teacher,
        )
        return stage1, stage2

    def train_all(self, methods: tuple[str, ...]) -> None:
        """The TMD students (stage 1 then stage 2) and the DMD2-v students, one per step count, and each
        baseline, every distillation with the same step budget; after LinVideo, TMD once more with the
        linearised model as its teacher (LinVideo's few-step stage)."""
        self.students: list[tuple[dict, Callable]] = []
        for outer, inner in TMD_STUDENTS:
            stage1, stage2 = self._train_tmd(f"tmd_m{outer}n{inner}", outer, inner)
            self._add_tmd_row("tmd", stage2.generator, outer, inner)
            self._add_tmd_row("tmd_stage1", stage1.generator, outer, inner)
        for steps in DMD2_STEPS:
            run = self._train(f"dmd2_m{steps}", "dmd2", self._distill_config(steps))
            self._add_few_step_row("dmd2", run.generator, steps, get_method("dmd2").sample)
        for method in methods:
            if method in ("tmd", "dmd2"):
                continue
            run = self._train(method, method, self._baseline_config(method))
            self._add_baseline_rows(method, run.generator)
            if method == "linvideo":
                stage2 = self._train_tmd("linvideo_tmd", *LINVIDEO_TMD, run.weights)[1]
                self._add_tmd_row("linvideo_tmd", stage2.generator, *LINVIDEO_TMD)

    def _add_tmd_row(self, name: str, student, outer: int, inner: int) -> None:
        nfe = flow.tmd_effective_nfe(outer, inner, self.preset.head_blocks, self.teacher.num_blocks)
        self.students.append(
            (
                {"method": name, "outer_steps": outer, "inner_steps": inner, "effective_nfe": nfe},
                lambda n, c, u: sample_tmd(student, n, c, outer, inner, torch.Generator().manual_seed(self.seed)),
            )
        )

    def _add_few_step_row(self, name: str, module, steps: int, sample: Callable) -> None:
        self.students.append(
            (
                {"method": name, "outer_steps": steps, "inner_steps": None, "effective_nfe": float(steps)},
                lambda n, c, u: sample(module, n, c, steps, torch.Generator().manual_seed(self.seed)),
            )
        )

    def _add_baseline_rows(self, name: str, module) -> None:
        method = get_method(name)
        for steps in method.sample_steps:
            if hasattr(method, "sample_guided"):  # a multi-step model (LinVideo's linearised teacher): CFG like the teacher
                self.students.append(
                    (
                        {
                            "method": name,
                            "outer_steps": steps,
                            "inner_steps": None,
                            "effective_nfe": flow.teacher_effective_nfe(steps, self.guidance),
                        },
                        lambda n, c, u, steps=steps: method.sample_guided(module, n, c, u, steps, self.guidance, self.shift),
                    )
                )
            else:
                self._add_few_step_row(name, module, steps, method.sample)

    # -- evaluation ----------------------------------------------------------------------------

    def _rows_spec(self) -> list[tuple[dict, Callable]]:
        teacher = self.teacher
        specs = []
        for steps in self.preset.teacher_steps:
            specs.append(
                (
                    {
                        "method": "teacher",
                        "outer_steps": steps,
                        "inner_steps": None,
                        "effective_nfe": flow.teacher_effective_nfe(steps, self.guidance),
                    },
                    lambda n, c, u, steps=steps: sample_teacher(teacher, n, c, u, steps, self.guidance, self.shift),
                )
            )
        return specs + self.students

    def evaluate(self) -> list[dict]:
        rows = []
        one_noise = torch.randn(1, *self.assets.latent_shape(), generator=torch.Generator().manual_seed(self.seed))
        one_cond, one_neg = self.assets.encode_prompts([GRID_PROMPTS[0]])
        self.grid_samples = {}
        for spec, fn in self._rows_spec():
            score = evaluate_sampler(self.assets, fn, eval_prompts(self.preset.eval_seeds), seed=self.seed)
            latency = _latency_ms(lambda: fn(one_noise, one_cond, one_neg))
            row = {**spec, "latency_ms": latency, "ms_per_video_batched": 1000 * score.seconds_per_video}
            row.update(
                {k: score.result.as_dict()[k] for k in ("total", "quality", "semantic", "frechet", "diversity", "detect_rate")}
            )
            rows.append(row)
            print(format_table([row]).splitlines()[-1] if rows[1:] else format_table([row]), flush=True)
            self.grid_samples[self._label(row)] = self._grid_videos(fn)
        teacher_ms = next(
            r["latency_ms"] for r in rows if r["method"] == "teacher" and r["outer_steps"] == max(self.preset.teacher_steps)
        )
        for row in rows:
            row["speedup_vs_teacher"] = teacher_ms / row["latency_ms"]
        return rows

    @staticmethod
    def _label(row: dict) -> str:
        inner = f"x{row['inner_steps']}" if row["inner_steps"] else ""
        return f"{row['method']} {row['outer_steps']}{inner}"

    def _grid_videos(self, fn) -> torch.Tensor:
        cond, neg = self.assets.encode_prompts(list(GRID_PROMPTS))
        noise = torch.randn(
            len(GRID_PROMPTS), *self.assets.latent_shape(), generator=torch.Generator().manual_seed(self.seed + 1)
        )
        with torch.no_grad():
            return self.assets.decode(fn(noise, cond, neg)).cpu()

    def run(self, methods: tuple[str, ...]) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        self.train_all(methods)
        rows = self.evaluate()
        self.timings["total"] = time.perf_counter() - start

        report = {
            "preset": self.preset_name,
            "methods": list(methods),
            "videos_scored": len(eval_prompts(self.preset.eval_seeds)),
            "guidance": self.guidance,
            "shift": self.shift,
            "rows": rows,
            "timings_s": self.timings,
        }
        write_report(self.out, report, self.grid_samples, list(GRID_PROMPTS))
        return report


def run_demo(
    out: str | Path,
    preset: str = "quick",
    assets: str | None = None,
    seed: int = 0,
    progress: bool = True,
    methods: str = "default",
) -> dict:
    if methods not in METHOD_SETS:
        raise ValueError(f"unknown method set {methods!r}; choose one of {sorted(METHOD_SETS)}")
    report = Demo(Path(out), preset, assets, seed, progress).run(METHOD_SETS[methods])
    print(json.dumps(report["timings_s"]))
    return report
