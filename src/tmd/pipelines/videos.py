"""What a generation writes, for Wan models (``tmd.programs.generate``) and the world's (``tmd.world.generate``)
alike: one mp4 per prompt named by its index and a slug of the prompt, and ``generation.json``; and the
step counts both default to. The file helpers themselves (``slug``, ``write_mp4``) live in ``tmd.files``, where
training's sample videos (``tmd.train.samples``, a layer below) reach them too."""

from __future__ import annotations

DEFAULT_TEACHER_STEPS = 50
DEFAULT_STUDENT_STEPS = 2
DEFAULT_INNER_STEPS = 4
MANIFEST_FILE = "generation.json"
