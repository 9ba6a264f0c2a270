"""The layout of a student folder and its ``config.json``, read and checked.

A TMD student folder holds ``config.json`` (kind ``"tmd_student"``, the split, the transformer config
and the teacher it came from), ``transformer/`` (backbone + head, written by diffusers'
``save_pretrained`` so the keys are the teacher's diffusers names and any Wan tool can read them) and
``tmd_parts.safetensors`` (the parameters TMD adds). A plain few-step generator (DMD2, ...) is a
Wan transformer, so its folder is ``config.json`` (kind ``"few_step"``) plus ``transformer/``; an AnyFlow
student's is the same with kind ``"anyflow"`` and diffusers' ``AnyFlowTransformer3DModel`` in ``transformer/``.
``tmd.models.export`` writes them; ``TMDStudent.from_pretrained`` and ``tmd generate`` read them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tmd.files import check_safetensors

CONFIG_FILE = "config.json"
TRANSFORMER_DIR = "transformer"
PARTS_FILE = "tmd_parts.safetensors"
TMD_PARTS = ("inner_block", "fusion", "gap_embedder")
"""The TMDStudent submodules that are not part of the teacher's transformer."""
STUDENT_KINDS = ("tmd_student", "few_step", "anyflow")
STUDENT_SPLIT_KEYS = ("head_blocks", "fusion", "inner_velocity", "transition_target")
"""TMD student settings a run's method config records and a student must be rebuilt with."""
SPLIT_DEFAULTS_OF_OLD_EXPORTS = {"inner_velocity": "implied", "transition_target": "difference"}
"""What runs and folders written before a setting was recorded were trained with."""
ANYFLOW_KEYS = ("gate_value", "deltatime_type")
"""An AnyFlow student's settings that a run's method config records (``tmd.models.anyflow``)."""


def read_student_config(path: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a student folder, checked; errors say what the folder looks like instead."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"student folder {path} does not exist")
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        pipeline_root = (path / "model_index.json").is_file()
        hint = " (it looks like a diffusers pipeline root: load it as a teacher)" if pipeline_root else ""
        raise FileNotFoundError(f"{path} is not a student folder: no {CONFIG_FILE}{hint}")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file} is not valid JSON: {e}") from None
    kind = config.get("kind") if isinstance(config, dict) else None
    if kind not in STUDENT_KINDS:
        raise ValueError(f"{config_file} has kind {kind!r}; a student folder has kind one of {list(STUDENT_KINDS)}")
    required = [TRANSFORMER_DIR] + ([PARTS_FILE] if kind == "tmd_student" else [])
    missing = [name for name in required if not (path / name).exists()]
    if missing:
        raise FileNotFoundError(f"student folder {path} is incomplete: missing {missing}")
    if kind == "tmd_student":
        check_safetensors(path / PARTS_FILE)
    return config


def is_student_folder(path: str | Path) -> bool:
    config_file = Path(path) / CONFIG_FILE
    if not config_file.is_file():
        return False
    try:
        return json.loads(config_file.read_text()).get("kind") in STUDENT_KINDS
    except (json.JSONDecodeError, AttributeError):
        return False


# ----------------------------------------------------------------------------------------------
# Teacher folders: what a diffusers Wan pipeline root (or transformer folder) is, and what tmd can represent.

INDEX_FILE = "model_index.json"
WAN_COMPONENTS = ("transformer", "transformer_2", "vae", "text_encoder", "tokenizer", "scheduler", "tmd_parts")
"""``model_index.json`` components tmd knows: WanPipeline's (Wan2.1, Wan2.2) and TMDPipeline's ``tmd_parts``."""
IMAGE_COMPONENTS = ("image_encoder", "image_processor")
FAMILIES = ("wan2.1", "wan2.2-ti2v", "wan2.2-a14b")
"""``wan2.1``: one transformer, one timestep per sample; ``wan2.2-ti2v``: TI2V-5B (48 latent channels, the Wan2.2
VAE, per-token timesteps); ``wan2.2-a14b``: two experts switched at ``boundary_ratio``."""
TI2V_CHANNELS = 48
IMAGE_TO_VIDEO = "image-to-video is not supported yet: tmd distils and samples Wan text-to-video"


@dataclass(frozen=True)
class WanFolder:
    """What :func:`check_wan_folder` found: the family, the transformer folders and the switch time."""

    family: str
    transformers: tuple[Path, ...]
    """``transformer`` (the high-noise expert of an A14B) and, for an A14B, ``transformer_2`` (low noise)."""
    boundary_ratio: float | None = None
    expand_timesteps: bool = False


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def _transformer_dirs(path: Path) -> tuple[dict[str, Any], tuple[Path, ...]]:
    """The pipeline index (empty for a bare transformer folder) and its transformer folders."""
    index_file = path / INDEX_FILE
    if not index_file.is_file():
        return {}, ((path / TRANSFORMER_DIR,) if (path / TRANSFORMER_DIR / CONFIG_FILE).is_file() else (path,))
    index = _read_json(index_file)
    components = {k: v for k, v in index.items() if not k.startswith("_") and isinstance(v, list)}
    present = {k for k, v in components.items() if v[0] is not None}
    image = sorted(present & set(IMAGE_COMPONENTS))
    if image or index.get("_class_name", "").startswith("WanImageToVideo"):
        raise ValueError(f"{index_file} holds {image or 'an image-to-video pipeline'}: {IMAGE_TO_VIDEO}")
    unknown = sorted(present - set(WAN_COMPONENTS) - set(IMAGE_COMPONENTS))
    if unknown:
        raise ValueError(f"{index_file} has components tmd cannot represent: {unknown} (it knows {list(WAN_COMPONENTS)})")
    dirs = tuple(path / name for name in ("transformer", "transformer_2") if name in present)
    return index, dirs


def check_wan_folder(path: str | Path, experts: int | None = 1, family: str | None = None, purpose: str = "") -> WanFolder:
    """The one check every loader of a Wan folder runs before reading weights; errors are one line.

    ``path`` is a pipeline root or a transformer folder. Refused: image encoders, unknown ``model_index.json``
    components, a two-expert folder where ``experts=1`` (``purpose`` says what needed one transformer), and a
    folder of another family than ``family`` when given.
    """
    path = Path(path)
    if family is not None and family not in FAMILIES:
        raise ValueError(f"unknown Wan family {family!r}; one of {list(FAMILIES)}")
    index, dirs = _transformer_dirs(path)
    boundary = index.get("boundary_ratio")
    expand = bool(index.get("expand_timesteps", False))
    if len(dirs) == 2 and boundary is None:
        raise ValueError(f"{path / INDEX_FILE} has transformer and transformer_2 but no boundary_ratio: which runs when?")
    if len(dirs) == 1 and boundary is not None:
        raise ValueError(f"{path / INDEX_FILE} sets boundary_ratio={boundary} but has one transformer")
    if boundary is not None and not 0.0 < float(boundary) < 1.0:
        raise ValueError(f"{path / INDEX_FILE}: boundary_ratio must lie in (0, 1), got {boundary}")
    if expand and len(dirs) == 2:
        raise ValueError(f"{path / INDEX_FILE} sets expand_timesteps with two experts: no published Wan model does")
    channels = None
    if dirs and (dirs[0] / CONFIG_FILE).is_file():
        channels = _read_json(dirs[0] / CONFIG_FILE).get("in_channels")
    if len(dirs) == 2:
        found = "wan2.2-a14b"
    elif expand or channels == TI2V_CHANNELS:
        found = "wan2.2-ti2v"
    else:
        found = "wan2.1"
    if experts == 1 and len(dirs) == 2:
        needs = f"{purpose} needs" if purpose else "this needs"
        raise ValueError(
            f"{path} is a two-expert Wan2.2 A14B pipeline (transformer, transformer_2, boundary_ratio={boundary}); "
            f"{needs} one transformer"
        )
    if family is not None and found != family:
        raise ValueError(f"{path} is a {found} model but the config expects {family} (data.wan)")
    return WanFolder(found, dirs, None if boundary is None else float(boundary), expand)


def refuse_image(image: Any) -> None:
    """TI2V's image-to-video mode (an image as the first frame) is not built: an image is refused, not ignored."""
    if image is not None:
        raise ValueError(IMAGE_TO_VIDEO)
