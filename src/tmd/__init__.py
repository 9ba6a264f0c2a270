"""tmd: Transition Matching Distillation for fast few-step video generation."""

__version__ = "0.1.0"
