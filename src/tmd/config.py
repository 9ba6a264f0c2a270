"""Typed run configs: dataclasses loaded from YAML plus ``key=value`` overrides, checked on load.

A typo in a key or a wrong type must fail before hours of training, not silently fall back to a
default, so every key is checked against the dataclass it lands in and errors name the full dotted
key, where it came from (file or override), the expected type and the allowed keys.

Sections typed by a registry: ``RunConfig.method`` is typed by ``method_name`` and ``RunConfig.data`` by
``data_kind``. A method (or data source) module declares its options once::

    @dataclass
    class TMDStage1Config:
        head_blocks: int = 5
        teacher: str = existing_path("teacher/")    # checked to exist when loaded from a file

    register_method_config("tmd_stage1", TMDStage1Config)

and ``method.head_blocks=3`` is then validated against it. The same pattern with
``register_data_config`` adds a data kind. Paths are resolved against the working directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
import yaml

from tmd.errors import ConfigError
from tmd.files import output_dir_problem

__all__ = [
    "ConfigError",
    "DATA_CONFIGS",
    "LoRAConfig",
    "METHOD_CONFIGS",
    "RunConfig",
    "TrainConfig",
    "existing_path",
    "from_dict",
    "load_config",
    "output_dir",
    "register_data_config",
    "register_method_config",
    "save_config",
    "to_dict",
]


METHOD_CONFIGS: dict[str, type] = {}
"""Method name -> dataclass of its options (the ``method:`` section)."""

DATA_CONFIGS: dict[str, type] = {}
"""Data kind -> dataclass of its options (the ``data:`` section)."""

PLUGIN_MODULES = ("tmd.methods", "tmd.world.data", "tmd.data.prepare")
"""Imported once when a name is not registered yet: importing them registers the built-in configs."""


def _register(registry: dict[str, type], what: str, name: str, cls: type) -> type:
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{what} config for {name!r} must be a dataclass, got {cls!r}")
    if registry.get(name, cls) is not cls:
        raise ValueError(f"{what} config {name!r} is already registered as {registry[name].__qualname__}")
    registry[name] = cls
    return cls


def register_method_config(name: str, cls: type) -> type:
    return _register(METHOD_CONFIGS, "method", name, cls)


def register_data_config(kind: str, cls: type) -> type:
    return _register(DATA_CONFIGS, "data", kind, cls)


def _lookup(registry: dict[str, type], name: str) -> type | None:
    if name not in registry:
        for module in PLUGIN_MODULES:
            importlib.import_module(module)
    return registry.get(name)


def existing_path(default: Any = dataclasses.MISSING) -> Any:
    """A path field that must exist when the config is loaded (None skips the check)."""
    return field(default=default, metadata={"path": "exists"})


def output_dir(default: Any = dataclasses.MISSING) -> Any:
    """A directory field that must be creatable: it, or its nearest existing parent, a writable dir."""
    return field(default=default, metadata={"path": "output_dir"})


# ----------------------------------------------------------------------------------------------
# The run config every method shares.


WAN_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")
"""The Wan blocks' attention (self and cross) and FFN linears, by peft's suffix match."""


@dataclass
class LoRAConfig:
    """peft LoRA on the Wan transformers of the named state modules; rank 0 trains full weights."""

    rank: int = 0
    alpha: Optional[float] = None
    """LoRA alpha (the update is scaled by alpha / rank); null means alpha = rank."""
    target_modules: list[str] = field(default_factory=lambda: list(WAN_LORA_TARGETS))
    modules: Optional[list[str]] = None
    """State modules (``method.state_modules()`` names) whose Wan transformers get adapters; null means the
    student and, where the method has one, the fake score. The rest of each module (TMD's inner block,
    fusion and gap embedder) and every other module (the discriminator) train fully."""

    def __post_init__(self) -> None:
        _check(self.rank >= 0, f"rank must be >= 0 (0 disables LoRA), got {self.rank}")
        _check(self.alpha is None or self.alpha > 0, f"alpha must be > 0 or null, got {self.alpha}")
        _check(bool(self.target_modules), "target_modules must name at least one module")
        _check(self.modules is None or bool(self.modules), "modules must name at least one state module, or be null")

    @property
    def enabled(self) -> bool:
        return self.rank > 0


@dataclass
class TrainConfig:
    """Optimisation, logging and checkpointing options shared by every method."""

    steps: int = 1000
    batch_size: int = 64
    grad_accum: int = 1
    """Micro-batches per step: ``batch_size`` stays the global batch, each micro-batch holds
    ``batch_size / (grad_accum x processes)`` rows, and every group steps once after the last one."""
    lr: float = 1e-4
    lr_groups: dict[str, float] = field(default_factory=dict)
    """Per parameter group lr, overriding ``lr`` (e.g. ``{fake_score: 2e-5}``)."""
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    """After warm-up: constant, or a cosine / linear decay towards 0 at ``steps`` (per training step)."""
    warmup_steps: int = 0
    """Linear warm-up from ``lr / warmup_steps`` to ``lr`` over the first training steps."""
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: Optional[float] = 1.0
    """Max grad norm per group; null disables clipping (the norm is still logged)."""
    ema_decay: float = 0.999
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    eval_every: Optional[int] = None
    """Score the EMA generator on the world's benchmark every this many steps (``eval/*`` in metrics.jsonl);
    0 or null: never. World data only."""
    eval_videos: int = 24
    """Prompts in that fixed evaluation set (evenly spread over the world's 72, one noise seed)."""
    sample_every: int = 0
    """Write sample videos of the EMA generator every this many steps (and before the first, after the last)
    to ``RUN/samples/step_NNNNNNN/``; 0: never. Any data kind, under torchrun too (``tmd.train.samples``)."""
    sample_prompts: Optional[Union[str, list[str]]] = None
    """The prompts sampled: a file (one per line, blank lines skipped) or a list; null on the world: 4 of its
    72 prompts."""
    sample_seed: int = 0
    """Seed of the samples' fixed noise (a generator of its own: no training randomness is drawn)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16 autocasts the method's forward passes; parameters and optimizer states stay fp32."""
    activation_checkpointing: bool = False
    """Read by methods when they build their models; the loop itself does not need it."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    device: str = "auto"
    out_dir: str = output_dir("runs/default")
    progress: bool = True
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "tmd"

    def __post_init__(self) -> None:
        _check(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _check(self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}")
        _check(
            self.batch_size % self.grad_accum == 0,
            f"batch_size={self.batch_size} must be a multiple of grad_accum={self.grad_accum}",
        )
        _check(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        for group, lr in self.lr_groups.items():
            _check(lr > 0, f"lr_groups.{group} must be > 0, got {lr}")
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"betas must be two numbers in [0, 1), got {self.betas}"
        )
        _check(self.grad_clip is None or self.grad_clip > 0, f"grad_clip must be > 0 or null, got {self.grad_clip}")
        _check(0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1), got {self.ema_decay}")
        for name in ("log_every", "checkpoint_every", "keep_checkpoints"):
            _check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        _check(self.eval_every is None or self.eval_every >= 0, f"eval_every must be >= 0 or null, got {self.eval_every}")
        _check(self.sample_every >= 0, f"sample_every must be >= 0 (0: no samples), got {self.sample_every}")
        if self.sample_every:
            self.sample_prompt_list()
        _check(1 <= self.eval_videos <= 72, f"eval_videos must be in [1, 72] (the world's prompts), got {self.eval_videos}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError as e:
                raise ValueError(f"device must be 'auto' or a torch device such as 'cpu', 'cuda:0', got {self.device!r}") from e

    def sample_prompt_list(self) -> list[str] | None:
        """``sample_prompts`` as a list (read from its file), checked non-empty; None when not set."""
        prompts = self.sample_prompts
        if isinstance(prompts, str):
            path = Path(prompts).expanduser()
            _check(path.is_file(), f"sample_prompts: prompt file {prompts!r} does not exist")
            prompts = path.read_text().splitlines()
            _check(any(p.strip() for p in prompts), f"sample_prompts: prompt file {str(path)!r} holds no prompts")
        if prompts is not None:
            prompts = [p.strip() for p in prompts if p.strip()]
            _check(bool(prompts), "sample_prompts: the list holds no prompts")
        return prompts


@dataclass
class RunConfig:
    """One training run: which method and data, with what options, trained how."""

    method_name: str
    data_kind: str
    method: Any = field(default=None, metadata={"registry": "method"})
    data: Any = field(default=None, metadata={"registry": "data"})
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        self.method = _resolve_section(METHOD_CONFIGS, "method", self.method_name, self.method)
        self.data = _resolve_section(DATA_CONFIGS, "data", self.data_kind, self.data)


_REGISTRIES = {"method": (METHOD_CONFIGS, "method_name"), "data": (DATA_CONFIGS, "data_kind")}


def _registered_class(section: str, name: str) -> type:
    registry, selector = _REGISTRIES[section]
    cls = _lookup(registry, name)
    if cls is None:
        raise ConfigError(
            f"{selector} {name!r} is not registered; registered: {', '.join(sorted(registry)) or 'none'} "
            f"(the module defining it must call register_{section}_config)"
        )
    return cls


def _resolve_section(registry: dict[str, type], section: str, name: str, value: Any) -> Any:
    cls = _registered_class(section, name)
    if value is None or isinstance(value, dict):
        return from_dict(cls, value or {}, source=f"{section} {name!r}", prefix=section)
    if not isinstance(value, cls):
        raise ValueError(f"{section} must be a {cls.__qualname__} for {name!r}, got {type(value).__qualname__}")
    return value


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


# ----------------------------------------------------------------------------------------------
# Loading, coercion and saving.


@dataclass
class _Context:
    """Where values come from, so errors can point at the file or at the override that set a key."""

    source: str
    overrides: dict[str, str] = field(default_factory=dict)

    def origin(self, key: str) -> str:
        key = re.sub(r"\[\d+\]", "", key)
        parts = key.split(".")
        for i in range(len(parts), 0, -1):
            text = self.overrides.get(".".join(parts[:i]))
            if text is not None:
                return f"override {text!r}"
        for override, text in self.overrides.items():  # a section set through one of its keys
            if override.startswith(f"{key}."):
                return f"override {text!r}"
        return self.source

    def describe(self) -> str:
        if not self.overrides:
            return self.source
        return f"{self.source} with overrides {' '.join(self.overrides.values())}"


def shipped_configs() -> Path:
    """The folder of the configs that ship with the package (run configs and study files), as installed."""
    return Path(str(resources.files("tmd") / "configs"))


def find_config(path: str | os.PathLike) -> Path:
    """``path`` when it is a file; else, for a bare name (``world_dmd2.yaml``), the shipped config of that name,
    so a config is found from any directory and in a wheel install; else a one-line error listing them."""
    path = Path(path)
    if path.is_file():
        return path
    shipped = shipped_configs() / path.name
    if path.parent == Path(".") and shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.name for p in shipped_configs().glob("*.yaml")))
    raise ConfigError(f"config file {str(path)!r} does not exist (shipped configs, found by name: {names})")


def load_config(cls: type, path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Load ``cls`` from a YAML file (or from defaults when ``path`` is None), then apply overrides.

    Overrides are ``dotted.key=value`` strings; values are parsed as YAML (``1e-4``, ``[0.9, 0.99]``,
    ``null``, ``true``) and then checked against the field type like the file's values.
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if path.is_dir():
            found = sorted(str(p) for p in path.glob("*.y*ml"))
            hint = (
                f": one of {', '.join(found[:6])}{', ...' if len(found) > 6 else ''}" if found else " (it holds no .yaml files)"
            )
            raise ConfigError(f"config file {str(path)!r} is a directory; give a YAML file{hint}")
        path = find_config(path)
        source = str(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(loaded).__name__}")
        data = loaded or {}
    ctx = _Context(source)
    for text in overrides:
        key, value = _parse_override(text)
        _set_dotted(data, key, value, text)
        ctx.overrides[key] = text
    return _build(cls, data, "", ctx)


def from_dict(cls: type, data: dict[str, Any], source: str = "<dict>", prefix: str = "") -> Any:
    """Build and validate ``cls`` from plain data (as parsed from YAML); ``source`` names it in errors."""
    return _build(cls, data, prefix, _Context(source))


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain YAML-safe data (tuples become lists) that ``from_dict`` turns back into an equal config."""
    return _plain(dataclasses.asdict(cfg))


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} must look like dotted.key=value, e.g. train.lr=1e-4")
    try:
        return key, yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {e}") from e


def _set_dotted(data: dict[str, Any], key: str, value: Any, text: str) -> None:
    *parents, last = key.split(".")
    node = data
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            section = ".".join(parents[: i + 1])
            raise ConfigError(f"override {text!r}: '{section}' is a value, not a section")
        node = child
    node[last] = value


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _build(cls: type, data: Any, prefix: str, ctx: _Context) -> Any:
    where = f"section '{prefix}'" if prefix else "the top level"
    if not isinstance(data, dict):
        raise ConfigError(f"{ctx.origin(prefix)}: {where} must be a mapping, got {type(data).__name__} {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = _join(prefix, str(unknown[0]))
        close = difflib.get_close_matches(str(unknown[0]), fields, n=1)
        hint = f" (did you mean '{_join(prefix, close[0])}'?)" if close else ""
        raise ConfigError(f"{ctx.origin(key)}: unknown key '{key}'{hint}; allowed keys in {where}: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    # Registry-typed sections last: their type depends on the selector field parsed before them.
    for name, f in sorted(fields.items(), key=lambda item: "registry" in item[1].metadata):
        key = _join(prefix, name)
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{ctx.describe()}: missing required key '{key}' ({_type_name(hints[name])})")
            continue
        value = data[name]
        if "registry" in f.metadata:
            section = f.metadata["registry"]
            selector = _REGISTRIES[section][1]
            try:
                tp = _registered_class(section, kwargs[selector])
            except ConfigError as e:
                raise ConfigError(f"{ctx.origin(_join(prefix, selector))}: {e}") from None
            value = {} if value is None else value
        else:
            tp = hints[name]
        kwargs[name] = _coerce(value, tp, key, ctx)
        if "path" in f.metadata and kwargs[name] is not None:
            _check_path(kwargs[name], f.metadata["path"], key, ctx)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{ctx.describe()}: invalid {where}: {e}") from e


def _fail(value: Any, tp: Any, key: str, ctx: _Context, hint: str = "") -> typing.NoReturn:
    raise ConfigError(f"{ctx.origin(key)}: key '{key}' expects {_type_name(tp)}, got {type(value).__name__} {value!r}{hint}")


def _coerce(value: Any, tp: Any, key: str, ctx: _Context) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else _build(tp, value, key, ctx)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, key, ctx)
            except ConfigError:
                pass
        _fail(value, tp, key, ctx)
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        _fail(value, tp, key, ctx)
    if tp is bool:
        return value if isinstance(value, bool) else _fail(value, tp, key, ctx)
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _fail(value, tp, key, ctx)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        _fail(value, tp, key, ctx)
    if tp is str:
        if isinstance(value, str):
            return value
        _fail(value, tp, key, ctx, " (quote it to pass a number as text)" if isinstance(value, (int, float)) else "")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            _fail(value, tp, key, ctx)
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                _fail(value, tp, key, ctx)
            items = [_coerce(v, a, f"{key}[{i}]", ctx) for i, (v, a) in enumerate(zip(value, args))]
        else:
            item_type = args[0] if args else Any
            items = [_coerce(v, item_type, f"{key}[{i}]", ctx) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            _fail(value, tp, key, ctx)
        key_type, value_type = args or (Any, Any)
        return {_coerce(k, key_type, key, ctx): _coerce(v, value_type, f"{key}.{k}", ctx) for k, v in value.items()}
    if isinstance(tp, type):
        return value if isinstance(value, tp) else _fail(value, tp, key, ctx)
    raise TypeError(f"config key '{key}': unsupported field type {tp!r}")


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return "any value"
    if origin in (Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return f"a list of {len(args)} values ({', '.join(_type_name(a) for a in args)})"
    if origin is list:
        return f"a list of {_type_name(args[0]) if args else 'values'}"
    if origin is dict:
        return f"a mapping of {_type_name(args[0])} to {_type_name(args[1])}" if args else "a mapping"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return getattr(tp, "__name__", repr(tp))


def _check_path(value: str, kind: str, key: str, ctx: _Context) -> None:
    path = Path(value).expanduser()
    relative = "" if path.is_absolute() else f" (relative to the working directory {os.getcwd()})"
    if kind == "exists":
        if not path.exists():
            raise ConfigError(f"{ctx.origin(key)}: key '{key}': path '{value}' does not exist{relative}")
        return
    problem = output_dir_problem(path)
    if problem is not None:
        raise ConfigError(f"{ctx.origin(key)}: key '{key}': {problem}{relative}")
