"""``tmd evaluate``: the world teacher scored on the benchmark's fixed prompt set, one row per step count."""

from __future__ import annotations

import argparse
import sys

from tmd import flow
from tmd.eval.samplers import evaluate_sampler, reconstruction_score
from tmd.sampling import sample_teacher
from tmd.world.benchmark import format_table
from tmd.world.data import WorldAssets, eval_prompts

_TABLE_SCORES = ("total", "quality", "semantic", "frechet", "diversity")


def evaluate_teacher(args: argparse.Namespace) -> int:
    """Score samplers on the world benchmark's fixed prompt set: quality vs cost, one row per step count."""

    assets = WorldAssets(args.assets)
    shift = assets.shift if args.shift is None else args.shift
    prompts = eval_prompts(args.per_prompt)
    rows = []
    for guidance in args.guidance or [assets.guidance]:
        for steps in args.steps:
            score = evaluate_sampler(
                assets,
                lambda noise, cond, neg: sample_teacher(assets.teacher, noise, cond, neg, steps, guidance, shift),
                prompts=prompts,
                seed=args.seed,
            )
            result = score.result
            rows.append(
                {
                    "method": f"teacher w={guidance:g}",
                    "steps": steps,
                    "nfe": flow.teacher_effective_nfe(steps, guidance),
                    "s/video": score.seconds_per_video,
                    **{k: getattr(result, k) for k in _TABLE_SCORES},
                }
            )
            print(f"{rows[-1]['method']} {steps} steps: total {result.total:.4f}", file=sys.stderr, flush=True)
    ceiling = reconstruction_score(assets, prompts, seed=args.seed)
    rows.append({"method": "autoencoded world (ceiling)", **{k: getattr(ceiling, k) for k in _TABLE_SCORES}})
    print(f"{len(prompts)} videos ({args.per_prompt} per prompt), noise seed {args.seed}, shift {shift:g}")
    print(format_table(rows))
    return 0
