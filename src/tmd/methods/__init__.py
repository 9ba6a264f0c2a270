"""Distillation methods, one file each, registered by name.

A method is a loss over shared model parts (teacher, student, fake score, discriminator) that the
trainer in ``tmd.train.loop`` runs. Adding a method is one new file whose class subclasses
``tmd.methods.base.Method`` (its docstring is the interface) plus one line in ``_BUILTIN``.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import Tensor

from tmd import flow
from tmd.config import register_method_config
from tmd.sampling import sample_few_step

METHODS: dict[str, type] = {}
"""Method name -> method class (its ``Config`` attribute is the dataclass of its options)."""

_BUILTIN = (
    "flow_matching",
    "tmd",
    "dmd2",
    "decoupled_dmd",
    "phased_dmd",
    "tdm",
    "mdt_dist",
    "meanflow",
    "linvideo",
    "rcm",
    "anyflow",
)


def register(name: str):
    """Class decorator: register a method and its ``Config`` dataclass under ``name``."""

    def wrap(cls: type) -> type:
        register_method_config(name, cls.Config)
        METHODS[name] = cls
        return cls

    return wrap


def get_method(name: str) -> type:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def sample_few_step_student(
    model, method: dict[str, Any] | None, noise: Tensor, cond: Tensor, steps: int, seed: int, shift: float | None
) -> Tensor:
    """A plain few-step generator sampled as the method that trained it samples (rCM: fresh noise at each step on
    its own times; DMD2-v: Eq. 18 steps), ``method`` being the run's ``{"name", "config"}`` that student folders
    record. Without a record (folders from before it was kept) it gets DMD2-v's deterministic steps. ``shift``
    (``--shift``) replaces the run's ``outer_shift`` where the method has one."""
    if method is None or method.get("name") not in METHODS:
        rng = torch.Generator(noise.device).manual_seed(seed)
        return sample_few_step(model, noise, cond, steps, rng, shift=flow.OUTER_SHIFT if shift is None else shift)
    cls = METHODS[method["name"]]
    config = dict(method["config"])
    if shift is not None and "outer_shift" in config:
        config["outer_shift"] = shift
    return cls.sampler(cls.Config(**config), model, steps, None, seed, 1.0, shift)(noise, cond, None)


for _module in _BUILTIN:
    importlib.import_module(f"tmd.methods.{_module}")
