"""Distillation methods, one file each, registered by name.

A method is a loss over shared model parts (teacher, student, fake score, discriminator) that the
trainer in ``tmd.train.loop`` runs. Adding a method is one new file whose class subclasses
``tmd.methods.base.Method`` (its docstring is the interface) plus one line in ``_BUILTIN``.
"""

from __future__ import annotations

import importlib

from tmd.config import register_method_config

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


for _module in _BUILTIN:
    importlib.import_module(f"tmd.methods.{_module}")
