"""The two small interfaces the methods and samplers are written against.

Keeping methods model-agnostic lets the same loss run on a Wan transformer and on a tiny MLP over a
closed-form mixture-of-Gaussians world, where the tests can check it moves samples to the right place.
``cond`` is whatever conditions the model (text embeddings for Wan, class vectors for the MLP); the
unconditional branch of classifier-free guidance is the same model given the negative condition.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class VelocityModel(Protocol):
    """A flow model: teacher, fake score, or a plain few-step generator."""

    def velocity(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor: ...


@runtime_checkable
class TransitionModel(Protocol):
    """A TMD student: a backbone run once per outer step, a head run once per inner step.

    ``head`` predicts ``y_hat``, the estimate of the transition target ``y = x1 - x`` (the quantity a
    flow teacher's velocity estimates), from the inner state ``y_s`` at inner time ``s`` towards ``r``.
    """

    def backbone(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Any: ...

    def head(self, y_s: Tensor, s: Tensor, r: Tensor, features: Any) -> Tensor: ...
