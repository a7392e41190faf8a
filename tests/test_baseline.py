"""The logistic-regression baseline: scikit-learn's model, C chosen by cross-validation on the
training cells, the same metric keys as the transformer, checkpoints inside the trainable."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import yaml
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, matthews_corrcoef
from sklearn.model_selection import GridSearchCV, StratifiedKFold

from tokbench.data.prepared import PreparedData
from tokbench.errors import TokbenchError
from tokbench.training import BaselineConfig, LogisticRegressionBaseline, validate_baseline_config

N_GENES, N_CLASSES = 30, 3
CS = [1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3]
STEP_KEYS = {
    "epoch", "train_loss", "val_loss", "val_accuracy", "val_macro_f1", "val_mcc", "val_predicted_classes",
    "val_true_classes", "C", "cv_mcc", "cv_seconds", "n_iter", "cells_per_second", "tokens_per_second",
    "train_seconds", "epoch_seconds", "padded_fraction", "data_fraction", "tokenise_fraction", "best_val_mcc",
    "best_epoch", "should_stop",
}
TEST_KEYS = {
    "test_accuracy", "test_macro_f1", "test_mcc", "test_loss", "test_n_cells", "test_confusion_matrix",
    "test_per_class_accuracy", "test_predicted_classes", "test_true_classes", "class_names", "best_epoch", "best_val_mcc",
}


def noisy_cells(n_cells: int = 180, seed: int = 0, scale: float = 1.0, labels: np.ndarray | None = None) -> PreparedData:
    """Sparse log-expression where each type raises three marker genes a little above noisy
    background genes: a weak signal, so the fit needs regularising. ``scale`` multiplies every
    value. Split 50/25/25 into train/val/test."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n_cells) % N_CLASSES) if labels is None else np.asarray(labels)
    dense = rng.gamma(1.0, 1.0, (n_cells, N_GENES)) * (rng.random((n_cells, N_GENES)) < 0.4)
    for c in range(N_CLASSES):
        dense[labels == c, 3 * c : 3 * c + 3] += rng.gamma(1.0, 0.5, ((labels == c).sum(), 3))
    x = sp.csr_matrix((np.log1p(dense) * scale).astype(np.float32))
    split = np.full(n_cells, 2, dtype=np.int8)
    split[: n_cells // 2] = 0
    split[n_cells // 2 : 3 * n_cells // 4] = 1
    genes = np.array([f"G{j}" for j in range(N_GENES)])
    return PreparedData(
        indptr=x.indptr.astype(np.int64), indices=x.indices.astype(np.int32), data=x.data, gene_ids=genes,
        gene_symbols=genes, gene_chromosome=np.array(["1"] * N_GENES), gene_start=np.arange(N_GENES, dtype=np.int64),
        labels=labels.astype(np.int64), class_names=[f"type_{c}" for c in range(N_CLASSES)], split=split,
        obs=pd.DataFrame({"cell_type": labels}),
    )


def run_baseline(data: PreparedData, cfg: BaselineConfig, run_dir) -> tuple[list[dict], dict]:
    """Fit the baseline and score test: (epoch history, test result)."""
    baseline = LogisticRegressionBaseline(data, cfg, run_dir)
    return baseline.fit(), baseline.test()


def reference_fit(data: PreparedData, seed: int) -> GridSearchCV:
    """The standard recipe written out with scikit-learn alone: 3-fold stratified CV over C."""
    x = sp.csr_matrix((data.data, data.indices, data.indptr), shape=(data.n_cells, data.n_genes))
    train = data.split == 0
    search = GridSearchCV(LogisticRegression(max_iter=1000), {"C": CS}, scoring="matthews_corrcoef",
                          cv=StratifiedKFold(3, shuffle=True, random_state=seed))
    return search.fit(x[train], data.labels[train])


def test_baseline_is_scikit_learns_cross_validated_logistic_regression(tmp_path):
    data = noisy_cells()
    history, result = run_baseline(data, BaselineConfig(Cs=CS, seed=3), tmp_path / "a")
    assert len(history) == 1 and history[0]["should_stop"] and set(history[0]) == STEP_KEYS
    assert set(result) == TEST_KEYS and result["best_epoch"] == 1

    reference = reference_fit(data, seed=3)
    assert history[0]["C"] == reference.best_params_["C"]
    assert history[0]["cv_mcc"] == pytest.approx(reference.best_score_)
    x = sp.csr_matrix((data.data, data.indices, data.indptr), shape=(data.n_cells, data.n_genes))
    test = data.split == 2
    predicted = reference.predict(x[test])
    assert result["test_mcc"] == pytest.approx(matthews_corrcoef(data.labels[test], predicted), abs=1e-6)
    assert result["test_accuracy"] == pytest.approx(accuracy_score(data.labels[test], predicted), abs=1e-6)
    assert result["test_predicted_classes"] == 3 and result["test_mcc"] > 0.3


def test_regularisation_is_chosen_by_cross_validation(tmp_path):
    # Values 10x smaller are the same problem with C 100x larger (the L2 term sees weights
    # 10x larger): one fixed C cannot serve both, cross-validation must move with the data.
    plain = run_baseline(noisy_cells(), BaselineConfig(Cs=CS), tmp_path / "a")[0][0]["C"]
    shrunk = run_baseline(noisy_cells(scale=0.1), BaselineConfig(Cs=CS), tmp_path / "b")[0][0]["C"]
    assert CS[0] < plain < CS[-2]  # an interior choice, so the grid's ends do not decide it
    assert shrunk == pytest.approx(100 * plain)


def test_a_class_missing_from_training_is_never_predicted(tmp_path):
    labels = np.arange(120) % N_CLASSES
    labels[:90][labels[:90] == 2] = 0  # no type_2 in train or val; some in test
    data = noisy_cells(120, labels=labels)
    _, result = run_baseline(data, BaselineConfig(cv_folds=3), tmp_path)
    confusion = result["test_confusion_matrix"]
    assert confusion[:, 2].sum() == 0 and confusion[2].sum() > 0
    assert np.isfinite(result["test_loss"]) and result["test_true_classes"] == 3


def test_checkpoint_restores_the_fitted_model(tmp_path):
    data = noisy_cells()
    cfg = BaselineConfig(Cs=[0.1, 1.0])
    first = LogisticRegressionBaseline(data, cfg, tmp_path)
    metrics = first.step()
    first.save_checkpoint()
    expected = first.test()

    second = LogisticRegressionBaseline(data, cfg, tmp_path)
    second.load_checkpoint()
    assert second.history == [metrics] and second.fit() == [metrics]  # nothing is refitted
    got = second.test()
    np.testing.assert_array_equal(got["test_confusion_matrix"], expected["test_confusion_matrix"])
    assert got["test_loss"] == pytest.approx(expected["test_loss"])
    with pytest.raises(TokbenchError, match="already"):
        second.step()


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"Cs": []}, r"baseline\.Cs: expected at least one C value"),
        ({"Cs": [1.0, 0.0]}, r"baseline\.Cs\[1\]: 0.0 must be > 0"),
        ({"cv_folds": 1}, r"baseline\.cv_folds: 1 must be >= 2"),
        ({"track_metric": "auc"}, r"baseline\.track_metric"),
    ],
)
def test_baseline_config_errors_name_the_key(changes, message):
    with pytest.raises(TokbenchError, match=message):
        validate_baseline_config(BaselineConfig(**changes))


def test_trainable_checkpoints_and_restores_the_baseline(tiny_atlas, tmp_path, monkeypatch):
    import ray

    from tokbench.sweep.spec import load_sweep
    from tokbench.trainable import TokbenchTrainable

    spec = {
        "name": "baseline_only",
        "base": {"experiment": "cross_tissue", "overrides": [
            f"dataset.path={tiny_atlas['h5ad']}", f"gene_embeddings={tiny_atlas['gene_embeddings']}",
            f"dataset.cache_dir={tmp_path / 'cache'}", "baseline.Cs=[0.1,1.0]"]},
        "baseline": True,
        "max_epochs": 4,  # a sweep's epoch budget reaches the baseline too; it still fits in one step
        "scheduler": {"name": "none"},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        "storage_path": str(tmp_path / "results"),
    }
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(spec))
    sweep = load_sweep(tmp_path / "sweep.yaml")
    # The trainable asks Ray for its GPUs and node; this test drives it in-process, without a cluster.
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [])
    monkeypatch.setattr(ray, "get_runtime_context", lambda: type("Context", (), {"get_node_id": lambda self: "local"})())

    class InProcess(TokbenchTrainable):
        def setup(self, config):
            super().setup(config, sweep=sweep)

    trial = {"combination": 0, "seed": 0, "params": {}}
    first = InProcess(config=dict(trial))
    result = first.step()
    assert result["done"] and result["epoch"] == 1 and 0.0 <= result["test_mcc"] <= 1.0
    assert json.loads(result["test_details"])["class_names"] == first.runner.class_names
    first.save_checkpoint(str(tmp_path / "checkpoint"))

    second = InProcess(config=dict(trial))
    second.load_checkpoint(str(tmp_path / "checkpoint"))
    again = second.step()  # Ray retried the finished trial: it reports the same, fits nothing
    assert again["done"] and again["val_mcc"] == result["val_mcc"] and again["C"] == result["C"]
    assert second.runner.test()["test_mcc"] == pytest.approx(result["test_mcc"])
    first.stop()
    second.stop()
