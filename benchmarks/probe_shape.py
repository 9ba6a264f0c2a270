"""Which shapes a study run draws for which prompted shape: the confusion behind the benchmark's ``shape`` score.

    python benchmarks/probe_shape.py KEY [KEY ...]          # study run keys (docs/study/runs/KEY.json)
    python benchmarks/probe_shape.py teacher:50 teacher:2   # the world teacher at that many steps
    python benchmarks/probe_shape.py KEY --split first      # the run's first transition, then the teacher's ODE
    python benchmarks/probe_shape.py KEY --split last       # noised real data at the last outer time, then the run's last step
    python benchmarks/probe_shape.py KEY --split last_eq15  # the same, scored on Eq. 15's x1 - InnerFlow (TMD)

Each run's weights must be in runs/study/KEY/ (``tmd study`` keeps them); a stage 1 records no scores, so give
its steps with ``--steps M,N`` (it samples as its TMD student). Sampled exactly as the study scores (same
sampler, the 72 prompts x noise seeds 0-3); prints per run the accuracy per prompted shape and the confusion
matrix, and merges them into ``--out`` (default runs/probe/shape.json, by run and split). docs/results.md uses it
to say where TMD's shape score is lost. ``--split`` (two-step students) tells which transition loses it:
``first`` runs the student's first transition from the noise and hands x at the second outer time to the teacher
(40 Euler steps with the world's CFG); ``last`` noises the world's real videos (encoded) to that time, as stage 2
trains the student, and lets the student's last transition finish; ``last_eq15`` scores, for a TMD student, the
sample stage 2 trains on there instead of the sampler's: Eq. 15's ``x1 - InnerFlow`` with the true noise ``x1``.
"""

import argparse
import copy
import json
from pathlib import Path

import numpy as np
import torch

from tmd import flow
from tmd.config import RunConfig, from_dict
from tmd.eval.samplers import sampler
from tmd.models.export import student_from_run
from tmd.sampling import few_step_transition, guided_velocity, tmd_transition
from tmd.world.benchmark import _detect
from tmd.world.data import WorldAssets, eval_prompts
from tmd.world.spec import SHAPES, WorldConfig, parse_prompt, sample_videos

NOISE_SEEDS = (0, 1, 2, 3)


def _videos(assets: WorldAssets, fn, prompts: list[str], seed: int) -> np.ndarray:
    noise = torch.randn(len(prompts), *assets.latent_shape(), generator=torch.Generator().manual_seed(seed))
    cond, neg = assets.encode_prompts(prompts)
    with torch.no_grad():
        return assets.decode(fn(noise, cond, neg)).cpu().numpy()


def _load_run(assets: WorldAssets, spec: str):
    record = json.loads(Path(f"docs/study/runs/{spec}.json").read_text())
    cfg = from_dict(RunConfig, record["config"], source=spec)
    module, _ = student_from_run(Path(f"runs/study/{spec}/student.safetensors"), copy.deepcopy(assets.teacher))
    return record, cfg, module.eval()


def _sampler_of(assets: WorldAssets, spec: str, steps: tuple[int, int | None] | None):
    if spec.startswith("teacher:"):
        outer = int(spec.split(":")[1])
        return lambda seed: sampler("teacher", None, assets.teacher, outer, None, seed, assets.guidance, assets.shift)
    record, cfg, module = _load_run(assets, spec)
    outer, inner = steps or tuple(record["scores"][0][k] for k in ("outer_steps", "inner_steps"))
    name = "tmd" if cfg.method_name == "tm" else cfg.method_name  # a stage 1 samples as its TMD student
    return lambda seed: sampler(name, cfg.method, module, outer, inner, seed, assets.guidance, assets.shift)


def _split_sampler(assets: WorldAssets, spec: str, split: str, prompts: list[str]):
    """(seed -> sample_fn) running one of the run's two transitions and the teacher or real data for the other."""
    _, cfg, module = _load_run(assets, spec)
    method = cfg.method
    if split == "last_eq15" and not hasattr(method, "inner_steps"):
        raise SystemExit(f"--split last_eq15 scores a TMD student's Eq. 15 sample; {spec} is not one")
    if method.outer_steps != 2:
        raise SystemExit(f"--split needs a two-step student; {spec} has outer_steps {method.outer_steps}")
    outer = flow.outer_grid(2, method.outer_shift).float()
    is_tmd = hasattr(method, "inner_steps")

    def step(x, i, cond, generator):
        if not is_tmd:
            return few_step_transition(module, x, outer[i], outer[i + 1], cond, generator, method.multistep)
        inner = flow.inner_grid(method.inner_steps, method.inner_shift).float()
        return tmd_transition(module, x, outer[i], outer[i + 1], cond, inner, generator)

    def make(seed: int):
        def sample(noise, cond, neg):
            generator = torch.Generator().manual_seed(seed)
            if split == "first":
                x = step(noise, 0, cond, generator)
                grid = torch.linspace(float(outer[1]), 0.0, 41)
                for a, b in zip(grid[:-1], grid[1:], strict=True):
                    x = x + (b - a) * guided_velocity(assets.teacher, x, a, cond, neg, assets.guidance)
                return x
            videos = sample_videos(prompts, WorldConfig(), torch.Generator().manual_seed(1000 + seed)).videos
            x_t = flow.interpolate(assets.autoencoder.encode(videos), noise, float(outer[1]))
            x0 = step(x_t, 1, cond, generator)
            if split == "last":
                return x0
            return noise - (x_t - x0) / outer[1]  # Eq. 15 with the true x1: the DTM step x_t - t y solved for y

        return sample

        return sample

    return make


def confusion(assets: WorldAssets, spec: str, steps=None, split: str | None = None) -> dict:
    prompts = eval_prompts(1)
    want = np.array([parse_prompt(p).shape_index for p in prompts])
    make = _split_sampler(assets, spec, split, prompts) if split else _sampler_of(assets, spec, steps)
    matrix = np.zeros((len(SHAPES), len(SHAPES) + 1), dtype=int)  # last column: not detected
    for seed in NOISE_SEEDS:
        det = _detect(_videos(assets, make(seed), prompts, seed), prompts, WorldConfig())
        got = np.where(det.detected, det.shape, len(SHAPES))
        np.add.at(matrix, (want, got), 1)
    accuracy = {s: float(matrix[i, i] / matrix[i].sum()) for i, s in enumerate(SHAPES)}
    return {"run": spec, "split": split, "accuracy": accuracy, "confusion": matrix.tolist(), "columns": [*SHAPES, "undetected"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--out", default="runs/probe/shape.json", help="JSON the results are merged into (by run and split)")
    parser.add_argument("--split", choices=["first", "last", "last_eq15"], help="score one transition of a two-step student")
    parser.add_argument("--steps", help="M,N: sample at these steps (needed for stage 1 runs, which record no scores)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    steps = tuple(int(v) for v in args.steps.split(",")) if args.steps else None
    assets = WorldAssets()
    results = []
    for spec in dict.fromkeys(args.runs):  # each run once
        result = confusion(assets, spec, steps, args.split)
        results.append(result)
        print(spec, args.split or "", {k: round(v, 3) for k, v in result["accuracy"].items()}, result["confusion"], flush=True)
    out = Path(args.out)
    kept = json.loads(out.read_text()) if out.exists() else []
    fresh = {(r["run"], r["split"]) for r in results}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps([r for r in kept if (r["run"], r["split"]) not in fresh] + results, indent=1) + "\n")


if __name__ == "__main__":
    main()
