"""Run tracking: ``metrics.jsonl`` (always, rank 0) and Weights & Biases (offline by default)."""

from dist_opt.tracking.metrics_file import read_metrics
from dist_opt.tracking.tracker import METRICS_FILE, Tracker
from dist_opt.tracking.wandb_run import WandbRunFile, find_wandb_files, read_wandb_file

__all__ = ["Tracker", "read_metrics", "METRICS_FILE", "WandbRunFile", "find_wandb_files", "read_wandb_file"]
