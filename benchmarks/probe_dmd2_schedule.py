"""One DMD2-v run of the `tmd demo` quick preset with method overrides, scored like a demo row.

    python benchmarks/probe_dmd2_schedule.py NAME '{"generator_every": 2, "critics_on_generator_steps": true}'

Trains in runs/probe/NAME (72 videos, noise seed 0, as the demo's rows) and prints and writes
runs/probe/NAME.json. docs/results.md uses it to separate the update schedule from the rest of the recipe.
"""

import json
import sys
import time
from pathlib import Path

import torch

from tmd.eval.samplers import evaluate_sampler
from tmd.programs.demo import Demo
from tmd.sampling import sample_few_step
from tmd.world.data import eval_prompts


def main(name: str, overrides: dict) -> dict:
    torch.set_num_threads(1)
    out = Path("runs/probe")
    demo = Demo(out / name, "quick", progress=False)
    cfg = {**demo._distill_config(overrides.pop("outer_steps", 2)), **overrides}
    start = time.perf_counter()
    run = demo._train(name, "dmd2", cfg)
    steps = cfg["outer_steps"]
    sample = lambda noise, cond, _: sample_few_step(run.generator, noise, cond, steps)  # noqa: E731
    score = evaluate_sampler(demo.assets, sample, eval_prompts(1), seed=0)
    result = {"name": name, "cfg": cfg, "train_s": time.perf_counter() - start}
    result.update({k: v for k, v in score.result.as_dict().items() if isinstance(v, float)})
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], json.loads(sys.argv[2]))))
