"""The ``tmd`` command line. Each subcommand lives in its own function; heavy imports stay inside them
so that ``tmd --help`` answers at once."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _cmd_sample(args: argparse.Namespace) -> int:
    """Sample a teacher (K steps x CFG) and its TMD student (M x N) from the same noise, and time both."""
    import torch

    from tmd import flow
    from tmd.models.split import TMDStudent
    from tmd.models.wan import load_teacher
    from tmd.sampling import sample_teacher, sample_tmd

    torch.manual_seed(args.seed)
    teacher = load_teacher(args.model, seed=args.seed)
    config = teacher.config
    student = TMDStudent.from_teacher(teacher, head_blocks=args.head_blocks)
    patch = config.patch_size
    shape = (args.batch, config.in_channels, patch[0] * args.latent_grid[0], patch[1] * args.latent_grid[1], patch[2] * args.latent_grid[2])
    generator = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(shape, generator=generator)
    text = torch.randn(args.batch, 8, config.text_dim, generator=generator)
    negative = torch.zeros_like(text)

    rows = []
    for name, run, nfe in (
        (
            f"teacher {args.steps}x{'2' if args.guidance != 1 else '1'}",
            lambda: sample_teacher(teacher, noise, text, negative, args.steps, args.guidance, args.shift),
            flow.teacher_effective_nfe(args.steps, args.guidance),
        ),
        (
            f"tmd {args.outer_steps}x{args.inner_steps}",
            lambda: sample_tmd(student, noise, text, args.outer_steps, args.inner_steps, torch.Generator().manual_seed(args.seed)),
            flow.tmd_effective_nfe(args.outer_steps, args.inner_steps, args.head_blocks, teacher.num_blocks),
        ),
    ):
        run()  # warm-up
        start = time.perf_counter()
        sample = run()
        rows.append((name, nfe, 1000 * (time.perf_counter() - start), sample))
    print(f"model: {args.model}  latents {tuple(shape)}  blocks {teacher.num_blocks}  head blocks {args.head_blocks}")
    print(f"{'sampler':<16}{'eff. NFE':>10}{'latency ms':>12}{'speed-up':>10}")
    for name, nfe, ms, _ in rows:
        print(f"{name:<16}{nfe:>10.2f}{ms:>12.1f}{rows[0][2] / ms:>9.1f}x")
    if args.out:
        from safetensors.torch import save_file

        args.out.parent.mkdir(parents=True, exist_ok=True)
        save_file({name.replace(" ", "_"): s.contiguous() for name, _, _, s in rows}, str(args.out))
        print(f"latents written to {args.out}")
    return 0


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="sample a teacher and its (untrained) TMD student from the same noise, timed")
    p.add_argument("--model", default="tiny", help='"tiny", a diffusers Wan folder, or a .json/.yaml transformer config')
    p.add_argument("--steps", type=int, default=50, help="teacher Euler steps")
    p.add_argument("--guidance", type=float, default=5.0, help="teacher CFG scale (1 = none)")
    p.add_argument("--shift", type=float, default=5.0, help="teacher time shift")
    p.add_argument("--outer-steps", type=int, default=2, help="TMD outer transition steps M")
    p.add_argument("--inner-steps", type=int, default=4, help="TMD inner flow-head steps N")
    p.add_argument("--head-blocks", type=int, default=1, help="blocks in the flow head H")
    p.add_argument("--latent-grid", type=int, nargs=3, default=(2, 4, 4), metavar=("F", "H", "W"), help="tokens per axis")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write the sampled latents to this .safetensors file")
    p.set_defaults(func=_cmd_sample)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tmd", description="Transition Matching Distillation for fast video generation")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_sample(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as error:
        # user errors (bad shapes, missing files, bad config keys) read as one line, not a traceback
        print(f"tmd {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
