"""``tmd sample``: a teacher and its untrained TMD student sampled from the same noise, and timed."""

from __future__ import annotations

import argparse
import time

import torch

from tmd import flow
from tmd.files import check_output_dir
from tmd.models.split import TMDStudent
from tmd.models.wan import load_teacher
from tmd.sampling import sample_teacher, sample_tmd


def sample_and_time(args: argparse.Namespace) -> int:
    """Sample a teacher (K steps x CFG) and its TMD student (M x N) from the same noise, and time both."""

    if args.out:
        check_output_dir(args.out.parent)
    torch.manual_seed(args.seed)
    teacher = load_teacher(args.model, seed=args.seed)
    config = teacher.config
    student = TMDStudent.from_teacher(teacher, head_blocks=args.head_blocks)
    patch = config.patch_size
    shape = (
        args.batch,
        config.in_channels,
        patch[0] * args.latent_grid[0],
        patch[1] * args.latent_grid[1],
        patch[2] * args.latent_grid[2],
    )
    rng = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(shape, generator=rng)
    text = torch.randn(args.batch, 8, config.text_dim, generator=rng)
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
            lambda: sample_tmd(
                student, noise, text, args.outer_steps, args.inner_steps, torch.Generator().manual_seed(args.seed)
            ),
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
        from tmd.files import make_output_dir, save_safetensors

        make_output_dir(args.out.parent)
        save_safetensors({name.replace(" ", "_"): s.contiguous() for name, _, _, s in rows}, args.out)
        print(f"latents written to {args.out}")
    return 0
