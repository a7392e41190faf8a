"""The training loop, early stopping, best-weights test, resume, checkpoints, errors."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from tokbench.data.prepared import PreparedData
from tokbench.errors import TokbenchError
from tokbench.model import ModelConfig
from tokbench.tokenizers.base import CLS, N_SPECIAL, PAD, CellSentences
from tokbench.training import (
    AnnotationTrainer,
    OptimizerConfig,
    SchedulerConfig,
    TrainerConfig,
    validate_trainer_config,
    write_confusion_report,
)
from tokbench.training import loop
from tokbench.training.loop import EarlyStopping, epoch_batches, lr_factor
from tokbench.training.metrics import degenerate_splits

N_GENES, N_CLASSES, MARKERS = 40, 3, 5
TIMING_KEYS = {"cells_per_second", "tokens_per_second", "train_seconds", "epoch_seconds", "data_fraction",
               "tokenise_fraction"}
STEP_KEYS = {
    "epoch", "train_loss", "val_loss", "val_accuracy", "val_macro_f1", "val_mcc", "lr", "cells_per_second",
    "tokens_per_second", "train_seconds", "epoch_seconds", "padded_fraction", "data_fraction", "tokenise_fraction",
    "best_val_mcc", "best_epoch", "should_stop", "val_predicted_classes", "val_true_classes",
}
TEST_KEYS = {
    "test_accuracy", "test_macro_f1", "test_mcc", "test_loss", "test_n_cells", "test_confusion_matrix",
    "test_per_class_accuracy", "class_names", "best_epoch", "best_val_mcc", "test_predicted_classes", "test_true_classes",
}


def make_data(n_cells: int = 240, seed: int = 0, labels: np.ndarray | None = None, split: np.ndarray | None = None) -> PreparedData:
    """Cells whose type shows in which genes they express: type c expresses marker genes
    5c..5c+4 highly (each with probability 0.8), plus a few background genes at lower values.
    Cells are split 60/20/20 into train/val/test."""
    rng = np.random.default_rng(seed)
    if labels is None:
        labels = rng.permutation(np.arange(n_cells) % N_CLASSES)
    indptr, indices, data = [0], [], []
    for c in labels:
        markers = np.arange(MARKERS * c, MARKERS * (c + 1))
        markers = markers[rng.random(MARKERS) < 0.8]
        background = np.flatnonzero(rng.random(N_GENES - MARKERS * N_CLASSES) < 0.12) + MARKERS * N_CLASSES
        genes = np.concatenate([markers, background])
        values = np.concatenate([rng.uniform(1.5, 3.0, len(markers)), rng.uniform(0.2, 1.5, len(background))])
        order = np.argsort(genes)
        indices += list(genes[order])
        data += list(values[order])
        indptr.append(len(indices))
    if split is None:
        split = np.zeros(n_cells, dtype=np.int8)
        split[int(0.6 * n_cells) : int(0.8 * n_cells)] = 1
        split[int(0.8 * n_cells) :] = 2
    gene_ids = np.array([f"G{j}" for j in range(N_GENES)])
    return PreparedData(
        indptr=np.array(indptr, dtype=np.int64), indices=np.array(indices, dtype=np.int32),
        data=np.array(data, dtype=np.float32), gene_ids=gene_ids, gene_symbols=gene_ids,
        gene_chromosome=np.array(["1"] * N_GENES), gene_start=np.arange(N_GENES, dtype=np.int64),
        labels=np.asarray(labels, dtype=np.int64), class_names=[f"type_{c}" for c in range(N_CLASSES)],
        split=np.asarray(split, dtype=np.int8), obs=pd.DataFrame({"cell_type": labels}),
    )


class TopKEmbedder(nn.Module):
    """Gene embedding + linear expression; ``blind`` returns zeros (the cell is invisible)."""

    def __init__(self, d_model: int, blind: bool = False):
        super().__init__()
        self.blind = blind
        self.gene = nn.Embedding(N_SPECIAL + N_GENES, d_model)
        self.expression = nn.Linear(1, d_model)

    def forward(self, s: CellSentences) -> torch.Tensor:
        x = self.gene(s.gene_tokens) + self.expression(s.expression.unsqueeze(-1)) * (~s.special).unsqueeze(-1)
        return torch.zeros_like(x) if self.blind else x


class TopKTokenizer:
    """Stand-in tokenizer: CLS, then the ``k`` most expressed genes in descending order.

    Each epoch one of the k genes is dropped at random, a pure function of (seed, epoch, cell),
    so the loop's resume and worker paths meet a stochastic tokenizer.
    """

    def __init__(self, data: PreparedData, d_model: int, k: int = 8, seed: int = 0, blind: bool = False):
        self.data, self.k, self.seed = data, k, seed
        torch.manual_seed(123)
        self.embedder = TopKEmbedder(d_model, blind)

    def sentences(self, cells: np.ndarray, epoch: int, device="cpu") -> CellSentences:
        indptr, genes, values = self.data.rows(cells)
        picked = []
        for i, cell in enumerate(cells):
            g, v = genes[indptr[i] : indptr[i + 1]], values[indptr[i] : indptr[i + 1]]
            order = np.argsort(-v, kind="stable")[: self.k]
            if len(order) > 1:
                drop = np.random.default_rng([self.seed, epoch, int(cell)]).integers(len(order))
                order = np.delete(order, drop)
            picked.append((g[order], v[order]))
        T = 1 + max(len(g) for g, _ in picked)
        tokens = np.full((len(cells), T), PAD, dtype=np.int64)
        expression = np.zeros((len(cells), T), dtype=np.float32)
        tokens[:, 0] = CLS
        for i, (g, v) in enumerate(picked):
            tokens[i, 1 : 1 + len(g)] = N_SPECIAL + g
            expression[i, 1 : 1 + len(g)] = v
        tokens = torch.from_numpy(tokens)
        s = CellSentences(tokens, torch.from_numpy(expression), special=tokens < N_SPECIAL, padding_mask=tokens == PAD)
        return s.to(device)

    def describe(self) -> dict[str, str]:
        return {"fg": "learned", "fe": "linear", "fc": "topk"}


def make_trainer(run_dir, data=None, tokenizer=None, *, model=None, optim=None, sched=None, **trainer) -> AnnotationTrainer:
    data = data if data is not None else make_data()
    model_cfg = ModelConfig(**{"d_model": 32, "n_layers": 2, "n_heads": 4, "max_positions": 64, **(model or {})})
    tokenizer = tokenizer if tokenizer is not None else TopKTokenizer(data, model_cfg.d_model)
    trainer_cfg = TrainerConfig(**{"batch_size": 32, "max_epochs": 6, "device": "cpu", "seed": 7, **trainer})
    return AnnotationTrainer(data, tokenizer, model_cfg, OptimizerConfig(**{"lr": 5e-3, **(optim or {})}),
                             SchedulerConfig(**(sched or {})), trainer_cfg, run_dir)


def without_timings(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k not in TIMING_KEYS} for h in history]


def assert_same_test(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], np.ndarray):
            np.testing.assert_array_equal(a[key], b[key])
        else:
            assert a[key] == b[key], key


@pytest.fixture(autouse=True)
def _few_threads():
    # Shared 2-core machines: one intra-op thread keeps the tests fast and deterministic.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------


def test_tiny_run_learns_above_chance_and_reports_metrics(tmp_path):
    calls = []
    trainer = make_trainer(tmp_path / "run", max_epochs=12, early_stopping=False, bucket_by_length=True)
    trainer.on_batch = lambda done, total, rate: calls.append((done, total, rate))
    history = trainer.fit()
    assert len(history) == 12 and history[-1]["should_stop"]
    assert set(history[0]) == STEP_KEYS
    assert [h["epoch"] for h in history] == list(range(1, 13))
    best = max(h["val_mcc"] for h in history)
    assert best > 0.6 and max(h["val_accuracy"] for h in history) > 0.75  # chance is 1/3
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    first_best = 1 + [h["val_mcc"] for h in history].index(best)
    assert history[-1]["best_epoch"] == first_best and history[-1]["best_val_mcc"] == best
    assert 0.0 < history[0]["padded_fraction"] < 0.5 and 0.0 <= history[0]["data_fraction"] < 1.0
    assert history[0]["lr"] > 0 and history[-1]["lr"] < max(h["lr"] for h in history)  # cosine decays
    assert calls[-1][:2] == (144, 144) and all(c[2] > 0 for c in calls)

    result = trainer.test()
    assert set(result) == TEST_KEYS
    assert result["test_accuracy"] > 0.7 and result["test_n_cells"] == 48
    assert result["class_names"] == ["type_0", "type_1", "type_2"]
    cm = result["test_confusion_matrix"]
    assert cm.shape == (3, 3) and cm.sum() == 48 and cm.dtype == np.int64
    np.testing.assert_allclose(result["test_per_class_accuracy"], np.diag(cm) / cm.sum(1))
    np.testing.assert_allclose(np.trace(cm) / cm.sum(), result["test_accuracy"], rtol=1e-6)
    assert trainer.test() is result  # scored once
    with pytest.raises(TokbenchError, match="already"):
        trainer.step()


def test_early_stopping_triggers_when_validation_never_improves(tmp_path):
    data = make_data()
    # A blind embedder without positions makes every cell look alike: the MCC stays at 0.
    tok = TopKTokenizer(data, 32, blind=True)
    model = {"dropout": 0.0, "pos_encoding": "none"}
    trainer = make_trainer(tmp_path, data, tok, model=model, max_epochs=20, patience=2, min_epochs=1)
    history = trainer.fit()
    assert len(history) == 3
    assert [h["should_stop"] for h in history] == [False, False, True]
    assert history[-1]["best_epoch"] == 1


def test_early_stopping_waits_for_min_epochs_even_at_mcc_zero(tmp_path):
    data = make_data()
    tok = TopKTokenizer(data, 32, blind=True)
    model = {"dropout": 0.0, "pos_encoding": "none"}
    trainer = make_trainer(tmp_path, data, tok, model=model, max_epochs=20, patience=2, min_epochs=6)
    history = trainer.fit()
    # A blind model predicts one class: MCC 0 from the first epoch, patience spent by epoch 3.
    assert all(h["val_mcc"] == 0.0 and h["val_predicted_classes"] == 1 for h in history)
    assert history[0]["val_true_classes"] == 3
    assert len(history) == 6
    assert [h["should_stop"] for h in history] == [False] * 5 + [True]
    result = trainer.test()
    assert result["test_predicted_classes"] == 1 and result["test_true_classes"] == 3
    assert degenerate_splits({**history[result["best_epoch"] - 1], **result}) == ["val", "test"]


def test_early_stopping_state_resumes_with_min_epochs():
    stopper = EarlyStopping(patience=1, min_epochs=3)
    for epoch in (1, 2):
        stopper.update(epoch, 0.0)
    assert not stopper.should_stop  # patience is spent, min_epochs not reached
    restored = EarlyStopping(patience=1, min_epochs=3)
    restored.load_state_dict(stopper.state_dict())
    restored.update(3, 0.0)
    assert restored.should_stop
    legacy = {k: v for k, v in stopper.state_dict().items() if k != "last_epoch"}
    restored.load_state_dict(legacy)  # a checkpoint from before min_epochs existed
    assert restored.last_epoch == 2


@pytest.mark.parametrize(
    "metrics, expected",
    [
        ({"val_predicted_classes": 1, "val_true_classes": 3, "test_predicted_classes": 2, "test_true_classes": 3}, ["val"]),
        ({"val_predicted_classes": 3, "val_true_classes": 3, "test_predicted_classes": 1, "test_true_classes": 2}, ["test"]),
        ({"val_predicted_classes": 1, "val_true_classes": 1, "test_predicted_classes": 1, "test_true_classes": 1}, []),
        ({"test_predicted_classes": 1, "test_confusion_matrix": np.array([[4, 0], [3, 0]])}, ["test"]),
        ({"test_predicted_classes": 1, "test_confusion_matrix": np.array([[4, 0], [0, 0]])}, []),
        ({}, []),
    ],
)
def test_degenerate_splits_need_one_predicted_class_among_several_true(metrics, expected):
    assert degenerate_splits(metrics) == expected


def test_test_scores_the_best_validation_weights(tmp_path):
    # min_delta=1 makes epoch 1 the best epoch whatever happens later (MCC <= 1).
    snapshots = []
    long = make_trainer(tmp_path / "a", max_epochs=4, early_stopping=False, min_delta=1.0)
    long.fit(on_epoch=lambda _: snapshots.append({k: v.clone() for k, v in long.model.state_dict().items()}))
    assert long.history[-1]["best_epoch"] == 1
    assert not torch.equal(snapshots[0]["head.weight"], snapshots[-1]["head.weight"])
    result = long.test()
    for name, tensor in long.model.state_dict().items():
        torch.testing.assert_close(tensor, snapshots[0][name], rtol=0, atol=0)

    # The same run stopped after epoch 1 has those same weights; its test score must match.
    short = make_trainer(tmp_path / "b", max_epochs=4, early_stopping=False, min_delta=1.0)
    short.step()
    assert_same_test(short.test(), result)


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path):
    kw = dict(max_epochs=4, early_stopping=False, bucket_by_length=True, bucket_batches=2)
    full = make_trainer(tmp_path / "full", **kw)
    full.fit()
    full_test = full.test()

    first = make_trainer(tmp_path / "resumed", **kw)
    first.step()
    first.step()
    first.save_checkpoint()
    torch.manual_seed(999)  # whatever happened to the RNGs in between must not matter
    np.random.seed(999)
    second = make_trainer(tmp_path / "resumed", **kw)
    second.load_checkpoint()
    assert second.epoch == 2
    second.fit()
    assert without_timings(second.history) == without_timings(full.history)
    assert_same_test(second.test(), full_test)


def test_data_loader_workers_give_the_same_epoch_as_the_main_process(tmp_path):
    a = make_trainer(tmp_path / "a", max_epochs=2).step()
    b = make_trainer(tmp_path / "b", max_epochs=2, num_workers=1).step()
    assert without_timings([a]) == without_timings([b])


def test_checkpoints_are_atomic_and_stay_in_the_run_dir(tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    run_dir = tmp_path / "runs" / "trial_0"
    trainer = make_trainer(run_dir, max_epochs=3)
    trainer.step()
    path = trainer.save_checkpoint()
    assert path == run_dir / "trainer.pt"
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()) == [Path("runs/trial_0/trainer.pt")]

    trainer.step()

    def crash_midway(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(loop.torch, "save", crash_midway)
    with pytest.raises(OSError):
        trainer.save_checkpoint()
    monkeypatch.undo()
    assert [p.name for p in run_dir.iterdir()] == ["trainer.pt"]  # no temp file left behind
    restored = make_trainer(run_dir, max_epochs=3)
    restored.load_checkpoint()
    assert restored.epoch == 1  # the earlier complete checkpoint survived

    with pytest.raises(TokbenchError, match="no checkpoint"):
        make_trainer(tmp_path / "elsewhere").load_checkpoint()


def test_lr_schedule_warms_up_then_decays():
    total, warmup = 100, 10
    factors = [lr_factor(s, total, warmup, "cosine", 0.1) for s in range(total)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))
    assert factors[-1] == pytest.approx(0.1, abs=0.01)
    assert lr_factor(50, total, warmup, "constant", 0.0) == 1.0


def test_epoch_order_depends_only_on_seed_and_epoch():
    cells = np.arange(100)
    lengths = np.random.default_rng(0).integers(1, 50, 100)
    a = epoch_batches(cells, 8, seed=3, epoch=2, lengths=lengths, bucket_batches=4)
    b = epoch_batches(cells, 8, seed=3, epoch=2, lengths=lengths, bucket_batches=4)
    c = epoch_batches(cells, 8, seed=3, epoch=3, lengths=lengths, bucket_batches=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    assert sorted(np.concatenate(a).tolist()) == list(range(100))
    # bucketing: within each batch lengths are close compared with a random batch
    spread = np.mean([np.ptp(lengths[x]) for x in a])
    plain = epoch_batches(cells, 8, seed=3, epoch=2)
    assert spread < np.mean([np.ptp(lengths[x]) for x in plain])


def test_confusion_report_files(tmp_path):
    cm = np.array([[5, 1, 0], [0, 0, 0], [2, 0, 3]])
    result = {"class_names": ["B cell", "T cell", "NK"], "test_confusion_matrix": cm}
    paths = write_confusion_report(result, tmp_path)
    assert paths["confusion_png"].read_bytes()[:4] == b"\x89PNG"
    rows = list(csv.reader(paths["confusion_csv"].open()))
    assert rows[0] == ["true \\ predicted", "B cell", "T cell", "NK"] and rows[3] == ["NK", "2", "0", "3"]
    per_class = list(csv.reader(paths["per_class_csv"].open()))
    assert per_class[1] == ["B cell", "6", "5", "0.833333"] and per_class[2][3] == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths.values())


# -- errors before training -----------------------------------------------------------------


def _split(n, train=0.6, val=0.2):
    split = np.full(n, 2, dtype=np.int8)
    split[: int(train * n)] = 0
    split[int(train * n) : int((train + val) * n)] = 1
    return split


@pytest.mark.parametrize(
    "case, match",
    [
        ("one_class", "single cell type"),
        ("empty_train", "training split is empty"),
        ("empty_val", "validation split is empty"),
        ("batch_size", r"trainer\.batch_size"),
        ("heads", r"model\.n_heads"),
        ("track_metric", r"trainer\.track_metric.*'mcc'"),
        ("scheduler", r"scheduler\.name.*'cosine'"),
    ],
)
def test_invalid_setups_fail_before_training(tmp_path, case, match):
    n = 60
    labels = np.arange(n) % N_CLASSES
    data_kw, model, sched, trainer = {}, None, None, {}
    if case == "one_class":
        labels = np.where(np.arange(n) < 36, 0, labels)  # the first 36 cells form the training split
        data_kw = {"labels": labels}
    elif case == "empty_train":
        data_kw = {"labels": labels, "split": np.where(_split(n) == 0, 1, _split(n))}
    elif case == "empty_val":
        data_kw = {"labels": labels, "split": np.where(_split(n) == 1, 0, _split(n))}
    elif case == "batch_size":
        trainer = {"batch_size": 0}
    elif case == "heads":
        model = {"d_model": 30, "n_heads": 4}
    elif case == "track_metric":
        trainer = {"track_metric": "f1"}
    elif case == "scheduler":
        sched = {"name": "linear"}
    data = make_data(n, **data_kw)
    tokenizer = TopKTokenizer(data, 32)
    with pytest.raises(TokbenchError, match=match):
        make_trainer(tmp_path, data, tokenizer, model=model, sched=sched, **trainer)
    assert not any(tmp_path.iterdir())


def test_trainer_config_errors_name_the_key():
    with pytest.raises(TokbenchError, match=r"trainer\.amp: 'fp16'.*'bf16'"):
        validate_trainer_config(TrainerConfig(amp="fp16"))
    with pytest.raises(TokbenchError, match=r"trainer\.device"):
        validate_trainer_config(TrainerConfig(device="gpu"))
    with pytest.raises(TokbenchError, match=r"trainer\.min_epochs: 0 must be >= 1"):
        validate_trainer_config(TrainerConfig(min_epochs=0))
    with pytest.raises(TokbenchError, match=r"bf16"):
        make_trainer("unused", amp="bf16")  # CPU has no bf16 autocast here
