"""Build a runnable trainer from an experiment config: data, tokenizer, model, loop.

This is what ``tokbench train`` and the Ray trainable both call; it knows nothing of
MLflow or Ray.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Union

import torch
from omegaconf import DictConfig

from tokbench.data.prepare import prepare_dataset
from tokbench.data.prepared import PreparedData
from tokbench.fileio import write_atomic
from tokbench.tokenizers import build_tokenizer
from tokbench.training.baseline import LogisticRegressionBaseline
from tokbench.training.experiment import to_yaml
from tokbench.training.loop import AnnotationTrainer, BatchCallback

log = logging.getLogger("tokbench.training")

Runner = Union[AnnotationTrainer, LogisticRegressionBaseline]


def load_data(cfg: DictConfig) -> PreparedData:
    """The experiment's dataset from the node's cache (built on first use)."""
    return prepare_dataset(cfg.dataset, cfg.split)


def build_runner(cfg: DictConfig, run_dir: str | os.PathLike, *, data: Optional[PreparedData] = None,
                 device: torch.device | str | None = None, on_batch: Optional[BatchCallback] = None) -> Runner:
    """The trainer of ``cfg`` (transformer or baseline), writing only under ``run_dir``.

    ``run_dir`` gets ``config.yaml`` (the resolved config) on creation; checkpoints land
    there too. ``device`` overrides ``trainer.device`` (a Ray trial passes its GPU).
    """
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    config_file = run_dir / "config.yaml"
    if not config_file.exists():
        write_atomic(config_file, to_yaml(cfg))
    data = data if data is not None else load_data(cfg)
    if cfg.method == "logreg":
        return LogisticRegressionBaseline(data, cfg.baseline, run_dir, device=device, on_batch=on_batch)
    tokenizer = build_tokenizer(cfg.fg, cfg.fe, cfg.fc, data, d_model=cfg.model.d_model, seed=cfg.seed)
    return AnnotationTrainer(
        data, tokenizer, cfg.model, cfg.optimizer, cfg.scheduler, cfg.trainer, run_dir, device=device, on_batch=on_batch
    )
