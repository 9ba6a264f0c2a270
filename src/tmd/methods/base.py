"""The method interface: what every registered distillation method is. A new method's author reads this first.

A method is a loss over shared model parts (the frozen teacher, the trained generator, critics such as a fake
score or a discriminator) in one file that subclasses :class:`Method`, plus a line in ``tmd.methods._BUILTIN``.
The trainer (``tmd.train.loop.Trainer``) and the programs only ever ask a method these questions:

- **Build**: ``from_teacher(cfg, teacher, activation_checkpointing)``, ``cfg`` an instance of the class's
  ``Config`` dataclass (registered with ``@register(name)``; ``tmd train`` reads it from ``method:``).
- **Train**: ``parameter_groups()`` (one AdamW per group), ``optimizer_overrides()`` (a group's own
  ``lr_scale`` / ``betas``), ``ema_modules()`` (EMA copies the trainer keeps), ``state_modules()`` (everything
  checkpointed), and ``training_step(batch, step, update)``: compute a loss and call
  ``update(group, loss, terms)`` for each group that steps this iteration (a group at most once per step); return
  extra metrics to log. Draw **all** randomness from ``self.rng`` (a ``tmd.rng.BatchRandom`` the trainer sets
  before the first step): then K data-parallel processes draw what one does and a resume continues the streams.
- **Export**: ``export_module``, the name in ``ema_modules()`` of the generator that ``student.safetensors``
  holds (its EMA weights) and evaluation samples.
- **Sample**: ``sampler(cfg, module, outer, inner, seed, guidance, shift)`` turns the exported generator into a
  ``sample_fn(noise, cond, neg_cond)`` at M outer (and, for ``samples_with_inner_steps``, N inner) steps;
  ``effective_nfe`` says what that costs in teacher forward passes; ``sample_steps`` are the step counts
  ``tmd demo`` scores; ``run_steps(cfg)`` the (M, N) a run trains for.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from tmd import flow
from tmd.rng import BatchRandom
from tmd.sampling import sample_few_step, sample_teacher

SampleFn = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``sample_fn(noise, cond, neg_cond) -> latents``; all (B, ...) tensors, latents like ``noise``."""
Update = Callable[..., None]
"""``update(group, loss, terms=None)``: back-propagate ``loss`` and step ``group`` (accumulation, clip, EMA)."""


class Method(nn.Module, ABC):
    Config: ClassVar[type]
    """The dataclass of the method's options (``method:`` in a run config)."""
    export_module: ClassVar[str]
    """Which of ``ema_modules()`` is the trained generator: exported, evaluated, sampled."""
    exports_student_folder: ClassVar[bool] = True
    trains_on_two_experts: ClassVar[bool] = False
    """Whether the method routes a Wan2.2 A14B teacher's two experts, each with its CFG scale, everywhere it asks
    the teacher (built and tested for TM, TMD and DMD2-v; ``tmd train`` refuses the others in one line)."""
    """Whether ``tmd export`` turns the run's weights into a student (or pipeline) folder, which holds one Wan
    transformer: not LinVideo's linearised teacher (another run's ``data.linearised_teacher``) nor Phased DMD's
    experts, one transformer per phase."""
    sample_steps: ClassVar[tuple[int, ...]] = (1, 2)
    """Step counts at which ``tmd demo`` evaluates the trained generator."""
    samples_with_inner_steps: ClassVar[bool] = False
    """True for TMD students: sampled with M outer x N inner steps."""

    def __init__(self, cfg: Any):
        super().__init__()
        self.cfg = cfg
        self.rng: BatchRandom | None = None
        """The random source, set by the trainer before the first step; every training-time draw comes from it."""

    # -- build and train --------------------------------------------------------------------------

    @classmethod
    @abstractmethod
    def from_teacher(cls, cfg: Any, teacher: nn.Module, activation_checkpointing: bool = False) -> Method:
        """The method's modules built around ``teacher`` (frozen; trained copies are the method's own)."""

    @abstractmethod
    def parameter_groups(self) -> dict[str, list[nn.Parameter]]: ...

    def optimizer_overrides(self) -> dict[str, dict[str, Any]]:
        """Per group, ``lr_scale`` (times ``train.lr``) and ``betas`` that differ from the run's."""
        return {}

    @abstractmethod
    def ema_modules(self) -> dict[str, nn.Module]: ...

    @abstractmethod
    def state_modules(self) -> dict[str, nn.Module]: ...

    @abstractmethod
    def training_step(self, batch: dict, step: int, update: Update) -> dict[str, float] | None: ...

    def exported(self) -> tuple[str, nn.Module]:
        """``(name, module)`` of the generator to export: ``export_module`` among ``ema_modules()``."""
        return self.export_module, self.ema_modules()[self.export_module]

    # -- sample the trained generator -------------------------------------------------------------

    @classmethod
    def run_steps(cls, cfg: Any) -> tuple[int, int | None]:
        """The (M, N) a run trains for: its config's ``outer_steps`` (``inner_steps``), else ``sample_steps[0]``."""
        outer = getattr(cfg, "outer_steps", None)
        return (cls.sample_steps[0] if outer is None else outer), (cfg.inner_steps if cls.samples_with_inner_steps else None)

    @classmethod
    def check_steps(cls, outer: int, inner: int | None) -> None:
        if cls.samples_with_inner_steps and inner is None:
            raise ValueError(f"{cls.__name__} students sample with outer x inner steps; inner steps missing for M = {outer}")
        if not cls.samples_with_inner_steps and inner is not None:
            raise ValueError(f"{cls.__name__} has no inner steps; score it as [{outer}, null]")

    @staticmethod
    def sample(
        generator_module: nn.Module, noise: Tensor, cond: Tensor, steps: int, rng=None, outer_shift: float = flow.OUTER_SHIFT
    ) -> Tensor:
        """How the trained generator samples ``steps`` outer steps; the default: deterministic Euler steps of a
        few-step velocity model on the outer grid. A method whose generator samples otherwise overrides it."""
        return sample_few_step(generator_module, noise, cond, steps, rng, outer_shift)

    @classmethod
    def runs_in_stock_pipeline(cls, cfg: Any) -> bool:
        """Whether a stock ``WanPipeline`` whose Euler scheduler steps the outer grid samples this method's few-step
        generator as :meth:`sample` does (``tmd export --format pipeline`` refuses it otherwise)."""
        return True

    @classmethod
    def sampler(
        cls, cfg: Any, module: nn.Module, outer: int, inner: int | None, seed: int, guidance: float, shift: float
    ) -> SampleFn:
        """``module`` sampled as this method samples; fresh noise inside the sampler comes from a generator seeded
        with ``seed`` on every call, on the noise's device (a CUDA run samples during training). The default: ``sample`` with the config's ``outer_shift`` where it has one."""
        cls.check_steps(outer, inner)
        outer_shift = getattr(cfg, "outer_shift", None)
        options = {} if outer_shift is None else {"outer_shift": outer_shift}
        return lambda noise, cond, neg: cls.sample(
            module, noise, cond, outer, torch.Generator(noise.device).manual_seed(seed), **options
        )

    @classmethod
    def effective_nfe(cls, cfg: Any, outer: int, inner: int | None, num_blocks: int, guidance: float) -> float:
        """Teacher forward passes per video: one per step for a plain few-step generator."""
        return float(outer)


class GuidedSampling:
    """For a method whose trained module is a multi-step velocity model (the world teacher's flow matching,
    LinVideo's linearised teacher): sampled like the teacher, ``outer`` Euler steps with CFG."""

    sample_steps: ClassVar[tuple[int, ...]] = (50, 8)

    @classmethod
    def sampler(cls, cfg, module, outer, inner, seed, guidance, shift) -> SampleFn:
        cls.check_steps(outer, inner)
        return lambda noise, cond, neg: sample_teacher(module, noise, cond, neg, outer, guidance, shift)

    @classmethod
    def effective_nfe(cls, cfg, outer, inner, num_blocks, guidance) -> float:
        return flow.teacher_effective_nfe(outer, guidance)
