"""The training loop every method (teacher, TMD stage 1/2, DMD2, ...) runs in.

A method is a ``tmd.methods.base.Method`` (its docstring is the interface; the trainer needs only the part
``TrainableMethod`` names, so a test's toy method may implement just that). The trainer assigns its random
source ``rng`` (a ``tmd.rng.BatchRandom`` seeded from ``train.seed``, on the training device, checkpointed).

``update`` checks the loss is finite and runs ``tmd.train.update.UpdateStep``: zero the grads of all groups,
back-propagate, clip the group's grad norm to ``train.grad_clip`` (a non-finite norm stops the run), step its
AdamW and its EMAs.
Each group's learning rate follows ``train.lr_schedule`` after ``train.warmup_steps`` (a torch
``LambdaLR`` per optimizer, stepped once per training step and checkpointed).

With ``train.grad_accum = K`` > 1 each step runs ``training_step`` on K micro-batches, and micro-batch k
of rank r is data-parallel "rank" ``r K + k`` of ``K x world_size``: it gets exactly those rows of the
global batch and, through its ``BatchRandom`` (every micro-batch starts from the step's random
state), exactly the noise those rows get in one big batch. ``update`` then only back-propagates
``loss / K`` into its group's gradients (the other groups' gradients are kept aside), and after the last
micro-batch every updated group clips, steps and moves its EMAs, in the order first updated. So K
micro-batches give the update of one batch K times larger, provided a loss does not depend on a group
updated earlier in the same ``training_step`` (true of every method here: critics train on the
detached generator sample); a dependency seen by autograd, or a group updated twice in one step, is
an error.
Under ``train.precision=bf16`` the whole ``training_step`` runs in bf16 autocast; parameters, grads and
optimizer states stay fp32. The trainer moves state modules to the device before building optimizers
and batches to the device before each step; methods read ``train.activation_checkpointing`` themselves.

Data comes from a ``DataSource`` (``tmd.data.source``: ``next_batch`` plus ``state_dict``/``load_state_dict``) so a
resumed run continues at the exact batch; ``GeneratorDataSource`` builds batch i from (seed, i) alone.

Under ``torchrun`` (``tmd.train.distributed``) the modules arrive sharded with FSDP2; every rank reads the
global batch and keeps its rows, draws its noise through a ``BatchRandom`` (the rows of global-batch
draws), and logs losses averaged over ranks: K processes compute what one process with the same global
``train.batch_size`` computes. Only rank 0 writes logs, the config and the progress bar.
"""

from __future__ import annotations

import math
import random
import statistics
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from tmd.config import RunConfig, to_dict
from tmd.data.source import DataSource
from tmd.errors import NonFiniteLossError
from tmd.rng import BatchRandom
from tmd.train import checkpoint as ckpt
from tmd.train.distributed import DistContext, check_global_batch, gather_full, slice_batch
from tmd.train.logging import MetricLogger
from tmd.train.resume import CHECKPOINT_DIR, plan_run, record_resume, start_fresh
from tmd.train.update import EMA, UpdateStep, optimizer_settings

EvalFn = Callable[[int, Mapping[str, dict[str, Tensor]]], dict[str, float]]
SampleFn = Callable[[int, Mapping[str, dict[str, Tensor]], MetricLogger], None]


class Update(Protocol):
    def __call__(self, group: str, loss: Tensor, terms: Mapping[str, Tensor] | None = None) -> None: ...


class TrainableMethod(Protocol):
    rng: BatchRandom

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]: ...

    def ema_modules(self) -> dict[str, nn.Module]: ...

    def state_modules(self) -> dict[str, nn.Module]: ...

    def training_step(self, batch: Any, step: int, update: Update) -> dict[str, float]: ...


@dataclass
class TrainResult:
    step: int
    metrics: dict[str, float]
    """The last logged record (window means)."""
    checkpoint: Path
    run_dir: Path
    ema: dict[str, dict[str, Tensor]]
    """EMA state dicts (whole, on the CPU) by EMA module name, loadable with ``module.load_state_dict``."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name} but CUDA is not available; use train.device=auto or cpu")
    return device


def seed_everything(seed: int) -> None:
    """Seed the global RNGs (call before building models so their initialisation is repeatable too)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def move_to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return type(batch)({k: move_to(v, device) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(move_to(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


class Trainer:
    """Runs ``method`` on ``data`` for ``cfg.train.steps`` steps in ``run_dir`` (default ``train.out_dir``).

    ``resume=True`` continues from the latest checkpoint in ``run_dir`` (or starts fresh if there is
    none); without it a run_dir that already holds checkpoints is refused rather than mixed into, and
    so is a resume whose config differs from the run's in a key that changes the model or the training
    (``tmd.train.resume``).
    ``eval_fn(step, ema) -> metrics`` (``tmd.train.hooks``) runs before the first step, every
    ``train.eval_every`` steps and after the last, with the EMA state dicts by EMA module name; its metrics
    are logged as ``eval/*``. ``sample_fn(step, ema, logger)`` (``tmd.train.samples``) runs alike every
    ``train.sample_every`` steps, on every rank; it writes and logs its videos itself.
    ``dist`` is the data-parallel context (``tmd.train.distributed.init_distributed``, after sharding the
    method's modules); without it the run is one process on ``train.device``.
    """

    def __init__(
        self,
        method: TrainableMethod,
        data: DataSource,
        cfg: RunConfig,
        run_dir: str | Path | None = None,
        resume: bool = False,
        eval_fn: EvalFn | None = None,
        dist: DistContext | None = None,
        sample_fn: SampleFn | None = None,
    ):
        self.method, self.data, self.cfg, self.eval_fn, self.sample_fn = method, data, cfg, eval_fn, sample_fn
        tc = cfg.train
        self.run_dir = Path(run_dir if run_dir is not None else tc.out_dir)
        self.checkpoint_dir = self.run_dir / CHECKPOINT_DIR
        self.dist = dist if dist is not None else DistContext(device=resolve_device(tc.device))
        self.device = self.dist.device
        check_global_batch(tc.batch_size, self.dist, tc.grad_accum)

        self.modules = method.state_modules()
        for module in self.modules.values():
            module.to(self.device)
        # frozen parameters cannot train: that is how LoRA (tmd.models.lora) leaves a base weight alone
        self.groups = {name: [p for p in params if p.requires_grad] for name, params in method.parameter_groups().items()}
        self._check_groups()
        unknown = set(tc.lr_groups) - set(self.groups)
        if unknown:
            raise ValueError(f"train.lr_groups names unknown groups {sorted(unknown)}; groups: {sorted(self.groups)}")
        settings = optimizer_settings(method, self.groups, tc.lr, tc.betas, tc.lr_groups)
        fused = True if self.device.type == "cuda" else None
        self.optimizers = {
            name: torch.optim.AdamW(params, **settings[name], weight_decay=tc.weight_decay, fused=fused)
            for name, params in self.groups.items()
        }
        self.schedulers = {
            name: torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(tc.lr_schedule, tc.warmup_steps, tc.steps))
            for name, opt in self.optimizers.items()
        }
        self.emas = {name: EMA(module, tc.ema_decay) for name, module in method.ema_modules().items()}
        # optimizer states are keyed by parameter names under this root, the same at any world size
        self._root = nn.ModuleDict(self.modules)
        self.update_step = UpdateStep(self.optimizers, self.groups, tc.grad_clip, self.emas)

        self.rng = torch.Generator(self.device).manual_seed(tc.seed)
        method.rng = BatchRandom(self.rng, self.dist.rank, self.dist.world_size)
        seed_everything(tc.seed)
        self.step = 0
        self._accumulated: _Accumulation | None = None

        plan = plan_run(cfg, self.run_dir, resume)  # a refused resume leaves the folder as it was
        if self.dist.is_main:
            ckpt.remove_stale_temporaries(self.checkpoint_dir)
        self.dist.barrier()
        if plan is not None:
            self._load(plan.checkpoint)
        if self.dist.is_main:
            if plan is None:
                start_fresh(cfg, self.run_dir)
            else:
                record_resume(self.run_dir, self.step, plan)
                print(f"resumed from step {self.step} ({plan.checkpoint})", flush=True)
        self._window: dict[str, list[float]] = defaultdict(list)

    def _check_groups(self) -> None:
        seen: dict[int, str] = {}
        for name, params in self.groups.items():
            if not params:
                raise ValueError(f"parameter group {name!r} has no trainable parameters")
            for p in params:
                if id(p) in seen:
                    raise ValueError(f"a parameter is in both groups {seen[id(p)]!r} and {name!r}")
                seen[id(p)] = name

    # -- the update callback handed to training_step ------------------------------------------

    def _update(self, group: str, loss: Tensor, terms: Mapping[str, Tensor] | None = None) -> None:
        if group not in self.optimizers:
            raise KeyError(f"update({group!r}): no such parameter group; groups: {sorted(self.optimizers)}")
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(f"update({group!r}) needs a scalar loss tensor, got {type(loss).__name__}")
        # averaged over ranks first: every rank then takes the same decision on a non-finite loss
        values = self.dist.mean({name: float(term.detach()) for name, term in (terms or {}).items()})
        total = self.dist.mean({"total": float(loss.detach())})["total"]
        if not np.isfinite(total) or not all(np.isfinite(v) for v in values.values()):
            bad = next((name for name, v in values.items() if not np.isfinite(v)), "total")
            raise NonFiniteLossError(
                f"non-finite loss at step {self.step + 1} in group {group!r}: term {bad!r} = "
                f"{values.get(bad, total)} (total {total}); stopped before updating; {self._checkpoint_state()}"
            )
        if self._accumulated is not None:
            self._accumulate(group, loss, total, values)
            return
        with torch.autocast(self.device.type, enabled=False):
            self.update_step.backward(loss)
            grad_norm = self._step_group(group, total)
        self._record(group, total, grad_norm, values)

    def _step_group(self, group: str, total: float) -> float:
        """Clip the group's gradients, step its optimizer and its EMAs; returns the gradient norm."""
        try:
            return self.update_step.step(group)
        except NonFiniteLossError:
            raise NonFiniteLossError(
                f"non-finite gradient norm at step {self.step + 1} in group {group!r} (loss {total}); "
                f"stopped before updating; {self._checkpoint_state()}"
            ) from None

    def _record(self, group: str, total: float, grad_norm: float, values: Mapping[str, float]) -> None:
        self._window[f"loss/{group}"].append(total)
        self._window[f"grad_norm/{group}"].append(grad_norm)
        for name, v in values.items():
            self._window[f"{group}/{name}"].append(v)

    def _checkpoint_state(self) -> str:
        latest = ckpt.latest_checkpoint(self.checkpoint_dir)
        if latest is None:
            first = min(self.cfg.train.checkpoint_every, self.cfg.train.steps)
            return f"no checkpoint was written yet (the first comes at step {first}), so there is nothing to resume"
        return f"the last checkpoint, {latest}, is intact: --resume continues from it"

    def _accumulate(self, group: str, loss: Tensor, total: float, values: Mapping[str, float]) -> None:
        """One micro-batch's share of ``update(group, loss)``: ``loss / K`` back-propagated into the group's
        gradients alone; the step waits for the last micro-batch (:meth:`_step_accumulated`)."""
        acc = self._accumulated
        earlier = acc.current
        if group in earlier:
            raise ValueError(
                f"update({group!r}) was called twice in one training_step; with train.grad_accum > 1 every "
                "group steps once per step, after the last micro-batch (set train.grad_accum=1)"
            )
        others = [p for name, params in self.groups.items() if name != group for p in params]
        kept = [p.grad for p in others]
        for p in others:
            p.grad = None
        with torch.autocast(self.device.type, enabled=False):
            (loss / acc.micro_batches).backward()
        # grads that reached a group updated earlier in this step mean the loss depends on it: one big
        # batch would have seen that group already stepped, the deferred step cannot reproduce that
        reached = [name for name in earlier if any(p.grad is not None for p in self.groups[name])]
        for p, grad in zip(others, kept):
            p.grad = grad
        if reached:
            raise ValueError(
                f"update({group!r}) depends on group {reached[0]!r}, updated earlier in the same training_step; "
                "with train.grad_accum > 1 groups step after the last micro-batch, so this method needs train.grad_accum=1"
            )
        earlier.append(group)
        acc.losses[group].append(total)
        for name, v in values.items():
            acc.terms[group][name].append(v)

    def _step_accumulated(self) -> None:
        acc = self._accumulated
        with torch.autocast(self.device.type, enabled=False):
            for group in acc.order:
                total = statistics.fmean(acc.losses[group])
                grad_norm = self._step_group(group, total)
                self._record(group, total, grad_norm, {name: statistics.fmean(v) for name, v in acc.terms[group].items()})
            self.update_step.zero_grad()

    def _micro_batches(self, batch: Any) -> dict[str, float]:
        """``training_step`` on each of the K micro-batches of this step's global batch; then the groups step."""
        tc, rank, world = self.cfg.train, self.dist.rank, self.dist.world_size
        k_total = tc.grad_accum
        start = self.rng.get_state()
        self._accumulated = _Accumulation(k_total)
        extras: dict[str, list[float]] = defaultdict(list)
        try:
            for k in range(k_total):
                self.rng.set_state(start)
                part = rank * k_total + k
                self.method.rng = BatchRandom(self.rng, part, world * k_total)
                micro = move_to(slice_batch(batch, part, world * k_total, tc.batch_size), self.device)
                with self._autocast():
                    for key, value in (self.method.training_step(micro, self.step, self._update) or {}).items():
                        extras[key].append(float(value))
                self._accumulated.end_micro_batch()
            self._step_accumulated()
        finally:
            self._accumulated = None
            self.method.rng = BatchRandom(self.rng, rank, world)
        return {key: statistics.fmean(values) for key, values in extras.items()}

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.train.precision == "bf16")

    # -- loop ------------------------------------------------------------------------------------

    def train(self) -> TrainResult:
        tc = self.cfg.train
        main = self.dist.is_main
        logger = MetricLogger(
            self.run_dir,
            resume_step=self.step,
            tensorboard=tc.tensorboard and main,
            wandb=tc.wandb and main,
            wandb_project=tc.wandb_project,
            config=to_dict(self.cfg),
            enabled=main,
        )
        bar = tqdm(
            total=tc.steps, initial=self.step, desc=self.cfg.method_name, disable=not (tc.progress and main), dynamic_ncols=True
        )
        start = time.perf_counter()
        last: dict[str, float] = {}
        path = ckpt.latest_checkpoint(self.checkpoint_dir)
        try:
            if self.step == 0:
                self._hooks(logger, done=False)  # the curve and the samples start at the initial weights
            while self.step < tc.steps:
                batch = self.data.next_batch()
                if tc.grad_accum > 1:
                    extra = self._micro_batches(batch)
                else:
                    if self.dist.enabled:
                        batch = slice_batch(batch, self.dist.rank, self.dist.world_size, tc.batch_size)
                    batch = move_to(batch, self.device)
                    with self._autocast():
                        extra = self.method.training_step(batch, self.step, self._update)
                for key, value in (extra or {}).items():
                    self._window[key].append(float(value))
                self.step += 1
                bar.update(1)
                done = self.step == tc.steps
                if self.step % tc.log_every == 0 or done:
                    last = self._log(logger, time.perf_counter() - start)
                    bar.set_postfix({k[5:]: f"{v:.4g}" for k, v in last.items() if k.startswith("loss/")}, refresh=False)
                self._hooks(logger, done)
                self._step_schedulers()  # after logging: the log shows the rate the step used
                if self.step % tc.checkpoint_every == 0 or done:
                    path = self.save()
        finally:
            bar.close()
            logger.close()
        if path is None or path.name != ckpt.checkpoint_name(self.step):
            path = self.save()
        return TrainResult(
            step=self.step,
            metrics=last,
            checkpoint=path,
            run_dir=self.run_dir,
            ema={name: gather_full(ema.full_state()) for name, ema in self.emas.items()},
        )

    def _step_schedulers(self, schedulers=None) -> None:
        with warnings.catch_warnings():
            # the schedule counts training steps; under TTUR a group may not have stepped yet on step 0
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`")
            for scheduler in schedulers or self.schedulers.values():
                scheduler.step()

    def _hooks(self, logger: MetricLogger, done: bool) -> None:
        """``eval_fn`` and ``sample_fn`` where their interval (``train.eval_every``, ``train.sample_every``) falls
        or after the last step."""
        tc = self.cfg.train
        due = [
            (hook, every)
            for hook, every in ((self.eval_fn, tc.eval_every), (self.sample_fn, tc.sample_every))
            if hook is not None and every and (self.step % every == 0 or done)
        ]
        if not due:
            return
        ema = {name: ema.full_state() for name, ema in self.emas.items()}
        for hook, _ in due:
            if hook is self.eval_fn:
                logger.log(self.step, {f"eval/{k}": float(v) for k, v in hook(self.step, ema).items()})
            else:
                hook(self.step, ema, logger)

    def _log(self, logger: MetricLogger, elapsed: float) -> dict[str, float]:
        record = {key: sum(values) / len(values) for key, values in self._window.items() if values}
        record.update({f"lr/{name}": opt.param_groups[0]["lr"] for name, opt in self.optimizers.items()})
        record["time"] = elapsed
        logger.log(self.step, record)
        self._window.clear()
        return record

    # -- checkpoints -----------------------------------------------------------------------------

    def _sharded_state(self) -> dict[str, Any]:
        """Weights, EMA weights and optimizer states by name: what DCP saves, and loads in place."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        return {
            "modules": {name: get_model_state_dict(module) for name, module in self.modules.items()},
            "ema": {name: ema.shadow for name, ema in self.emas.items()},
            "optimizers": {name: get_optimizer_state_dict(self._root, opt) for name, opt in self.optimizers.items()},
        }

    def save(self) -> Path:
        trainer_state = {
            "step": self.step,
            "optimizer_groups": sorted(self.optimizers),
            "batch_rng": self.rng.get_state(),  # the method's random source (BatchRandom's torch generator)
            "rng": ckpt.rng_state(),
            "data": self.data.state_dict(),
            "lr_schedulers": {name: scheduler.state_dict() for name, scheduler in self.schedulers.items()},
        }
        return ckpt.save_checkpoint(
            self.checkpoint_dir,
            self.step,
            self._sharded_state(),
            trainer_state,
            keep=self.cfg.train.keep_checkpoints,
            is_main=self.dist.is_main,
            barrier=self.dist.barrier,
        )

    def _load(self, path: Path) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        state = ckpt.read_trainer_state(path)
        if state["optimizer_groups"] != sorted(self.optimizers):
            raise ValueError(
                f"checkpoint {path} has optimizer groups {state['optimizer_groups']}, the method has {sorted(self.optimizers)}"
            )
        sharded = self._sharded_state()
        ckpt.load_sharded_state(path, sharded)
        for name, module in self.modules.items():
            set_model_state_dict(module, sharded["modules"][name])
        for name, opt in self.optimizers.items():
            set_optimizer_state_dict(self._root, opt, sharded["optimizers"][name])
        self._load_schedulers(path, state.get("lr_schedulers"))
        self.rng.set_state(state["batch_rng"] if "batch_rng" in state else state["generator"])  # "generator": before the rename
        ckpt.set_rng_state(state["rng"])
        self.data.load_state_dict(state["data"])
        self.step = state["step"]

    def _load_schedulers(self, path: Path, states: dict[str, Any] | None) -> None:
        tc = self.cfg.train
        if states is None:
            if tc.lr_schedule != "constant" or tc.warmup_steps:
                raise ValueError(
                    f"checkpoint {path} was written without a learning-rate schedule; resume it with "
                    f"train.lr_schedule=constant train.warmup_steps=0 (got {tc.lr_schedule!r}, {tc.warmup_steps})"
                )
            return
        for name, scheduler in self.schedulers.items():
            scheduler.load_state_dict(states[name])
            # re-evaluate at the saved position with this config's schedule: a resumed run may run longer
            scheduler.last_epoch -= 1
            self._step_schedulers((scheduler,))


@dataclass
class _Accumulation:
    """What the micro-batches of one step have back-propagated so far, per group."""

    micro_batches: int
    order: list[str] | None = None
    """The groups the first micro-batch updated, in order: every other one must update the same."""
    current: list[str] = field(default_factory=list)
    losses: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    terms: dict[str, dict[str, list[float]]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(list)))

    def end_micro_batch(self) -> None:
        if self.order is None:
            self.order = self.current
        elif self.current != self.order:
            raise ValueError(f"micro-batches of one step updated different groups: {self.order} and {self.current}")
        self.current = []


def lr_factor(schedule: str, warmup_steps: int, steps: int) -> Callable[[int], float]:
    """The multiplier of ``lr`` at training step ``i`` (0-based): ``(i + 1) / warmup_steps`` during warm-up,
    then 1 (constant), ``(1 + cos(pi p)) / 2`` (cosine) or ``1 - p`` (linear) with ``p`` the share of the
    post-warm-up steps already taken; the last step still has a positive rate."""

    def factor(i: int) -> float:
        if i < warmup_steps:
            return (i + 1) / warmup_steps
        progress = (i - warmup_steps) / max(1, steps - warmup_steps)
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        if schedule == "linear":
            return 1 - progress
        return 1.0

    return factor
