"""Distilled students as diffusers pipelines: ``TMDPipeline`` for TMD students, and a stock ``WanPipeline``
(with a scheduler on the student's grid) for plain few-step students such as DMD2-v."""

from tmd.pipelines.export import export_pipeline, few_step_scheduler
from tmd.pipelines.tmd_pipeline import TMDParts, TMDPipeline

__all__ = ["TMDParts", "TMDPipeline", "export_pipeline", "few_step_scheduler"]
