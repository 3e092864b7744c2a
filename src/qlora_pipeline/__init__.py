"""qlora-pipeline: a reproducible QLoRA fine-tuning pipeline on DVC."""

__version__ = "0.1.0"
