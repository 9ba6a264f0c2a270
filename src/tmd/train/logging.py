"""Metric sinks: ``metrics.jsonl`` (always; the record tests and reports read), TensorBoard, wandb.

TensorBoard is skipped with a warning when it is not installed; wandb is imported only when asked for.
Sample videos (``tmd.train.samples``) go to both as videos; to TensorBoard as a frame grid image when moviepy < 2,
which its ``add_video`` needs, is missing.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


class MetricLogger:
    """Appends one JSON line per logged step; on resume, drops lines past the checkpoint's step so the
    file reads as one uninterrupted run. ``enabled=False`` (ranks other than 0) writes nothing."""

    def __init__(
        self,
        run_dir: Path,
        resume_step: int = 0,
        tensorboard: bool = True,
        wandb: bool = False,
        wandb_project: str = "tmd",
        config: dict[str, Any] | None = None,
        enabled: bool = True,
    ) -> None:
        self.enabled = enabled
        self._tb = self._wandb = None
        if not enabled:
            return
        self.path = run_dir / METRICS_FILE
        if self.path.exists():
            lines = self.path.read_text().splitlines()
            kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(f"{line}\n" for line in kept))
        self._file = open(self.path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warnings.warn("tensorboard is not installed; logging to metrics.jsonl only", stacklevel=2)
            else:
                self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)
        if wandb:
            try:
                import wandb as wandb_module
            except ImportError as e:
                raise ImportError("train.wandb=true needs the wandb package: pip install wandb") from e
            self._wandb = wandb_module.init(project=wandb_project, dir=str(run_dir), config=config, resume="allow")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _json_float(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def log_videos(self, step: int, videos: dict[str, Any], files: dict[str, Path], fps: int) -> None:
        """uint8 (F, H, W, 3) videos by name, written to ``files``: TensorBoard's ``add_video`` (which needs
        moviepy < 2; without it, a grid image of 8 frames per video, one row each), W&B's ``wandb.Video``."""
        if not self.enabled:
            return
        if self._tb is not None:
            try:  # what add_video imports: moviepy 2 has no editor module, and add_video then writes nothing
                from moviepy import editor  # noqa: F401
            except ImportError:
                self._tb.add_image("samples", frame_grid(list(videos.values())), step, dataformats="HWC")
            else:
                for name, video in videos.items():
                    self._tb.add_video(f"samples/{name}", video.permute(0, 3, 1, 2)[None], step, fps=fps)
            self._tb.flush()
        if self._wandb is not None:
            import wandb as wandb_module

            # the mp4 carries its frame rate: wandb reads the file as it is
            self._wandb.log(
                {f"samples/{name}": wandb_module.Video(str(path)) for name, path in files.items()},
                step=step,
            )

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _json_float(value: float) -> float | str:
    """JSON has no NaN/inf; write them as strings so the file stays valid JSON."""
    return value if math.isfinite(value) else str(value)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def frame_grid(videos: list[Any], columns: int = 8) -> Any:
    """uint8 (F, H, W, 3) videos -> one uint8 (rows H, columns W, 3) image: a row per video, ``columns`` frames
    evenly spread over it."""
    import torch

    rows = []
    for video in videos:
        picks = torch.linspace(0, len(video) - 1, min(columns, len(video))).round().long()
        rows.append(torch.cat(list(video[picks]), dim=1))
    return torch.cat(rows, dim=0)
