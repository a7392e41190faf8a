"""Typed configuration of training: optimiser, learning-rate schedule, trainer, baseline."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from tokbench.errors import TokbenchError
from tokbench.model.config import check_choice, check_range

SCHEDULERS = ("cosine", "constant")
TRACK_METRICS = ("mcc", "accuracy", "macro_f1")
AMP_MODES = ("auto", "bf16", "off")


@dataclass
class OptimizerConfig:
    """AdamW. ``lr`` is the peak learning rate reached after warm-up; ``weight_decay`` is
    decoupled and applies to matrices and embeddings only (not to biases or LayerNorm)."""

    lr: float = 2e-3
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8


@dataclass
class SchedulerConfig:
    """Learning-rate schedule over ``max_epochs x steps_per_epoch`` optimiser steps.

    Both schedules warm up linearly over the first ``warmup_ratio`` of those steps;
    ``cosine`` then decays to ``min_lr_ratio * lr``, ``constant`` stays at ``lr``.
    """

    name: str = "cosine"
    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.0


@dataclass
class TrainerConfig:
    """How one annotation run is trained and evaluated.

    ``batch_size`` / ``eval_batch_size`` are in cells (``eval_batch_size`` None = 4 x
    ``batch_size``). Each epoch trains on the training split, then scores validation; with
    ``early_stopping`` the run stops once ``track_metric`` (on validation) has not improved
    by more than ``min_delta`` for ``patience`` epochs, but never before ``min_epochs``
    epochs are done: a model that still predicts one class while its loss falls (warm-up,
    a slow start) has a flat validation MCC of 0 that is no sign of a finished run. The
    default 10 is twice the warm-up of the default schedule (10% of 50 epochs); a
    ``min_epochs`` at or above ``max_epochs`` turns early stopping off. ``grad_clip`` is the maximum global
    gradient L2 norm (0 = no clipping). ``bucket_by_length`` sorts each chunk of
    ``bucket_batches`` shuffled batches by the cells' number of expressed genes, so batches
    hold sentences of similar length and carry less padding. ``num_workers`` > 0 tokenises on
    the CPU in DataLoader worker processes (pinned memory, non-blocking copies). With
    ``num_workers`` 0, ``prefetch`` (default true) tokenises the next batch in a background
    thread of the training process while the current one trains (on the CPU, with pinned
    memory and non-blocking copies when training runs on CUDA), one batch ahead, so the step
    does not wait for its data; ``prefetch: false`` tokenises each batch inside the step, on
    the training device. Every mode trains on the same sentences in the same order with the
    same dropout masks: tokbench's tokenizers draw from ``(seed, epoch, cell)`` streams, never
    from the global torch or numpy generators (which the dropout masks use); a tokenizer of
    one's own that drew from them would need ``prefetch: false``. ``device``: ``auto`` (CUDA when available, else
    CPU), ``cpu``, ``cuda``, ``cuda:1``, ... ``amp``: ``auto`` = bf16 autocast on a CUDA
    device that supports it, ``bf16`` = require it, ``off`` = float32.
    """

    batch_size: int = 32
    eval_batch_size: Optional[int] = None
    max_epochs: int = 50
    early_stopping: bool = True
    patience: int = 5
    min_epochs: int = 10
    min_delta: float = 0.0
    track_metric: str = "mcc"
    grad_clip: float = 1.0
    bucket_by_length: bool = False
    bucket_batches: int = 50
    num_workers: int = 0
    prefetch: bool = True
    device: str = "auto"
    seed: int = 0
    amp: str = "auto"


@dataclass
class BaselineConfig:
    """scikit-learn's ``LogisticRegression`` (multinomial, L2, lbfgs) on the log-normalised
    expression of all genes, as a sparse CSR matrix without scaling: the standard baseline
    of cell-type annotation.

    The inverse regularisation strength C is chosen among ``Cs`` by ``cv_folds``-fold
    stratified cross-validation on the training cells (shuffled with ``seed``), scored on
    ``track_metric``; the best mean fold score wins, ties going to the smaller C (stronger
    regularisation), and the model is refit with it on all training cells. Validation and
    test cells never take part. ``max_iter`` and ``tol`` are lbfgs's iteration limit and
    gradient tolerance (scikit-learn's defaults are 100 and 1e-4; a fit that reaches
    ``max_iter`` is reported, not hidden). The fit is one step ("epoch" 1); ``max_epochs``
    is accepted so a sweep can set one epoch budget for every trial, and any value >= 1
    means the same.
    """

    Cs: list[float] = field(default_factory=lambda: [0.1, 1.0, 10.0])
    cv_folds: int = 3
    max_iter: int = 1000
    tol: float = 1e-4
    track_metric: str = "mcc"
    max_epochs: int = 1
    seed: int = 0


def _check_device(value: str, key: str) -> None:
    if value == "auto":
        return
    try:
        torch.device(value)
    except (RuntimeError, TypeError) as err:
        raise TokbenchError(f"{key}: {value!r} is not a torch device; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from err


def _check_bool(value, key: str) -> None:
    if not isinstance(value, bool):
        raise TokbenchError(f"{key}: expected true or false, got {value!r}")


def _check_stopping(cfg, key: str) -> None:
    check_range(cfg.batch_size, f"{key}.batch_size", low=1, integer=True)
    if cfg.eval_batch_size is not None:
        check_range(cfg.eval_batch_size, f"{key}.eval_batch_size", low=1, integer=True)
    check_range(cfg.max_epochs, f"{key}.max_epochs", low=1, integer=True)
    _check_bool(cfg.early_stopping, f"{key}.early_stopping")
    check_range(cfg.patience, f"{key}.patience", low=1, integer=True)
    check_range(cfg.min_epochs, f"{key}.min_epochs", low=1, integer=True)
    check_range(cfg.min_delta, f"{key}.min_delta", low=0.0)
    check_choice(cfg.track_metric, TRACK_METRICS, f"{key}.track_metric")
    _check_device(cfg.device, f"{key}.device")
    check_range(cfg.seed, f"{key}.seed", low=0, integer=True)


def validate_optimizer_config(cfg: OptimizerConfig, key: str = "optimizer") -> None:
    """Check an ``OptimizerConfig``; raise ``TokbenchError`` naming the key path."""
    check_range(cfg.lr, f"{key}.lr", low=0.0, low_open=True)
    check_range(cfg.weight_decay, f"{key}.weight_decay", low=0.0)
    if len(cfg.betas) != 2:
        raise TokbenchError(f"{key}.betas: expected two numbers [beta1, beta2], got {list(cfg.betas)!r}")
    for i, beta in enumerate(cfg.betas):
        check_range(beta, f"{key}.betas[{i}]", low=0.0, high=1.0, high_open=True)
    check_range(cfg.eps, f"{key}.eps", low=0.0, low_open=True)


def validate_scheduler_config(cfg: SchedulerConfig, key: str = "scheduler") -> None:
    """Check a ``SchedulerConfig``; raise ``TokbenchError`` naming the key path."""
    check_choice(cfg.name, SCHEDULERS, f"{key}.name")
    check_range(cfg.warmup_ratio, f"{key}.warmup_ratio", low=0.0, high=1.0, high_open=True)
    check_range(cfg.min_lr_ratio, f"{key}.min_lr_ratio", low=0.0, high=1.0)


def validate_trainer_config(cfg: TrainerConfig, key: str = "trainer") -> None:
    """Check a ``TrainerConfig``; raise ``TokbenchError`` naming the key path."""
    _check_stopping(cfg, key)
    check_range(cfg.grad_clip, f"{key}.grad_clip", low=0.0)
    _check_bool(cfg.bucket_by_length, f"{key}.bucket_by_length")
    check_range(cfg.bucket_batches, f"{key}.bucket_batches", low=1, integer=True)
    check_range(cfg.num_workers, f"{key}.num_workers", low=0, integer=True)
    _check_bool(cfg.prefetch, f"{key}.prefetch")
    check_choice(cfg.amp, AMP_MODES, f"{key}.amp")


def validate_baseline_config(cfg: BaselineConfig, key: str = "baseline") -> None:
    """Check a ``BaselineConfig``; raise ``TokbenchError`` naming the key path."""
    if len(cfg.Cs) == 0:
        raise TokbenchError(f"{key}.Cs: expected at least one C value, e.g. [0.1, 1.0, 10.0]")
    for i, c in enumerate(cfg.Cs):
        check_range(c, f"{key}.Cs[{i}]", low=0.0, low_open=True)
    check_range(cfg.cv_folds, f"{key}.cv_folds", low=2, integer=True)
    check_range(cfg.max_iter, f"{key}.max_iter", low=1, integer=True)
    check_range(cfg.tol, f"{key}.tol", low=0.0, low_open=True)
    check_choice(cfg.track_metric, TRACK_METRICS, f"{key}.track_metric")
    check_range(cfg.max_epochs, f"{key}.max_epochs", low=1, integer=True)
    check_range(cfg.seed, f"{key}.seed", low=0, integer=True)


def resolve_device(spec: str | torch.device) -> torch.device:
    """The torch device for a config value: ``auto`` = ``cuda`` when available, else ``cpu``."""
    if isinstance(spec, torch.device):
        return spec
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TokbenchError(
            f"trainer.device: {spec!r} was asked for but no CUDA device is visible; use 'auto' or 'cpu'"
        )
    return device


def resolve_amp(amp: str, device: torch.device) -> bool:
    """Whether to run the forward pass under bf16 autocast (CUDA only)."""
    if amp == "off":
        return False
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if amp == "bf16" and not cuda_bf16:
        raise TokbenchError(
            f"trainer.amp: 'bf16' needs a CUDA device with bf16 support, but training runs on {device}; "
            f"use 'auto' or 'off'"
        )
    return cuda_bf16
