"""The ``tmd synthesize`` command: its options and what it runs (``tmd.programs.synthesis``).

Imported by the CLI to build its parser, so torch and the synthesis code are imported only when the
command runs and ``tmd --help`` answers at once.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def add_parser(sub, add_threads) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "synthesize", help="generate training data with a teacher from prompts, in tmd prepare's format (the paper's data)"
    )
    p.add_argument(
        "--model",
        required=True,
        help="the teacher: a diffusers Wan pipeline root, the synthetic world's teacher folder, or 'world' (the shipped one)",
    )
    p.add_argument("--prompts", type=Path, required=True, help="a text file, one prompt per line (blank lines skipped)")
    p.add_argument("--out", type=Path, required=True, help="output folder; an existing synthesize folder is resumed")
    p.add_argument("--steps", type=int, help="teacher sampling steps (default 50)")
    p.add_argument("--guidance", type=float, help="CFG scale (default: 5 for Wan, the world's own for the world; 1 = none)")
    p.add_argument("--guidance-2", type=float, help="Wan2.2 A14B: the low-noise expert's CFG scale (default: --guidance)")
    p.add_argument("--shift", type=float, help="time shift (default: the pipeline scheduler's, or the world's)")
    p.add_argument("--negative-prompt", help="CFG negative prompt, also stored for training (default: Wan's, or the world's)")
    p.add_argument("--frames", type=int, help="frames per video, 4k+1 (default 81 for Wan; the world's size is fixed)")
    p.add_argument("--height", type=int, help="video height in pixels (default 480 for Wan)")
    p.add_argument("--width", type=int, help="video width in pixels (default 832 for Wan)")
    p.add_argument("--videos-per-prompt", type=int, default=1, help="samples of each prompt, from different noise")
    p.add_argument("--seed", type=int, default=0, help="sample i starts from noise seeded by seed + i")
    p.add_argument("--batch-size", type=int, default=1, help="videos sampled together")
    p.add_argument("--shard-size", type=int, default=16, help="samples per shard (the unit of resuming and of a process's work)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="teacher and text encoder precision")
    p.add_argument("--keep-noise", action="store_true", help="store each sample's initial noise (for DMD2-v's KD warm-up)")
    p.add_argument("--decode", action="store_true", help="also write an mp4 preview of each sample into OUT/previews")
    p.add_argument("--device", help="torch device (default: cuda if available; under torchrun each rank's own)")
    add_threads(p)
    p.set_defaults(func=command)
    return p


def read_prompt_file(path: str | Path) -> list[str]:
    """One prompt per line; blank lines are skipped (and counted), a file with nothing else is refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {path}: no such file")
    lines = path.read_text().splitlines()
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts {path}: no prompts ({f'{len(lines)} lines, all blank' if lines else 'the file is empty'})")
    if len(prompts) < len(lines):
        log.info("%s: skipped %d blank lines", path, len(lines) - len(prompts))
    return prompts


def command(args: argparse.Namespace) -> int:
    import torch

    from tmd.programs.synthesis import synthesize

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    index = synthesize(
        args.out,
        args.model,
        read_prompt_file(args.prompts),
        source=f"--prompts {args.prompts}",
        steps=args.steps,
        guidance=args.guidance,
        guidance_2=args.guidance_2,
        shift=args.shift,
        negative_prompt=args.negative_prompt,
        frames=args.frames,
        height=args.height,
        width=args.width,
        videos_per_prompt=args.videos_per_prompt,
        seed=args.seed,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        dtype=getattr(torch, DTYPES[args.dtype]),
        keep_noise=args.keep_noise,
        decode=args.decode,
        device=args.device,
    )
    print(f"{index['samples']} samples in {len(index['shards'])} shards written to {args.out}")
    return 0
