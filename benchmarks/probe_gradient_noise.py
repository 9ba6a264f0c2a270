"""How noisy is each method's generator gradient, and how much of TMD's noise is its inner noise y1?

    python benchmarks/probe_gradient_noise.py --seed 0 [--runs tmd_n2_m2 dmd2_m2] [--every 100] [--repeats 8]

Trains the main table's runs (``study_main.yaml``, the same resolved config and seed, TMD from its stage 1's
weights in ``--work``) exactly as the study does, and measures along the way, without touching the run's
randomness (the method's and the global RNG states are saved and restored around every measurement):

- on every generator update: the cosine similarity of successive generator gradients (after the clip, which
  only rescales) and of successive parameter updates (what AdamW made of them);
- every ``--every`` iterations and at the start, ``--repeats`` generator gradients at the current weights:
  ``all``: each from a fresh batch and fresh method noise, as successive training steps see them; ``y1``: one
  batch and all of the method's noise fixed except TMD's inner noise y1. From the ``all`` draws, the gradient
  signal-to-noise ratio ``|E g|^2 / E |g - E g|^2`` (the numerator corrected for the noise in the mean); the ``y1`` draws' variance over the ``all`` draws'
  variance is the share of the per-step gradient noise that y1 alone causes.

The run's final logged losses are written next to the study record's (``final_metrics``): equal ones show
that the measurements describe the very runs of the main table (TMD's are equal up to float rounding since its
gap embedder lost an output bias that cancelled). Writes ``--out`` (default ``docs/results/gradient_noise.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import torch

from tmd.config import RunConfig, from_dict
from tmd.methods import get_method
from tmd.programs.study.plan import plan
from tmd.programs.study.spec import load_study
from tmd.train.logging import read_metrics
from tmd.train.loop import Trainer, seed_everything
from tmd.train.run import STUDENT_FILE, teacher_and_data
from tmd.world.data import WorldAssets, world_data_source

PROBE_DATA_SEED = 1_000_003
"""The probe's batches come from their own data stream, never from the run's."""


def flat_grad(params: list[torch.nn.Parameter]) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).double() for p in params])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))


class GradientProbe:
    """The trainer's ``eval_fn``: gradient statistics at the current weights, leaving every RNG as it found it."""

    def __init__(self, method, assets: WorldAssets, batch_size: int, repeats: int, has_inner_noise: bool):
        self.method, self.repeats, self.has_inner_noise = method, repeats, has_inner_noise
        self.data = world_data_source(assets.autoencoder, assets.text_encoder, batch_size, PROBE_DATA_SEED)
        self.params = [p for p in method.student.parameters() if p.requires_grad]
        self.points: list[dict] = []

    def gradient(self, batch: dict, inner_noise: torch.Generator | None = None) -> torch.Tensor:
        """The generator gradient of one training step on ``batch`` (step 0 is a generator turn); with
        ``inner_noise``, TMD's y1 (the method's second normal draw of the step) comes from it instead."""
        method, draws = self.method, []
        own = method._randn

        def randn(shape, device):
            out = own(shape, device)  # drawn anyway, so the draws after it are the step's own
            draws.append(tuple(shape))
            if inner_noise is not None and len(draws) == 2:
                return torch.randn(out.shape, generator=inner_noise, dtype=out.dtype).to(out.device)
            return out

        captured = {}

        def update(group, loss, terms=None):
            if group != "generator":
                raise RuntimeError(f"step 0 updated {group!r}: expected a generator turn")
            method.zero_grad(set_to_none=True)
            loss.backward()
            captured["grad"] = flat_grad(self.params)

        method._randn = randn
        try:
            method.training_step(batch, 0, update)
        finally:
            del method._randn
            method.zero_grad(set_to_none=True)
        if inner_noise is not None and len(draws) != 3:
            raise RuntimeError(f"expected the draws noise, y1, eps in a TMD generator step, got {draws}")
        return captured["grad"]

    def __call__(self, step: int, ema_states) -> dict:
        rng = self.method.rng.source
        method_state, global_state = rng.get_state(), torch.get_rng_state()
        try:
            point = {"step": step, **self.spread("all", [self.fresh(r) for r in range(self.repeats)])}
            if self.has_inner_noise:
                batch, fixed = self.data.next_batch(), torch.Generator().manual_seed(PROBE_DATA_SEED + step)
                draws = []
                for r in range(self.repeats):
                    rng.set_state(fixed.get_state())
                    draws.append(self.gradient(batch, torch.Generator().manual_seed(r)))
                point.update(self.spread("y1", draws))
                point["y1_share_of_variance"] = point["y1_variance"] / point["all_variance"]
        finally:
            rng.set_state(method_state)
            torch.set_rng_state(global_state)
        self.points.append(point)
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in point.items()}, flush=True)
        return {}

    def fresh(self, r: int) -> torch.Tensor:
        self.method.rng.source.manual_seed(PROBE_DATA_SEED + 7919 * r)
        return self.gradient(self.data.next_batch())

    @staticmethod
    def spread(name: str, draws: list[torch.Tensor]) -> dict[str, float]:
        stacked = torch.stack(draws)
        mean = stacked.mean(0)
        variance = float((stacked - mean).pow(2).sum(1).mean()) * len(draws) / (len(draws) - 1)
        # |mean g|^2 carries variance / R of noise: without it, an unbiased estimate of |E g|^2
        signal = float(mean.pow(2).sum()) - variance / len(draws)
        pairs = [cosine(draws[i], draws[j]) for i in range(len(draws)) for j in range(i + 1, len(draws))]
        return {
            f"{name}_signal": signal,
            f"{name}_variance": variance,
            f"{name}_snr": signal / variance,
            f"{name}_pair_cosine": sum(pairs) / len(pairs),
        }


class UpdateCosines:
    """Cosines of successive generator gradients (after the clip) and successive parameter updates."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params
        self.previous_grad = self.previous_update = self.before = None
        self.grad_cosines: list[float] = []
        self.update_cosines: list[float] = []

    def pre(self, optimizer, args, kwargs) -> None:
        grad = flat_grad(self.params)
        if self.previous_grad is not None:
            self.grad_cosines.append(cosine(grad, self.previous_grad))
        self.previous_grad = grad
        self.before = torch.cat([p.detach().reshape(-1).double() for p in self.params])

    def post(self, optimizer, args, kwargs) -> None:
        update = torch.cat([p.detach().reshape(-1).double() for p in self.params]) - self.before
        if self.previous_update is not None:
            self.update_cosines.append(cosine(update, self.previous_update))
        self.previous_update = update


def summary(values: list[float]) -> dict[str, float] | None:
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return {
        "mean": mean,
        "sd": sd,
        "n": n,
        "first_half": sum(values[: n // 2]) / (n // 2),
        "second_half": sum(values[n // 2 :]) / (n - n // 2),
    }


def probe_run(run, work: Path, every: int, repeats: int, out_dir: Path, steps: int | None = None) -> dict:
    config = dict(run.config)
    config["train"] = {**config["train"], "eval_every": every, "out_dir": str(out_dir / run.key), "progress": False}
    if steps is not None:
        config["train"]["steps"] = steps
    if run.parent is not None:
        config["method"] = {**config["method"], "init_from": str(work / run.parent.key / STUDENT_FILE)}
    cfg = from_dict(RunConfig, config, source=f"{run.name} seed {run.seed}")
    shutil.rmtree(out_dir / run.key, ignore_errors=True)  # a probe is always a whole run from its start
    assets = WorldAssets(cfg.data.assets)
    teacher, data = teacher_and_data(cfg, assets)
    seed_everything(cfg.train.seed)  # as train_run: the new modules' initial weights
    method = get_method(cfg.method_name).from_teacher(cfg.method, teacher, False)
    probe = GradientProbe(method, assets, cfg.train.batch_size, repeats, cfg.method_name == "tmd")
    trainer = Trainer(method, data, cfg, out_dir / run.key, eval_fn=probe)
    cosines = UpdateCosines(probe.params)
    trainer.optimizers["generator"].register_step_pre_hook(cosines.pre)
    trainer.optimizers["generator"].register_step_post_hook(cosines.post)
    trainer.train()
    logged = next(m for m in reversed(read_metrics(out_dir / run.key)) if "time" in m)
    return {
        "run": run.name,
        "key": run.key,
        "seed": run.seed,
        "method": cfg.method_name,
        "final_losses": {k: v for k, v in logged.items() if k.startswith("loss/")},
        "successive_gradient_cosine": summary(cosines.grad_cosines),
        "successive_update_cosine": summary(cosines.update_cosines),
        "points": probe.points,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", nargs="+", default=["tmd_n2_m2", "dmd2_m2"])
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--work", type=Path, default=Path("runs/study"), help="the study's work folder (stage-1 weights)")
    parser.add_argument("--records", type=Path, default=Path("docs/study/runs"))
    parser.add_argument("--out", type=Path, default=Path("docs/results/gradient_noise.json"))
    parser.add_argument("--steps", type=int, help="a shorter run than the study's, to try the probe out (not compared)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    study, _ = load_study("study_main.yaml")
    runs = {(r.name, r.seed): r for r in plan(study)}
    results = json.loads(args.out.read_text()) if args.out.is_file() else []
    for name in args.runs:
        run = runs[(name, args.seed)]
        result = probe_run(run, args.work, args.every, args.repeats, Path("runs/probe/gradient_noise"), args.steps)
        if args.steps is None:
            record = json.loads((args.records / f"{run.key}.json").read_text())
            expected = {k: v for k, v in record["final_metrics"].items() if k.startswith("loss/")}
            result["study_record_final_losses"] = expected
            print(name, "seed", args.seed, "final losses", result["final_losses"], "study record", expected, flush=True)
        results = [r for r in results if (r["key"]) != run.key] + [result]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
