"""Which shapes a study run draws for which prompted shape: the confusion behind the benchmark's ``shape`` score.

    python benchmarks/probe_shape.py KEY [KEY ...]          # study run keys (docs/study/runs/KEY.json)
    python benchmarks/probe_shape.py teacher:50 teacher:2   # the world teacher at that many steps

Each run's weights must be in runs/study/KEY/ (``tmd study`` keeps them); a stage 1 records no scores, so give its
steps with ``--steps M,N`` (it samples as its TMD student). Sampled exactly
as the study scores (same sampler, the 72 prompts x noise seeds 0-3); prints per run the accuracy per prompted
shape and the confusion matrix, and writes them to runs/probe/shape.json. docs/results.md uses it to say where
TMD's shape score is lost.
"""

import argparse
import copy
import json
from pathlib import Path

import numpy as np
import torch

from tmd.config import RunConfig, from_dict
from tmd.data.world import SHAPES, WorldConfig, parse_prompt
from tmd.data.world_data import WorldAssets, eval_prompts
from tmd.eval.benchmark import _detect
from tmd.eval.samplers import sampler
from tmd.models.export import student_from_run

NOISE_SEEDS = (0, 1, 2, 3)


def _videos(assets: WorldAssets, fn, prompts: list[str], seed: int) -> np.ndarray:
    noise = torch.randn(len(prompts), *assets.latent_shape(), generator=torch.Generator().manual_seed(seed))
    cond, neg = assets.encode_prompts(prompts)
    with torch.no_grad():
        return assets.decode(fn(noise, cond, neg)).cpu().numpy()


def _sampler_of(assets: WorldAssets, spec: str, steps: tuple[int, int | None] | None):
    if spec.startswith("teacher:"):
        outer = int(spec.split(":")[1])
        return lambda seed: sampler("teacher", None, assets.teacher, outer, None, seed, assets.guidance, assets.shift)
    record = json.loads(Path(f"docs/study/runs/{spec}.json").read_text())
    cfg = from_dict(RunConfig, record["config"], source=spec)
    module, _ = student_from_run(Path(f"runs/study/{spec}/student.safetensors"), copy.deepcopy(assets.teacher))
    module.eval()
    outer, inner = steps or tuple(record["scores"][0][k] for k in ("outer_steps", "inner_steps"))
    name = "tmd" if cfg.method_name == "tm" else cfg.method_name  # a stage 1 samples as its TMD student
    return lambda seed: sampler(name, cfg.method, module, outer, inner, seed, assets.guidance, assets.shift)


def confusion(assets: WorldAssets, spec: str, steps=None) -> dict:
    prompts = eval_prompts(1)
    want = np.array([parse_prompt(p).shape_index for p in prompts])
    make = _sampler_of(assets, spec, steps)
    matrix = np.zeros((len(SHAPES), len(SHAPES) + 1), dtype=int)  # last column: not detected
    for seed in NOISE_SEEDS:
        det = _detect(_videos(assets, make(seed), prompts, seed), prompts, WorldConfig())
        got = np.where(det.detected, det.shape, len(SHAPES))
        np.add.at(matrix, (want, got), 1)
    accuracy = {s: float(matrix[i, i] / matrix[i].sum()) for i, s in enumerate(SHAPES)}
    return {"run": spec, "accuracy": accuracy, "confusion": matrix.tolist(), "columns": [*SHAPES, "undetected"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--steps", help="M,N: sample at these steps (needed for stage 1 runs, which record no scores)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    steps = tuple(int(v) for v in args.steps.split(",")) if args.steps else None
    assets = WorldAssets()
    results = []
    for spec in args.runs:
        result = confusion(assets, spec, steps)
        results.append(result)
        print(spec, {k: round(v, 3) for k, v in result["accuracy"].items()}, result["confusion"], flush=True)
    out = Path("runs/probe/shape.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
