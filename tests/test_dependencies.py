"""The supported dependency range is the tested one."""

import tomllib
from importlib.metadata import version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

OLDEST_TESTED_DIFFUSERS = Version("0.35.2")
"""The default suite's diffusers-dependent tests (test_wan, test_split, test_sampling, test_text, test_generate,
test_prepare, test_fastpath, test_linvideo) passed with it, installed into a throwaway venv over this environment
(docs/design.md, "Dependencies"); 0.33.0 to 0.35.1 cannot import WanPipeline under transformers 5."""


def requirement(name):
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    return next(r for r in map(Requirement, project["dependencies"]) if r.name == name)


def test_diffusers_floor_is_the_oldest_tested_release():
    """models/wan.py re-assembles the Wan forward from diffusers internals: an untested floor is a guess."""
    floors = [Version(s.version) for s in requirement("diffusers").specifier if s.operator == ">="]
    assert floors == [OLDEST_TESTED_DIFFUSERS]
    assert Version(version("diffusers")) in requirement("diffusers").specifier
