"""The yardstick: scikit-learn's logistic regression on the normalised expression.

It reads the same ``PreparedData`` rows as the transformer (the log-normalised sparse CSR
matrix of all genes, no tokenizer) and fits ``sklearn.linear_model.LogisticRegression``,
choosing its regularisation by stratified cross-validation on the training cells only. A
weak baseline flatters every tokenizer, so this is the standard one, not a hand-written
imitation. It reports the same metric keys as ``AnnotationTrainer`` (``val_*`` for its one
"epoch", ``test_*`` with the fitted model) and has the same ``step`` / ``fit`` / ``test`` /
checkpoint interface, so ``tokbench train`` and the sweep run it like any other trial; the
whole fit is one ``step()``.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from typing import Optional

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold

from tokbench.data.prepared import PreparedData
from tokbench.errors import TokbenchError
from tokbench.training.config import BaselineConfig, validate_baseline_config
from tokbench.training.loop import BatchCallback, EarlyStopping, EpochRunner
from tokbench.training.metrics import AnnotationMetrics

log = logging.getLogger("tokbench.training")

BASELINE_FORMAT = 2

# scikit-learn's scorer for each tracked metric (macro-F1 over the classes present, as
# AnnotationMetrics computes it).
CV_SCORING = {"mcc": "matthews_corrcoef", "accuracy": "accuracy", "macro_f1": "f1_macro"}

# Logit of a class that no training cell has, below the least likely class the model knows:
# its probability is about exp(-35) ~ 6e-16 of that class's, so it is never predicted and
# the cross-entropy of its cells stays finite (about what scikit-learn's log_loss clipping gives).
_ABSENT_CLASS_MARGIN = 35.0


def expression_matrix(data: PreparedData) -> sp.csr_matrix:
    """All cells' log-normalised expression as one scipy CSR matrix (cells x genes, float32),
    sharing ``data``'s (possibly memory-mapped) arrays."""
    return sp.csr_matrix((data.data, data.indices, data.indptr), shape=(data.n_cells, data.n_genes))


def cv_folds(labels: np.ndarray, folds: int, seed: int) -> StratifiedKFold:
    """Stratified, shuffled folds over the training ``labels``: ``folds`` of them, fewer when
    the rarest class has fewer cells than that (so each fold holds it once), at least 2."""
    counts = np.bincount(labels)
    rarest = int(counts[counts > 0].min())
    return StratifiedKFold(n_splits=max(2, min(folds, rarest)), shuffle=True, random_state=seed)


def fit_logistic_regression(x: sp.csr_matrix, y: np.ndarray, cfg: BaselineConfig) -> GridSearchCV:
    """``GridSearchCV`` over ``cfg.Cs`` (ascending, so equal scores go to the smaller C) of
    ``LogisticRegression(C, max_iter, tol)`` on ``x`` / ``y``, folds from :func:`cv_folds`,
    scored by ``cfg.track_metric``, refit on all of ``x``. Single-threaded (one trial = one CPU).
    """
    search = GridSearchCV(
        LogisticRegression(max_iter=cfg.max_iter, tol=cfg.tol),
        {"C": sorted(float(c) for c in cfg.Cs)},
        scoring=CV_SCORING[cfg.track_metric],
        cv=cv_folds(y, cfg.cv_folds, cfg.seed),
        n_jobs=1,
        refit=True,
        error_score="raise",
    )
    return search.fit(x, y)


class LogisticRegressionBaseline(EpochRunner):
    """Multinomial L2 logistic regression over all genes, C chosen by cross-validation.

    ``step()`` runs the whole fit (cross-validation over ``cfg.Cs`` on the training cells,
    refit with the best C) and scores validation; it is epoch 1 of 1. ``run_dir`` means what
    it means for ``AnnotationTrainer``. scikit-learn runs on the CPU, so ``device`` is
    accepted for the common interface and ignored; ``on_batch`` is called once, after the fit.
    """

    def __init__(self, data: PreparedData, cfg: BaselineConfig, run_dir: str | os.PathLike, *,
                 device: torch.device | str | None = None, on_batch: Optional[BatchCallback] = None):
        validate_baseline_config(cfg)
        # Nothing to stop early: the one step is the whole fit.
        super().__init__(data, cfg, run_dir, device=torch.device("cpu"), on_batch=on_batch,
                         stopper=EarlyStopping(patience=1, enabled=False))
        self.matrix = expression_matrix(data)
        self.estimator: Optional[LogisticRegression] = None

    def step(self) -> dict:
        """Fit and score validation. Keys as ``AnnotationTrainer.step()`` without ``lr``, plus
        ``C`` (the chosen inverse regularisation), ``cv_<track_metric>`` (its mean fold score
        on the training cells), ``cv_seconds`` (the search and refit) and ``n_iter`` (lbfgs
        iterations of the refit). ``train_loss`` is the refit model's mean cross-entropy on
        the training cells (nats); ``cells_per_second`` is training cells over ``train_seconds``;
        ``tokens_per_second`` counts their expressed genes.
        """
        self._check_can_step(1, "the baseline is fitted already: its whole fit is one step()")
        t_epoch = time.perf_counter()
        x, y = self.matrix[self.train_cells], self.labels[self.train_cells]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            search = fit_logistic_regression(x, y, self.cfg)
        train_seconds = max(time.perf_counter() - t_epoch, 1e-9)
        self.estimator = search.best_estimator_
        n_iter = int(np.max(self.estimator.n_iter_))
        if any(issubclass(w.category, ConvergenceWarning) for w in caught):
            log.warning("baseline: lbfgs reached baseline.max_iter=%d before baseline.tol=%g in some fits "
                        "(the refit took %d iterations); raise baseline.max_iter for a converged fit",
                        self.cfg.max_iter, self.cfg.tol, n_iter)
        if self.on_batch is not None:
            self.on_batch(len(self.train_cells), len(self.train_cells), len(self.train_cells) / train_seconds)

        train = self._evaluate(self.train_cells)
        val = self._evaluate(self.val_cells)
        metric = self.cfg.track_metric
        return self._finish_epoch(val, train["loss"], {
            "C": float(search.best_params_["C"]),
            f"cv_{metric}": float(search.best_score_),
            "cv_seconds": train_seconds,
            "n_iter": n_iter,
            "cells_per_second": len(self.train_cells) / train_seconds,
            "tokens_per_second": float(x.nnz) / train_seconds,
            "train_seconds": train_seconds,
            "epoch_seconds": time.perf_counter() - t_epoch,
            "padded_fraction": 0.0,
            "data_fraction": 0.0,
            "tokenise_fraction": 0.0,
        }, finished=True)

    def _logits(self, cells: np.ndarray) -> torch.Tensor:
        """Decision values of ``cells`` for every class id (float32, n x n_classes)."""
        scores = self.estimator.decision_function(self.matrix[cells])
        if scores.ndim == 1:  # two classes: scikit-learn gives the second class's log-odds
            scores = np.stack([np.zeros_like(scores), scores], axis=1)
        known = self.estimator.classes_
        logits = np.empty((len(cells), len(self.class_names)), dtype=np.float32)
        logits[:] = (scores.min(axis=1, keepdims=True) - _ABSENT_CLASS_MARGIN) if len(cells) else 0.0
        logits[:, known] = scores
        return torch.from_numpy(logits)

    def _evaluate(self, cells: np.ndarray) -> dict:
        metrics = AnnotationMetrics(len(self.class_names), self.device)
        if len(cells):
            metrics.update(self._logits(cells), torch.from_numpy(self.labels[cells]))
        return metrics.compute()

    # -- the fitted model as tensors: checkpoints load with torch.load(weights_only=True) --

    def model_state(self) -> dict:
        """The fitted model: ``coef`` (n_known x n_genes, or 1 x n_genes for two classes),
        ``intercept``, ``classes`` (the class ids seen in training), ``C``, ``n_iter``."""
        if self.estimator is None:
            return {}
        est = self.estimator
        return {
            "coef": torch.from_numpy(np.array(est.coef_, dtype=np.float64)),
            "intercept": torch.from_numpy(np.array(est.intercept_, dtype=np.float64)),
            "classes": torch.from_numpy(np.asarray(est.classes_, dtype=np.int64)),
            "C": float(est.C),
            "n_iter": int(np.max(est.n_iter_)),
        }

    def load_model_state(self, state: dict) -> None:
        """Rebuild the fitted ``LogisticRegression`` from a ``model_state()``."""
        if not state:
            self.estimator = None
            return
        est = LogisticRegression(C=state["C"], max_iter=self.cfg.max_iter, tol=self.cfg.tol)
        est.coef_ = state["coef"].numpy()
        est.intercept_ = state["intercept"].numpy()
        est.classes_ = state["classes"].numpy()
        est.n_features_in_ = self.data.n_genes
        est.n_iter_ = np.array([state["n_iter"]], dtype=np.int32)
        self.estimator = est

    def state_dict(self) -> dict:
        """The fitted model, epochs done (0 or 1), history and class names."""
        return {
            "format": BASELINE_FORMAT,
            "kind": "logistic_regression",
            **self._progress_state(),
            "model": self.model_state(),
            "n_genes": self.data.n_genes,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict()``; ``TokbenchError`` if it belongs to another setup."""
        if state.get("kind") != "logistic_regression" or state.get("format") != BASELINE_FORMAT:
            raise TokbenchError(
                "this checkpoint was not written by this version of the logistic-regression baseline; "
                "start the run again in a new run directory"
            )
        if list(state["class_names"]) != self.class_names or state["n_genes"] != self.data.n_genes:
            raise TokbenchError(
                "the checkpoint was fitted on other cell types or genes than this dataset's; "
                "resume with the same data config"
            )
        self.load_model_state(state["model"])
        self._load_progress(state)
