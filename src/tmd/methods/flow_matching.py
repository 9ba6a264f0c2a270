"""Flow matching: how the synthetic world's teacher is trained (LFM: in an autoencoder's latent space)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from tmd import flow
from tmd.methods import register
from tmd.methods.base import GuidedSampling, Method
from tmd.methods.common import drop_condition, flow_matching_loss, trainable_copy


@dataclass
class FlowMatchingConfig:
    cond_dropout: float = 0.1  # trains the unconditional branch that classifier-free guidance needs
    time_shift: float = 3.0  # t ~ shift(U[0.001, 0.999]): more training where the sampler starts

    def __post_init__(self):
        if not 0 <= self.cond_dropout < 1:
            raise ValueError(f"cond_dropout must be in [0, 1), got {self.cond_dropout}")
        if self.time_shift <= 0:
            raise ValueError(f"time_shift must be > 0, got {self.time_shift}")


@register("flow_matching")
class FlowMatching(GuidedSampling, Method):
    """The trained module is a multi-step velocity model: sampled like the teacher, with CFG."""

    Config = FlowMatchingConfig
    export_module = "model"  # the group and EMA names the world teacher's checkpoints hold

    def __init__(self, cfg: FlowMatchingConfig, student: nn.Module):
        super().__init__(cfg)
        self.student = student

    @classmethod
    def from_teacher(cls, cfg: FlowMatchingConfig, teacher: nn.Module, activation_checkpointing: bool = False) -> FlowMatching:
        """Fine-tune a copy of ``teacher`` (or train it from scratch: the world teacher's recipe)."""
        student = trainable_copy(teacher)
        student.activation_checkpointing = activation_checkpointing
        return cls(cfg, student)

    def parameter_groups(self):
        return {"model": [p for p in self.student.parameters() if p.requires_grad]}

    def ema_modules(self):
        return {"model": self.student}

    def state_modules(self):
        return {"model": self.student}

    def training_step(self, batch, step, update):
        x = batch["x"]
        cond, _ = drop_condition(batch["cond"], batch["neg_cond"], self.cfg.cond_dropout, self.rng)
        t = flow.sample_shifted_uniform(x.shape[0], self.cfg.time_shift, self.rng, x.device)
        noise = self.rng.randn(x.shape, x.device)
        loss = flow_matching_loss(self.student, x, cond, t, noise)
        update("model", loss)
        return {}
