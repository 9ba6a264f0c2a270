"""The ``tmd`` command line. Each subcommand lives in its own function; heavy imports stay inside them
so that ``tmd --help`` answers at once."""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from pathlib import Path

from tmd.errors import TmdError, TmdWarning
from tmd.models.fastpath import ATTENTION_KERNELS
from tmd.programs import synthesize


def _cmd_sample(args: argparse.Namespace) -> int:
    from tmd.programs.sample import sample_and_time

    return sample_and_time(args)


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
    p.add_argument("--batch", type=int, default=2, help="samples per call")
    p.add_argument("--seed", type=int, default=0, help="seed of the random teacher, the noise and the text")
    p.add_argument("--out", type=Path, help="write the sampled latents to this .safetensors file")
    p.set_defaults(func=_cmd_sample)


def _cmd_train_teacher(args: argparse.Namespace) -> int:
    """Build the world's assets (autoencoder, text encoder) where missing and train + export the teacher."""
    import shlex

    from tmd.config import load_config
    from tmd.world.teacher import WorldTeacherConfig, run

    cfg = load_config(WorldTeacherConfig, args.config, args.overrides)
    run(cfg, args.stage, args.resume, command=shlex.join(["tmd", *args.argv]))
    return 0


def _add_train_teacher(sub) -> None:
    p = sub.add_parser("train-teacher", help="train the synthetic world's autoencoder, text encoder and Wan teacher")
    p.add_argument("--config", type=Path, required=True, help="e.g. world_teacher.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.steps=100")
    p.add_argument("--resume", action="store_true", help="continue the teacher run from its latest checkpoint")
    p.add_argument(
        "--stage",
        choices=("autoencoder", "decoder", "text", "teacher", "all"),
        default="all",
        help="rebuild one part ('decoder': fine-tune the autoencoder's decoder only); "
        "'all' builds the autoencoder and text encoder only where missing, then the teacher",
    )
    _add_threads(p)
    p.set_defaults(func=_cmd_train_teacher)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from tmd.programs.evaluate import evaluate_teacher

    return evaluate_teacher(args)


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="score samplers on the synthetic world benchmark (quality vs cost table)")
    p.add_argument("--sampler", choices=("teacher",), default="teacher", help="what to score")
    p.add_argument("--steps", type=int, nargs="+", default=[50, 16, 8, 4, 2, 1], help="teacher Euler step counts, one row each")
    p.add_argument("--guidance", type=float, nargs="+", help="CFG scales to compare (default: the world's)")
    p.add_argument("--shift", type=float, help="teacher time shift (default: the world's)")
    p.add_argument("--per-prompt", type=int, default=1, help="videos per each of the 72 prompts")
    p.add_argument("--assets", type=Path, help="world assets folder (default: the packaged one)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (the prompt set is fixed)")
    _add_threads(p)
    p.set_defaults(func=_cmd_evaluate)


def _cmd_train(args: argparse.Namespace) -> int:
    """Train one method on the synthetic world from a YAML run config; exports the EMA generator."""

    from tmd.config import RunConfig, load_config
    from tmd.train.run import train_run

    cfg = load_config(RunConfig, args.config, args.overrides)
    print(f"student weights written to {train_run(cfg, resume=args.resume).weights}")
    return 0


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a distillation method (tm, tmd, dmd2, ...) from a YAML config")
    p.add_argument("--config", type=Path, required=True, help="run config (world_tmd_stage1.yaml, ...)")
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.steps=100 method.head_blocks=1"
    )
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in train.out_dir")
    _add_threads(p)
    p.set_defaults(func=_cmd_train)


def _cmd_demo(args: argparse.Namespace) -> int:
    """Stage 1, stage 2, the DMD2 baseline and the evaluation of every sampler, into --out."""

    from tmd.files import check_output_dir
    from tmd.programs.demo import run_demo

    check_output_dir(args.out)
    run_demo(args.out, args.preset, args.assets, args.seed, methods=args.methods)
    print(f"report written to {args.out / 'report.md'}")
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="distil the shipped world teacher with TMD and DMD2, evaluate, and report")
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (report.md, report.json, plot, GIF)")
    p.add_argument(
        "--preset", default="quick", help="quick (11 training runs: 33 min measured on a shared 2-core CPU) or full (a GPU)"
    )
    p.add_argument("--methods", default="default", help="default (TMD and DMD2) or all (every baseline too)")
    p.add_argument("--assets", default=None, help="world assets folder (default: the shipped one)")
    p.add_argument("--seed", type=int, default=0, help="seed of every run and of the evaluation noise")
    _add_threads(p)
    p.set_defaults(func=_cmd_demo)


_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def _cmd_generate(args: argparse.Namespace) -> int:
    """Generate mp4 files from a Wan teacher pipeline or an exported student folder."""
    import torch

    from tmd.programs.generate import generate, read_prompts

    prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompts)
    records = generate(
        args.model,
        prompts,
        args.out,
        pipeline=args.pipeline,
        steps=args.steps,
        inner_steps=args.inner_steps,
        guidance=args.guidance,
        shift=args.shift,
        seed=args.seed,
        frames=args.frames,
        height=args.height,
        width=args.width,
        batch_size=args.batch_size,
        fps=args.fps,
        negative_prompt=args.negative_prompt,
        save_latents=args.save_latents,
        dtype=getattr(torch, _DTYPES[args.dtype]),
        device=args.device,
        attention=args.attention,
        compile=args.compile,
        scheduler=args.scheduler,
        guidance_2=args.guidance_2,
        image=args.image,
    )
    mean = sum(r["seconds"] for r in records) / len(records)
    nfe = records[0]["effective_nfe"]
    print(f"{len(records)} videos written to {args.out} ({nfe:g} effective NFE, {mean:.2f} s/video)")
    return 0


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="text-to-video with a Wan teacher pipeline or an exported student, to mp4")
    p.add_argument(
        "--model",
        type=Path,
        required=True,
        help="a diffusers Wan pipeline root (teacher), a student or pipeline folder from tmd export, or a world "
        "run's student.safetensors (mp4 and GIF with the world's decoder)",
    )
    prompts = p.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", help="one prompt")
    prompts.add_argument("--prompts", type=Path, help="a text file, one prompt per line")
    p.add_argument("--out", type=Path, required=True, help="output folder (mp4 files and generation.json)")
    p.add_argument("--pipeline", type=Path, help="pipeline root for text encoder and VAE (default: the student's teacher)")
    p.add_argument("--steps", type=int, help="sampling steps (default: 50 for a teacher, 2 for a student)")
    p.add_argument("--inner-steps", type=int, help="TMD inner flow-head steps N (default 4; TMD students only)")
    p.add_argument("--guidance", type=float, help="teacher CFG scale (default 5; 1 = none; teachers only)")
    p.add_argument("--guidance-2", type=float, help="Wan2.2 A14B: the low-noise expert's CFG scale (default: --guidance)")
    p.add_argument("--image", help="first frame for Wan2.2 TI2V's image-to-video mode (not supported yet: refused)")
    p.add_argument("--shift", type=float, help="time shift (default: the pipeline scheduler's for a teacher, 10 for students)")
    p.add_argument("--negative-prompt", help="teacher CFG negative prompt (default: Wan's)")
    p.add_argument(
        "--scheduler",
        choices=("pipeline", "euler"),
        default="pipeline",
        help="teacher sampler: the scheduler the pipeline ships (UniPC for the published Wan2.1; Euler where "
        "it ships none), or tmd's Euler sampler",
    )
    _add_video_size(p, "video", frames_note=" (Wan; world videos have the world's size)")
    p.add_argument("--fps", type=int, default=16, help="frame rate written into the mp4s")
    p.add_argument("--batch-size", type=int, default=1, help="videos sampled together")
    p.add_argument("--seed", type=int, default=0, help="video i starts from noise seeded by seed + i")
    p.add_argument("--save-latents", action="store_true", help="also write each video's latents (.safetensors)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32", help="transformer and text encoder precision")
    p.add_argument(
        "--attention",
        choices=list(ATTENTION_KERNELS),
        default="sdpa",
        help="SDPA attention kernel (default: PyTorch's choice; flash/cudnn on a GPU)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks (slow first batch)")
    p.add_argument("--device", help="torch device (default: cuda if available)")
    _add_threads(p)
    p.set_defaults(func=_cmd_generate)


def _cmd_prepare(args: argparse.Namespace) -> int:
    """Encode captioned videos (or, text-only, prompts) into latent / embedding shards for training."""
    import logging

    import torch

    from tmd.data.prepare import prepare
    from tmd.programs.generate import read_prompts

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.text_only:
        if args.prompts is None or args.captions is not None or args.videos is not None:
            raise ValueError("--text-only takes --prompts FILE, without --videos and --captions")
        sources = {"prompts": read_prompts(args.prompts)}
    else:
        if args.videos is None or args.captions is None or args.prompts is not None:
            raise ValueError("give --videos DIR and --captions FILE (or --text-only --prompts FILE)")
        sources = {"videos": args.videos, "captions": args.captions}
    index = prepare(
        args.out,
        args.model,
        **sources,
        frames=args.frames,
        height=args.height,
        width=args.width,
        fps=args.fps,
        shard_size=args.shard_size,
        workers=args.workers,
        negative_prompt=args.negative_prompt,
        dtype=getattr(torch, _DTYPES[args.dtype]),
        device=args.device,
    )
    print(f"{index['samples']} samples in {len(index['shards'])} shards written to {args.out} ({index['skipped']} skipped)")
    return 0


def _add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="encode videos + captions (or prompts only) into training shards")
    p.add_argument("--videos", type=Path, help="folder of video files (the caption file names them relative to it)")
    p.add_argument("--captions", type=Path, help=".json {video: caption} or .jsonl lines {video, caption}")
    p.add_argument("--model", type=Path, required=True, help="a diffusers Wan pipeline root (VAE, text encoder)")
    p.add_argument("--out", type=Path, required=True, help="output folder; an existing one is resumed")
    p.add_argument("--text-only", action="store_true", help="prompt embeddings only (data-free methods)")
    p.add_argument("--prompts", type=Path, help="with --text-only: a text file, one prompt per line")
    _add_video_size(p, "clip", height_note=" (resized to cover, then center-cropped)")
    p.add_argument("--fps", type=float, default=16.0, help="clips are resampled to this frame rate")
    p.add_argument("--shard-size", type=int, default=64, help="samples per shard (the unit of resuming)")
    p.add_argument("--workers", type=int, default=4, help="video decoding threads")
    p.add_argument("--negative-prompt", help="the stored CFG negative prompt (default: Wan's)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32", help="text encoder precision (the VAE runs fp32)")
    p.add_argument("--device", help="torch device (default: cuda if available)")
    _add_threads(p)
    p.set_defaults(func=_cmd_prepare)


def _cmd_export(args: argparse.Namespace) -> int:
    """Turn a run's student.safetensors into a self-describing student folder for tmd generate."""
    from tmd.pipelines.export import export_run

    path = export_run(args.run, args.teacher, args.out, args.format)
    print(f"{'pipeline' if args.format == 'pipeline' else 'student'} folder written to {path}")
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="turn a training run's student.safetensors into a student folder")
    p.add_argument("--run", type=Path, required=True, help="the run's student.safetensors")
    p.add_argument("--teacher", type=Path, required=True, help="the teacher's diffusers Wan pipeline root")
    p.add_argument("--out", type=Path, required=True, help="the student folder to write")
    p.add_argument(
        "--format",
        choices=("student", "pipeline"),
        default="student",
        help="student: tmd's student folder; pipeline: a diffusers pipeline folder (TMDPipeline for TMD "
        "students, stock WanPipeline for DMD2-v), with the teacher's VAE and text encoder",
    )
    p.set_defaults(func=_cmd_export)


def _cmd_bench(args: argparse.Namespace) -> int:
    """Latency, peak memory and throughput of every sampler and training step, against effective NFE."""
    import torch

    from tmd.programs.bench import BenchSettings, format_report, run_bench, write_json

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    quick = {"repeats": 3, "warmup": 1} if args.quick else {"repeats": 5, "warmup": 2}
    settings = BenchSettings(
        model=args.model,
        latent=tuple(args.latent) if args.latent else None,
        batch=args.batch,
        repeats=args.repeats or quick["repeats"],
        warmup=quick["warmup"] if args.warmup is None else args.warmup,
        device=device,
        dtype=args.dtype,
        head_blocks=args.head_blocks,
        quick=args.quick,
        fast_path=args.fast_path or args.compile,
        compile=args.compile,
        generator_step_only=args.generator_step,
    )
    result = run_bench(settings, progress=lambda message: print(f"bench: {message}", file=sys.stderr, flush=True))
    result["meta"]["command"] = " ".join(["tmd", *args.argv])
    print(format_report(result))
    if args.json:
        write_json(result, args.json)
        print(f"results written to {args.json}")
    return 0


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="latency / memory / throughput tables of samplers and training steps")
    p.add_argument(
        "--model",
        default="world",
        help='"world" (CPU default), "wan1.3b" (GPU), a diffusers Wan folder, a .json/.yaml transformer config, or "tiny"',
    )
    p.add_argument("--latent", type=int, nargs=4, metavar=("C", "F", "H", "W"), help="latent shape (default: the model's)")
    p.add_argument("--batch", type=int, help="samples per call (default 4; 1 for wan1.3b)")
    p.add_argument("--repeats", type=int, help="timed repeats per row, median reported (default 5; 3 with --quick)")
    p.add_argument("--warmup", type=int, help="untimed runs per row first (default 2; 1 with --quick)")
    p.add_argument("--head-blocks", type=int, help="TMD flow-head blocks H (default 2 for world, 5 for wan1.3b)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32", help="model precision")
    _add_threads(p)
    p.add_argument("--json", type=Path, help="also write the tables to this JSON file")
    p.add_argument("--quick", action="store_true", help="fewer rows and repeats (a couple of minutes on CPU)")
    p.add_argument(
        "--fast-path",
        action="store_true",
        help="add the fast-path table: attention kernels and bf16 against the default, in one run",
    )
    p.add_argument("--compile", action="store_true", help="add torch.compile to the fast-path table (slow to compile)")
    p.add_argument(
        "--generator-step",
        action="store_true",
        help="only the TMD stage-2 generator step against DMD2-v's (N = 2, H = L / 6; the paper: under 17%% extra)",
    )
    p.set_defaults(func=_cmd_bench)


def _cmd_study(args: argparse.Namespace) -> int:
    """Train the study's missing runs (resumable, --jobs at a time), score them alike, report with intervals."""
    from tmd.programs.study.command import main as study

    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    return study(args)


def _add_study(sub) -> None:
    p = sub.add_parser(
        "study", help="a declared table of runs x training seeds: train what is missing, score, report with intervals"
    )
    p.add_argument(
        "--config",
        required=True,
        help="a study file, or the name of a shipped one (study_main.yaml, study_ablations.yaml, study_baselines.yaml, study_budget.yaml, study_paper_budget.yaml, study_paper_data.yaml)",
    )
    p.add_argument("--jobs", type=int, default=1, help="runs trained at a time, each in its own process (1: in this process)")
    p.add_argument("--report", action="store_true", help="only write the report (report_dir) from the committed run records")
    p.add_argument("--only", nargs="+", metavar="NAME", help="train only these runs (and their parents)")
    p.add_argument("--seeds", nargs="+", type=int, metavar="SEED", help="train only these training seeds (and their parents)")
    p.add_argument("--dry-run", action="store_true", help="list the runs, their keys and state, and the estimated time")
    p.add_argument("--records", default="docs/study/runs", help="folder of the per-run JSON records (committed)")
    p.add_argument("--work", default="runs/study", help="folder of the runs' weights and logs (not committed)")
    p.add_argument("--readme", type=Path, help="with the report: also write the results table into this file's study block")
    _add_threads(p)
    p.set_defaults(func=_cmd_study)


def _add_video_size(p: argparse.ArgumentParser, noun: str, frames_note: str = "", height_note: str = "") -> None:
    """--frames, --height and --width, Wan2.1's 480p by default: one default for the clips prepare
    encodes and the videos generate makes, so that a student is trained at the size it generates."""
    p.add_argument("--frames", type=int, default=81, help=f"frames per {noun}, 4k+1{frames_note}")
    p.add_argument("--height", type=int, default=480, help=f"{noun} height in pixels{height_note}")
    p.add_argument("--width", type=int, default=832, help=f"{noun} width in pixels")


def _add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default 1 without a GPU: on a shared 2-core machine "
        "one thread measured up to 10x faster than two for these small models; 0 = torch's default)",
    )


def _set_threads(args: argparse.Namespace) -> None:
    threads = getattr(args, "threads", 0)
    if threads is None:
        import torch

        threads = 0 if torch.cuda.is_available() else 1
    if threads:
        import torch

        torch.set_num_threads(threads)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, where it has one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def _add_common(p: argparse.ArgumentParser) -> None:
    """What every command takes: --threads (a shared machine must not be oversubscribed) and --debug."""
    if "--threads" not in p._option_string_actions:
        _add_threads(p)
    # SUPPRESS: an unset subcommand flag must not override ``tmd --debug COMMAND``
    p.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error instead of one line"
    )
    p.formatter_class = _HelpFormatter
    p.set_defaults(parser=p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tmd", description="Transition Matching Distillation for fast video generation")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_sample(sub)
    _add_train_teacher(sub)
    _add_evaluate(sub)
    _add_train(sub)
    _add_demo(sub)
    _add_generate(sub)
    _add_prepare(sub)
    synthesize.add_parser(sub, _add_threads)
    _add_export(sub)
    _add_bench(sub)
    _add_study(sub)
    for p in sub.choices.values():
        _add_common(p)
    return parser


def _parse(argv: list[str]) -> argparse.Namespace:
    args, extra = build_parser().parse_known_args(argv)
    # argparse fills a nargs="*" positional once: key=value pairs after another option come back unparsed
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        args.parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


@contextlib.contextmanager
def _one_line_warnings(command: str):
    """tmd's own warnings read like its errors; everyone else's keep their file and line."""
    with warnings.catch_warnings():
        show = warnings.showwarning

        def show_warning(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, TmdWarning):
                print(f"tmd {command}: warning: {message}", file=file or sys.stderr)
            else:
                show(message, category, filename, lineno, file, line)

        warnings.showwarning = show_warning
        yield


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parse(argv)
    args.argv = argv  # recorded next to what a command builds, so it can be re-run exactly
    _set_threads(args)
    try:
        with _one_line_warnings(args.command):
            return args.func(args)
    except (TmdError, ValueError, FileNotFoundError, FileExistsError) as error:
        # user errors (bad inputs, missing or broken files, bad config keys) read as one line, not a traceback
        if args.debug:
            raise
        message = str(error).replace("\n", " ")
        print(f"tmd {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
