"""A non-transformer baseline: multinomial logistic regression on the normalised expression.

It reads the same ``PreparedData`` (log-normalised CSR, all genes, no tokenizer), trains on
the training split with early stopping on validation, and reports the same metric keys as
``AnnotationTrainer``, so it is one more row in every comparison of tokenizers. It has the
same ``step`` / ``fit`` / ``test`` / checkpoint interface, so the sweep can schedule it like
any other run.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tokbench.data.prepared import PreparedData
from tokbench.errors import TokbenchError
from tokbench.training.config import BaselineConfig, resolve_device, validate_baseline_config
from tokbench.training.loop import (
    BatchCallback,
    EarlyStopping,
    EpochRunner,
    check_splits,
    epoch_batches,
    rng_state,
    set_rng_state,
)
from tokbench.training.metrics import AnnotationMetrics

BASELINE_FORMAT = 1


class LogisticRegressionBaseline(EpochRunner):
    """Multinomial logistic regression (one linear layer + softmax) over all genes.

    Inputs are the log-normalised values, densified one mini-batch at a time. The loss is
    mean cross-entropy plus ``cfg.l2 / 2 * ||W||^2``; Adam at a constant ``cfg.lr``. Epoch
    order is a pure function of (``cfg.seed``, epoch), so resumed runs match uninterrupted
    ones. ``run_dir``, ``device`` and ``on_batch`` mean what they mean for
    ``AnnotationTrainer``.
    """

    def __init__(self, data: PreparedData, cfg: BaselineConfig, run_dir: str | os.PathLike, *,
                 device: torch.device | str | None = None, on_batch: Optional[BatchCallback] = None):
        validate_baseline_config(cfg)
        self.train_cells, self.val_cells, self.test_cells = check_splits(data)
        self.data, self.cfg = data, cfg
        self.run_dir = Path(run_dir).resolve()
        self.device = resolve_device(device if device is not None else cfg.device)
        self.on_batch = on_batch
        self.class_names = list(data.class_names)
        self.labels = np.asarray(data.labels, dtype=np.int64)
        self.cell_lengths = np.diff(np.asarray(data.indptr))

        torch.manual_seed(cfg.seed)
        self.model = nn.Linear(data.n_genes, len(self.class_names)).to(self.device)
        nn.init.zeros_(self.model.weight)  # the convex problem needs no symmetry breaking
        nn.init.zeros_(self.model.bias)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.epoch = 0
        self.stopper = EarlyStopping(cfg.track_metric, cfg.patience, cfg.min_delta, cfg.early_stopping)
        self.best_state: Optional[dict[str, torch.Tensor]] = None
        self.history: list[dict] = []
        self._test_result: Optional[dict] = None

    def _expression(self, cells: np.ndarray) -> torch.Tensor:
        """Dense log-normalised expression of ``cells``, float32 (B, n_genes) on the device."""
        indptr, genes, values = self.data.rows(cells)
        rows = np.repeat(np.arange(len(cells)), np.diff(indptr))
        x = torch.zeros(len(cells), self.data.n_genes)
        values = torch.from_numpy(np.asarray(values, dtype=np.float32))
        x[torch.from_numpy(rows), torch.from_numpy(genes.astype(np.int64))] = values
        return x.to(self.device, non_blocking=True)

    def step(self) -> dict:
        """Train one epoch, score validation; same keys as ``AnnotationTrainer.step()``.

        ``padded_fraction`` is 0 (no padding); ``tokens_per_second`` counts expressed genes
        (nonzero inputs) per second.
        """
        if self._test_result is not None:
            raise TokbenchError("the test split has been scored already; training cannot continue after test()")
        if self.epoch >= self.cfg.max_epochs:
            raise TokbenchError(f"baseline.max_epochs: all {self.cfg.max_epochs} epochs are done")
        cfg, model = self.cfg, self.model
        t_epoch = time.perf_counter()
        batches = epoch_batches(self.train_cells, cfg.batch_size, cfg.seed, self.epoch)
        n_total = len(self.train_cells)
        loss_sum = torch.zeros((), device=self.device)
        n_done, data_seconds = 0, 0.0

        model.train()
        t_train = time.perf_counter()
        for cells in batches:
            t0 = time.perf_counter()
            x = self._expression(cells)
            y = torch.from_numpy(self.labels[cells]).to(self.device, non_blocking=True)
            t1 = time.perf_counter()
            loss = F.cross_entropy(model(x), y)
            objective = loss + 0.5 * cfg.l2 * model.weight.square().sum()
            self.optimizer.zero_grad(set_to_none=True)
            objective.backward()
            self.optimizer.step()

            n_done += len(cells)
            loss_sum += loss.detach() * len(cells)
            data_seconds += t1 - t0
            if self.on_batch is not None:
                self.on_batch(n_done, n_total, n_done / max(time.perf_counter() - t_train, 1e-9))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        train_seconds = max(time.perf_counter() - t_train, 1e-9)

        val = self._evaluate(self.val_cells)
        return self._finish_epoch(val, float(loss_sum) / n_total, {
            "lr": cfg.lr,
            "cells_per_second": n_total / train_seconds,
            "tokens_per_second": float(self.cell_lengths[self.train_cells].sum()) / train_seconds,
            "train_seconds": train_seconds,
            "epoch_seconds": time.perf_counter() - t_epoch,
            "padded_fraction": 0.0,
            "data_fraction": data_seconds / train_seconds,
        })

    @torch.inference_mode()
    def _evaluate(self, cells: np.ndarray) -> dict:
        self.model.eval()
        size = self.cfg.eval_batch_size or 4 * self.cfg.batch_size
        metrics = AnnotationMetrics(len(self.class_names), self.device)
        for start in range(0, len(cells), size):
            batch = cells[start : start + size]
            y = torch.from_numpy(self.labels[batch]).to(self.device, non_blocking=True)
            metrics.update(self.model(self._expression(batch)), y)
        return metrics.compute()

    def state_dict(self) -> dict:
        """Weights, optimiser, epochs done, early stopping, best weights, history, RNG states."""
        return {
            "format": BASELINE_FORMAT,
            "kind": "logistic_regression",
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "early_stopping": self.stopper.state_dict(),
            "best_model": self.best_state,
            "history": self.history,
            "rng": rng_state(),
            "class_names": self.class_names,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict()``; ``TokbenchError`` if it belongs to another setup."""
        if state.get("kind") != "logistic_regression" or state.get("format") != BASELINE_FORMAT:
            raise TokbenchError("this checkpoint was not written by the logistic-regression baseline")
        if list(state["class_names"]) != self.class_names:
            raise TokbenchError(
                "the checkpoint was trained on other cell types than this dataset's; resume with the same data config"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.stopper.load_state_dict(state["early_stopping"])
        self.best_state = state["best_model"]
        self.history = list(state["history"])
        self.epoch = state["epoch"]
        self._test_result = None
        set_rng_state(state["rng"])


def run_baseline(data: PreparedData, cfg: BaselineConfig, run_dir: str | os.PathLike, *,
                 device: torch.device | str | None = None) -> tuple[list[dict], dict]:
    """Fit the baseline with early stopping and score test: returns (epoch history, test result)."""
    baseline = LogisticRegressionBaseline(data, cfg, run_dir, device=device)
    history = baseline.fit()
    return history, baseline.test()

