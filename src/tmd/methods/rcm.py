"""rCM, score-regularised continuous-time consistency (Zheng et al. 2025, arXiv 2510.08431; official code
NVlabs/rcm ``rcm/models/t2v_model_distill_rcm.py``): sCM on the flow teacher in TrigFlow time plus a DMD
reverse-KL regulariser. One student samples at 1, 2 and 4 steps.

TrigFlow around our rectified flow (the official ``RectifiedFlow_TrigFlowWrapper``): ``s = arctan(t / (1 - t))``,
``z_s = cos s x + sin s eps = x_t / N``, ``N = sqrt(t^2 + (1 - t)^2)`` (so ``cos s = (1 - t) / N``,
``sin s = t / N``); a velocity net becomes ``F = (cos s z - x0) / sin s = ((1 - 2t) / N) x_t + N v``.
The student keeps the teacher's velocity head, so its export is a plain Wan velocity model.

sCM (Alg. 1; the code's ``_student_scm_step``): at ``t ~ p_G`` (logit-normal) on noised data, the teacher's
CFG ``F_T``, the tangent ``tau = cos s sin s dF_theta/ds`` along the teacher's ODE ``dz/ds = F_T`` (at network
level: ``t (1 - t) dF/dt`` along ``dx_t/dt = v_T``), the target with warm-up ratio ``r = min(1, step / H)``
``g = -cos s sqrt(1 - r^2 sin^2 s) (F_theta^- - F_T) - (r cos s sin s z + tau)``, normalised per sample
``g / (||g||_2 + 0.1)``; loss ``100 ||F_theta - sg(F_theta) - g_hat||^2``.

DMD (Eq. 6; ``_student_dmd_step``): the student's stochastic backward simulation from pure noise (t = 1, then
``t_n = min(t_hat_n, t_{n-1})``, ``t_hat ~ p_D``, fresh noise at each step, gradients through the last step only,
``N = k mod 4 + 1`` for the k-th student update) gives ``x_hat``; the DMD2 loss of ``tmd.methods.common`` on it.
Fake score (``training_step_critic``): flow matching on the same kind of rollout, weighted as the code's x0
loss over ``sin^2 s``. For the first H iterations only sCM trains; then the student every 5th iteration.

Choices where the code's default does not fit (docs/methods.md, "rCM"):
- the tangent by central finite differences along the teacher velocity in RF time (``tangent: finite_difference``,
  delta 5e-3; the TMD paper's argument: it runs under FSDP and any attention kernel); ``tangent: jvp`` is the
  code's exact forward-mode JVP (``torch.func.jvp`` through the whole network, where that runs);
- losses are means over elements (the code sums per sample): the sCM : DMD ratio is kept, Adam does not see the scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tmd import flow
from tmd.methods import register
from tmd.methods.common import latent_shape, x0_of
from tmd.methods.distribution_matching import DistributionMatching
from tmd.methods.phased_dmd import OwnOptimizerConfig
from tmd.models.fastpath import attention_kernel
from tmd.rng import as_batch_random
from tmd.sampling import guided_velocity

TANGENTS = ("finite_difference", "jvp")


@dataclass
class RCMConfig(OwnOptimizerConfig):
    scm_weight: float = 100.0  # the code's loss_scale (lambda = 0.01 on the DMD term, P 4.1)
    dmd_weight: float = 1.0  # loss_scale_dmd
    tangent_warmup: int = 1000  # H: iterations of sCM only, with r = step / H (Wan config)
    tangent: str = "finite_difference"  # or "jvp"
    finite_difference: float = 5e-3  # RF-time step of the central difference
    tangent_c: float = 0.1  # g / (||g||_2 + c)
    logit_mean: float = 0.7  # p_G: logit t ~ N(0.7, 1.6^2) (the code's LogNormal in sigma = t / (1 - t))
    logit_std: float = 1.6
    max_rollout_steps: int = 4  # the DMD rollout's steps cycle 1..4
    sigma_max: float = 80.0  # the sampler's first time arctan(sigma_max)
    sample_times: tuple[float, ...] = (1.5, 1.4, 1.0)  # the sampler's later TrigFlow times (code and README)
    # DMD2 options fixed to rCM's recipe
    tau_shift: float = 5.0  # p_D: shift_5(U)
    gan_weight: float = 0.0
    student_input: str = "backward"
    multistep: str = "renoise"
    fake_score_target: str = "velocity"
    fake_score_lr_scale: float = 0.2  # 4e-7 / 2e-6
    adam_betas: tuple[float, float] = (0.0, 0.999)

    def __post_init__(self):
        super().__post_init__()
        if (self.gan_weight, self.student_input, self.multistep, self.fake_score_target, self.critics_on_generator_steps) != (
            0.0,
            "backward",
            "renoise",
            "velocity",
            False,
        ):
            raise ValueError(
                "rcm trains on its own re-noised rollout with a flow-matching fake score and no GAN: gan_weight must be 0, "
                "student_input 'backward', multistep 'renoise', fake_score_target 'velocity', critics_on_generator_steps false"
            )
        if self.tangent not in TANGENTS:
            raise ValueError(f"tangent must be one of {list(TANGENTS)}, got {self.tangent!r}")
        if not 0 < self.finite_difference < 0.1:
            raise ValueError(f"finite_difference must be in (0, 0.1), got {self.finite_difference}")
        if self.scm_weight < 0 or self.dmd_weight < 0 or self.scm_weight + self.dmd_weight == 0:
            raise ValueError(f"scm_weight and dmd_weight must be >= 0 and not both 0, got {self.scm_weight}, {self.dmd_weight}")
        if self.scm_weight == 0 and self.tangent_warmup > 0:
            raise ValueError("tangent_warmup trains sCM alone; with scm_weight 0 set tangent_warmup to 0")
        if self.tangent_warmup < 0 or self.max_rollout_steps < 1:
            raise ValueError(
                f"need tangent_warmup >= 0 and max_rollout_steps >= 1, got {self.tangent_warmup}, {self.max_rollout_steps}"
            )
        if min(self.tangent_c, self.logit_std, self.sigma_max) <= 0:
            raise ValueError("tangent_c, logit_std and sigma_max must be > 0")
        sample_times = (math.atan(self.sigma_max), *self.sample_times)
        if any(not 0 < b < a for a, b in zip(sample_times, sample_times[1:])):
            raise ValueError(f"sample_times must decrease inside (0, arctan(sigma_max)), got {list(self.sample_times)}")


# -- TrigFlow <-> rectified flow ------------------------------------------------------------------


def trig_time(t: Tensor) -> Tensor:
    """``s = arctan(t / (1 - t))`` (``atan2`` keeps t = 1 at pi / 2)."""
    return torch.atan2(t, 1 - t)


def rf_time(s: Tensor) -> Tensor:
    """``t = sin s / (cos s + sin s)``."""
    return torch.sin(s) / (torch.cos(s) + torch.sin(s))


def trig_norm(t: Tensor | float, like: Tensor) -> Tensor:
    """``N = sqrt(t^2 + (1 - t)^2) = 1 / (cos s + sin s)``, broadcast against ``like``."""
    t = flow.expand_time(t, like)
    return (t.square() + (1 - t).square()).sqrt()


def trigflow_f(x_t: Tensor, v: Tensor, t: Tensor | float) -> Tensor:
    """TrigFlow's ``F = (cos s z_s - x0) / sin s`` of a velocity ``v`` at ``(x_t, t)``: ``((1 - 2t) / N) x_t + N v``."""
    n = trig_norm(t, x_t)
    return (1 - 2 * flow.expand_time(t, x_t)) / n * x_t + n * v


def velocity_from_f(x_t: Tensor, f: Tensor, t: Tensor | float) -> Tensor:
    """Inverse of :func:`trigflow_f`."""
    n = trig_norm(t, x_t)
    return (f - (1 - 2 * flow.expand_time(t, x_t)) / n * x_t) / n


def wrapped_f(model: nn.Module, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
    """``F_theta`` in float64 (the code's wrapper runs in FP64); the network sees ``x_t`` in its own dtype."""
    return trigflow_f(x_t.double(), model.velocity(x_t, t, cond).double(), t.double())


def scm_tangent(
    model: nn.Module,
    x_t: Tensor,
    t: Tensor,
    cond: Tensor,
    v_teacher: Tensor,
    kind: str = "finite_difference",
    delta: float = 5e-3,
) -> Tensor:
    """``tau = cos s sin s dF_theta/ds = t (1 - t) (d/dt + v_T . grad_x) F_theta`` at ``(x_t, t)``, without gradients:
    a central difference of step ``delta`` in RF time along the teacher velocity (one-sided where it would leave
    [0, 1]), or the exact forward-mode JVP."""
    weight = flow.expand_time(t * (1 - t), x_t).double()
    v = v_teacher.double()
    with torch.no_grad():
        if kind == "jvp":

            def f(x, time):
                return wrapped_f(model, x, time, cond)

            # the unfused attention kernel: the fused SDPA kernels have no forward-mode derivative in torch
            with attention_kernel("math"):
                _, derivative = torch.func.jvp(f, (x_t, t), (v.to(x_t.dtype), torch.ones_like(t)))
            return weight * derivative
        up, down = (t + delta).clamp(max=1.0), (t - delta).clamp(min=0.0)

        def f_at(time):
            x = (x_t.double() + flow.expand_time(time - t, v) * v).to(x_t.dtype)
            return wrapped_f(model, x, time, cond)

        return weight * (f_at(up) - f_at(down)) / flow.expand_time(up - down, v)


def scm_target(f_student: Tensor, f_teacher: Tensor, tangent: Tensor, x_t: Tensor, t: Tensor, ratio: float) -> Tensor:
    """The code's ``g = -cos s sqrt(1 - r^2 sin^2 s) (F_theta^- - F_T) - (r cos s sin s z_s + tau)`` (float64)."""
    n = trig_norm(t.double(), x_t)
    cos, sin = (1 - flow.expand_time(t.double(), x_t)) / n, flow.expand_time(t.double(), x_t) / n
    z = x_t.double() / n
    return -cos * (1 - ratio**2 * sin**2).sqrt() * (f_student - f_teacher) - (ratio * cos * sin * z + tangent)


def normalised(g: Tensor, c: float) -> Tensor:
    """``g / (||g||_2 + c)`` per sample, in float64."""
    g = g.double()
    return g / flow.expand_time(torch.linalg.vector_norm(g.flatten(1), dim=1) + c, g)


def rcm_sample_times(steps: int, sigma_max: float = 80.0, sample_times: tuple[float, ...] = (1.5, 1.4, 1.0)) -> Tensor:
    """The sampler's RF times: TrigFlow ``[arctan sigma_max, *sample_times[: steps - 1], 0]`` converted (float64)."""
    if not 1 <= steps <= len(sample_times) + 1:
        raise ValueError(f"rcm samples 1 to {len(sample_times) + 1} steps (sample_times has {len(sample_times)}), got {steps}")
    s = torch.tensor([math.atan(sigma_max), *sample_times[: steps - 1], 0.0], dtype=torch.float64)
    return rf_time(s)


@register("rcm")
class RCM(DistributionMatching):
    Config = RCMConfig
    sample_steps = (1, 2, 4)

    def optimizer_overrides(self):
        return self.cfg.optimizer_overrides()

    @staticmethod
    @torch.no_grad()
    def sample(
        generator_module: nn.Module,
        noise: Tensor,
        cond: Tensor,
        steps: int,
        rng: torch.Generator | None = None,
        sigma_max: float = 80.0,
        sample_times: tuple[float, ...] = (1.5, 1.4, 1.0),
    ) -> Tensor:
        """The official sampler: from ``x = t_0 noise``, ``x <- (1 - t') x0(x, t) + t' eps_fresh`` on
        :func:`rcm_sample_times`; no CFG, one forward per step."""
        times = rcm_sample_times(steps, sigma_max, sample_times).to(noise.device)
        x = times[0].float() * noise.float()
        for t, t_next in zip(times[:-1].float(), times[1:].float()):
            x0 = x0_of(generator_module, x, t.expand(x.shape[0]), cond).float()
            x = x0 if t_next == 0 else flow.interpolate(x0, as_batch_random(rng).randn(x.shape, x.device), t_next)
        return x

    @classmethod
    def runs_in_stock_pipeline(cls, cfg) -> bool:
        return False  # fresh noise at every step, on rCM's own times

    @classmethod
    def sampler(cls, cfg, module, outer, inner, seed, guidance, shift):
        cls.check_steps(outer, inner)
        return lambda noise, cond, neg: cls.sample(
            module, noise, cond, outer, torch.Generator().manual_seed(seed), cfg.sigma_max, tuple(cfg.sample_times)
        )

    # -- schedule --------------------------------------------------------------------------------

    def student_turn(self, step: int) -> bool:
        """The code's ``is_student_phase``: every iteration without DMD or during warm-up, else every k-th."""
        h = self.cfg.tangent_warmup
        return self.cfg.dmd_weight == 0 or step < h or (step - h) % self.cfg.generator_every == 0

    def student_update_index(self, step: int) -> int:
        """The code's ``get_effective_iteration``: the 0-based index of the student update at ``step``, or on a
        fake-score iteration of the latest one."""
        h = self.cfg.tangent_warmup
        return step if self.cfg.dmd_weight == 0 or step < h else h + (step - h) // self.cfg.generator_every

    # -- losses ----------------------------------------------------------------------------------

    def scm_loss(self, batch: dict, step: int) -> tuple[Tensor, dict[str, float]]:
        if "x" not in batch:
            raise ValueError("rcm's sCM term noises data latents 'x', which this batch lacks (set scm_weight=0 for DMD alone)")
        cfg, x, cond = self.cfg, batch["x"], batch["cond"]
        t = torch.sigmoid(self.rng.randn((x.shape[0],), x.device) * cfg.logit_std + cfg.logit_mean)
        x_t = flow.interpolate(x, self._randn(x.shape, x.device), t)
        with torch.no_grad():
            v_teacher = guided_velocity(self.teacher, x_t, t, cond, batch["neg_cond"], cfg.guidance)
            f_teacher = trigflow_f(x_t.double(), v_teacher.double(), t.double())
            tangent = scm_tangent(self.student, x_t, t, cond, v_teacher, cfg.tangent, cfg.finite_difference)
        f_student = wrapped_f(self.student, x_t, t, cond)
        ratio = 1.0 if cfg.tangent_warmup == 0 else min(1.0, step / cfg.tangent_warmup)
        g = scm_target(f_student.detach(), f_teacher, tangent, x_t, t, ratio)
        # a sample whose target or output is not finite is dropped, as the code does
        finite = (g.flatten(1).isfinite().all(1) & f_student.flatten(1).isfinite().all(1)).reshape(-1, *([1] * (g.ndim - 1)))
        g_hat = normalised(torch.where(finite, g, 0.0), cfg.tangent_c)
        f_student = torch.where(finite, f_student, 0.0)
        loss = cfg.scm_weight * (f_student - f_student.detach() - g_hat).pow(2).mean()
        return loss, {"tangent_ratio": ratio, "scm_g_norm": float(torch.linalg.vector_norm(g.flatten(1), dim=1).mean())}

    def rollout(self, cond: Tensor, shape: tuple[int, ...], steps: int, gradients: bool) -> Tensor:
        """The code's ``backward_simulation``: x0 after ``steps`` student steps from noise at t = 1, re-noised at
        ``t_n = min(t_hat, t_{n-1})``, ``t_hat ~ p_D``; with ``gradients``, the last step carries them."""
        n, device = shape[0], cond.device
        times = [torch.ones(n, device=device)]
        for _ in range(steps - 1):
            times.append(torch.minimum(flow.sample_shifted_uniform(n, self.cfg.tau_shift, self.rng, device), times[-1]))
        x = self._randn(shape, device)
        for k, t in enumerate(times):
            last = k == steps - 1
            with torch.set_grad_enabled(gradients and last):
                x0 = x0_of(self.student, x, t, cond)
            if not last:
                x = flow.interpolate(x0, self._randn(shape, device), times[k + 1])
        return x0

    def critic_losses(self, x_fake: Tensor, batch: dict, update) -> dict[str, float]:
        """The code's ``sum ||x0 - x0_fake||^2 / sin^2 s`` is ``N^2 ||v_fake - (eps - x0)||^2``: weighted flow matching."""
        t, eps, x_t = self._noised(x_fake)
        error = self.fake_score.velocity(x_t, t, batch["cond"]).float() - flow.velocity_target(x_fake, eps).float()
        update("fake_score", (trig_norm(t, error).square() * error.pow(2)).mean())
        return {}

    def training_step(self, batch, step, update):
        cfg, cond = self.cfg, batch["cond"]
        shape, dmd_on = latent_shape(batch), step >= cfg.tangent_warmup and cfg.dmd_weight > 0
        if not self.student_turn(step):
            critic_updates = step - self.student_update_index(step) - 1
            with torch.no_grad():
                x_fake = self.rollout(cond, shape, critic_updates % cfg.max_rollout_steps + 1, gradients=False)
            return self.critic_losses(x_fake, batch, update)
        terms, metrics = {}, {}
        if cfg.scm_weight > 0:
            terms["scm"], metrics = self.scm_loss(batch, step)
        if dmd_on:
            steps = self.student_update_index(step) % cfg.max_rollout_steps + 1
            x_hat = self.rollout(cond, shape, steps, gradients=True)
            # DMD2's loss at t ~ p_D (no GAN): half the code's squared error, hence the 2
            terms["dmd"] = 2 * cfg.dmd_weight * self.generator_loss(x_hat, batch)[0]
            metrics["rollout_steps"] = steps
        if terms:
            update("generator", sum(terms.values()), terms)
        return metrics
