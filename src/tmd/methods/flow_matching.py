"""Flow matching: how the synthetic world's teacher is trained (LFM: in an autoencoder's latent space)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from tmd import flow
from tmd.methods import register
from tmd.methods.common import drop_condition, flow_matching_loss, trainable_copy
from tmd.rng import BatchRandom


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
class FlowMatching(nn.Module):
    Config = FlowMatchingConfig

    def __init__(self, cfg: FlowMatchingConfig, model: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.model = model
        self.generator: BatchRandom | None = None

    @classmethod
    def from_teacher(cls, cfg: FlowMatchingConfig, teacher: nn.Module) -> FlowMatching:
        """Fine-tune a copy of ``teacher``."""
        return cls(cfg, trainable_copy(teacher))

    def parameter_groups(self):
        return {"model": [p for p in self.model.parameters() if p.requires_grad]}

    def ema_modules(self):
        return {"model": self.model}

    def state_modules(self):
        return {"model": self.model}

    def training_step(self, batch, step, update):
        x = batch["x"]
        cond, _ = drop_condition(batch["cond"], batch["neg_cond"], self.cfg.cond_dropout, self.generator)
        t = flow.sample_shifted_uniform(x.shape[0], self.cfg.time_shift, self.generator, x.device)
        noise = self.generator.randn(x.shape, x.device)
        loss = flow_matching_loss(self.model, x, cond, t, noise)
        update("model", loss)
        return {}
