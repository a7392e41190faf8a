"""`tokbench train`: one experiment end to end, recorded in MLflow; config errors; resume."""

from __future__ import annotations

import logging

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import tiny_overrides
from tokbench.cli import main
from tokbench.errors import TokbenchError
from tokbench.train_command import train
from tokbench.tracking.record import run_tags
from tokbench.training.experiment import experiment_path, load_experiment
from tokbench.model.transformer import CellClassifier
from tokbench.training.loop import AnnotationTrainer

ARTIFACTS = {"test_confusion_matrix.png", "test_confusion_matrix.csv", "test_per_class.csv", "config.yaml", "history.csv", "best_model.pt"}


def only_run(tmp_path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cross_tissue")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


@pytest.mark.parametrize(
    "preset, extra, expected",
    [
        ("geneformer", ["fe=zero"], {"fe": "zero", "order": "expression", "select": "truncate"}),
        ("scgpt", ["fe=bin_scgpt", "fe.n_bins=11"], {"fe": "bin_scgpt", "select": "sample"}),
        ("scbert", ["fe=bin_scbert"], {"fe": "bin_scbert", "order": "gene_index"}),
        ("uce", ["fe=zero", "fg=pretrained"], {"fg": "pretrained", "order": "chromosome", "select": "weighted_sample"}),
    ],
)
def test_presets_train_and_land_in_mlflow(tiny_atlas, tmp_path, preset, extra, expected):
    result = train("cross_tissue", tiny_overrides(tiny_atlas, tmp_path) + [f"fc={preset}", f"run_dir={tmp_path / 'run'}", *extra], progress=False)
    assert 0.0 <= result["test_accuracy"] <= 1.0
    client, run = only_run(tmp_path)
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["fc"] == preset and tags["preset"] == preset  # fc=NAME comes after fc.select.size=48
    for key, value in expected.items():
        assert tags[key] == value
    assert tags["dataset"] == "synthetic_atlas" and tags["split"] == "cross_tissue:blood+lung+gut->brain"
    assert tags["seed"] == "55" and tags["end_state"] == "completed"
    assert run.data.params["model.d_model"] == "16" and run.data.params["fc.name"] == preset
    history = client.get_metric_history(run.info.run_id, "val_mcc")
    assert [m.step for m in history] == [1, 2]
    assert run.data.metrics["test_mcc"] == pytest.approx(result["test_mcc"])
    for key in ("train_loss", "val_accuracy", "val_macro_f1", "cells_per_second", "epoch_seconds", "padded_fraction"):
        assert key in run.data.metrics
    names = {a.path.split("/")[-1] for a in client.list_artifacts(run.info.run_id)}
    assert ARTIFACTS <= names


def test_baseline_trains_and_lands_in_mlflow(tiny_atlas, tmp_path):
    result = train("cross_tissue", tiny_overrides(tiny_atlas, tmp_path) + ["method=logreg", "baseline.Cs=[0.1,1.0]"], progress=False)
    client, run = only_run(tmp_path)
    assert run.data.tags["tokenizer"] == "baseline:logreg" and run.data.tags["method"] == "logreg"
    assert run.data.tags["degenerate"] == "no" and run.data.tags["epochs_run"] == "1"
    assert run.data.metrics["test_mcc"] == pytest.approx(result["test_mcc"])
    assert run.data.metrics["C"] in (0.1, 1.0) and "cv_mcc" in run.data.metrics
    assert result["test_accuracy"] > 0.3  # the atlas transfers partly across tissues
    assert ARTIFACTS <= {a.path.split("/")[-1] for a in client.list_artifacts(run.info.run_id)}


def test_a_model_that_predicts_one_class_is_flagged(tiny_atlas, tmp_path, monkeypatch, caplog):
    original = CellClassifier.forward

    def always_the_first_class(self, sentences):
        logits = original(self, sentences)
        favourite = torch.zeros(logits.shape[-1], device=logits.device)
        favourite[0] = 10.0
        return logits * 0 + favourite  # still a graph, so the loop trains as usual

    monkeypatch.setattr(CellClassifier, "forward", always_the_first_class)
    with caplog.at_level(logging.WARNING, logger="tokbench"):
        result = train("cross_tissue", tiny_overrides(tiny_atlas, tmp_path), progress=False)
    _, run = only_run(tmp_path)
    assert run.data.tags["degenerate"] == "val+test"
    assert result["test_predicted_classes"] == 1 and result["test_true_classes"] > 1
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "degenerate" in r.getMessage()]
    assert len(warning) == 1
    first = result["class_names"][0]
    assert f"val (every cell called {first!r}" in warning[0] and f"test (every cell called {first!r}" in warning[0]


def test_crash_marks_failed_and_resume_matches_uninterrupted_run(tiny_atlas, tmp_path, monkeypatch):
    common = tiny_overrides(tiny_atlas, tmp_path) + ["trainer.max_epochs=3", "trainer.early_stopping=false"]
    straight = train("cross_tissue", common + [f"run_dir={tmp_path / 'straight'}"], progress=False)

    original = AnnotationTrainer.step

    def crash_in_third_epoch(self):
        if self.epoch == 2:
            raise RuntimeError("node lost")
        return original(self)

    monkeypatch.setattr(AnnotationTrainer, "step", crash_in_third_epoch)
    interrupted = tmp_path / "interrupted"
    with pytest.raises(RuntimeError, match="node lost"):
        train("cross_tissue", common + [f"run_dir={interrupted}"], progress=False)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = (interrupted / "mlflow_run_id").read_text()
    assert client.get_run(run_id).info.status == "FAILED"

    monkeypatch.setattr(AnnotationTrainer, "step", original)
    resumed = train("cross_tissue", common + [f"run_dir={interrupted}"], resume=str(interrupted), progress=False)
    assert resumed["test_mcc"] == straight["test_mcc"] and resumed["test_accuracy"] == straight["test_accuracy"]
    run = client.get_run(run_id)  # the same MLflow run continued
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "val_mcc")] == [1, 2, 3]


def test_resume_refuses_a_different_configuration(tiny_atlas, tmp_path):
    base = tiny_overrides(tiny_atlas, tmp_path) + [f"run_dir={tmp_path / 'run'}", "trainer.max_epochs=1"]
    train("cross_tissue", base, progress=False)
    with pytest.raises(TokbenchError, match=r"belongs to a different configuration \(differs in optimizer.lr\)"):
        train("cross_tissue", base + ["optimizer.lr=0.1"], resume=str(tmp_path / "run"), progress=False)


def test_test_metrics_come_from_the_best_validation_epoch(tiny_atlas, tmp_path):
    cfg_overrides = tiny_overrides(tiny_atlas, tmp_path) + ["trainer.max_epochs=4", "trainer.early_stopping=false", "optimizer.lr=0.05"]
    result = train("cross_tissue", cfg_overrides + [f"run_dir={tmp_path / 'run'}"], progress=False)
    state = torch.load(tmp_path / "run" / "trainer.pt", weights_only=True)
    vals = [row["val_mcc"] for row in state["history"]]
    assert result["best_epoch"] == 1 + max(range(len(vals)), key=lambda i: (vals[i], -i))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.d_modle=64"], r"model.d_modle: Key 'd_modle' not in 'ModelConfig'"),
        (["trainer.batch_size=many"], r"trainer.batch_size: Value 'many' of type 'str' could not be converted to Integer"),
        (["trainer.batch_size=0"], r"trainer.batch_size: 0 must be >= 1"),
        (["model.d_model=30", "model.n_heads=4"], r"model.n_heads: d_model 30 is not divisible by n_heads 4"),
        (["fc=word2vec"], r"unknown fc preset 'word2vec'; valid: geneformer"),
        (["fc.select.size=0"], r"fc.select"),
        (["tracking.uri=http://127.0.0.1:9"], r"tracking.uri 'http://127.0.0.1:9': MLflow server not reachable"),
        (["split.train=[blood]", "split.test=[brain]", "dataset.label_key=tissue"], r"single cell type \('blood'\)"),
        (["justaword"], r"override 'justaword': expected KEY=VALUE"),
    ],
)
def test_bad_configuration_fails_before_training(tiny_atlas, tmp_path, overrides, message):
    with pytest.raises(TokbenchError, match=message):
        train("cross_tissue", tiny_overrides(tiny_atlas, tmp_path) + overrides, progress=False)


@pytest.mark.parametrize(
    "overrides, split_tag",
    [
        ([], "cross_tissue:blood+lung+gut->brain"),
        (["split.val_from=test"], "cross_tissue:blood+lung+gut->brain,val=brain"),
        (["split.train=[blood,lung]", "split.val=[gut]"], "cross_tissue:blood+lung->brain,val=gut"),
    ],
)
def test_split_tag_says_where_validation_comes_from(tiny_atlas, tmp_path, overrides, split_tag):
    cfg = load_experiment(experiment_path("cross_tissue"), tiny_overrides(tiny_atlas, tmp_path) + overrides)
    assert run_tags(cfg)["split"] == split_tag


def test_missing_required_value_names_its_key():
    with pytest.raises(TokbenchError, match=r"dataset.path: missing required value"):
        load_experiment(None)


def test_cli_prints_one_line_errors(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "nope.yaml: no such file" in err


def test_a_bad_configuration_prints_one_line_and_no_progress_bar(tiny_atlas, tmp_path, capsys):
    # Found while the data is prepared, after the config loaded and the MLflow run opened:
    # the progress bar (on, as a user gets it) must not have been drawn yet.
    overrides = tiny_overrides(tiny_atlas, tmp_path) + ["split.train=[blood]", "split.test=[brain]",
                                                        "dataset.label_key=tissue"]
    assert main(["train", "cross_tissue", *overrides]) == 2
    captured = capsys.readouterr()
    # MLflow's own logger notes that it created the new store's tables; everything else is ours.
    ours = [line for line in captured.err.splitlines() if " INFO mlflow." not in line]
    assert len(ours) == 1 and ours[0].startswith("error: ") and "single cell type ('blood')" in ours[0]
    assert "cell/s" not in captured.err + captured.out and "0cell" not in captured.err + captured.out
