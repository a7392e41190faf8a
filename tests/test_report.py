"""``tokbench report``: statistics on hand-made tables, the page from hand-made MLflow stores
(bad input: unknown ids, nothing finished, missing metrics, unreachable stores), and the
page of a real small sweep checked against MLflow's own numbers and in headless Chromium."""

from __future__ import annotations

import math
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import chromium_driver
from tokbench.cli import main
from tokbench.errors import TokbenchError
from tokbench.report import build_report, publish_sweep_report, stats, watch
from tokbench.report.collect import TRIAL_COLUMNS
from tokbench.report.page import dashboards_dir, load_figure_specs
from tokbench.tracking.mlflow_runs import RunLogger
from tokbench.tracking.reading import RunRecord, open_tracking
from tokbench.training.metrics import write_confusion_report

FIGURE_IDS = [spec.id for spec in load_figure_specs()]


@pytest.fixture(autouse=True)
def _artifacts_in_tmp(tmp_path, monkeypatch):
    # A new SQLite-backed experiment stores artifacts under ./mlruns: keep them out of the checkout.
    monkeypatch.chdir(tmp_path)


# --------------------------------------------------------------------------- hand-made tables


def trial_table(rows: list[dict]) -> pd.DataFrame:
    """A trial table as ``collect`` builds it, from a few given columns per row."""
    defaults = {column: None for column in TRIAL_COLUMNS}
    defaults.update(baseline=False, fg="learned", fe="zero", fc="geneformer", order="expression",
                    select="truncate", combine="sum", status="FINISHED", end_state="completed", finished=True,
                    epochs_run=4, max_epochs=4, test_mcc=math.nan, test_accuracy=math.nan, val_mcc_best=math.nan,
                    train_seconds=1.0, wall_seconds=2.0)
    frame = pd.DataFrame([{**defaults, **row} for row in rows], columns=TRIAL_COLUMNS)
    frame["run_id"] = [f"run{i}" for i in range(len(frame))]
    return frame


def two_tokenizers() -> pd.DataFrame:
    rows = []
    for seed, (a, b, base) in enumerate([(0.6, 0.4, 0.3), (0.7, 0.5, 0.2), (0.8, 0.45, 0.25)]):
        rows.append({"tokenizer": "A", "seed": seed, "test_mcc": a, "test_accuracy": a + 0.1, "val_mcc_best": a + 0.2})
        rows.append({"tokenizer": "B", "fg": "pretrained", "fc": "scgpt", "order": "random", "select": "sample",
                     "seed": seed, "test_mcc": b, "test_accuracy": b + 0.1, "val_mcc_best": b + 0.3})
        rows.append({"tokenizer": "baseline:logreg", "baseline": True, **{p: "-" for p in ("fg", "fe", "fc", "order", "select", "combine")},
                     "seed": seed, "test_mcc": base, "test_accuracy": base, "val_mcc_best": base})
    return trial_table(rows)


def test_leaderboard_means_sds_and_gap_over_seeds():
    board = stats.leaderboard(two_tokenizers()).set_index("tokenizer")
    assert list(board.index) == ["A", "B", "baseline:logreg"]  # best test MCC first
    assert board.loc["A", "test_mcc_mean"] == pytest.approx(0.7)
    assert board.loc["A", "test_mcc_sd"] == pytest.approx(np.std([0.6, 0.7, 0.8], ddof=1))
    assert board.loc["B", "val_mcc_mean"] == pytest.approx(np.mean([0.7, 0.8, 0.75]))
    assert board.loc["B", "gap"] == pytest.approx(0.3)
    assert board.loc["A", "seeds"] == 3


def test_an_unscored_trial_is_counted_apart_and_a_missing_metric_stays_missing():
    trials = two_tokenizers()
    trials.loc[(trials["tokenizer"] == "B") & (trials["seed"] == 1), "test_mcc"] = math.nan
    trials.loc[(trials["tokenizer"] == "A") & (trials["seed"] == 2), "test_accuracy"] = math.nan
    trials = pd.concat([trials, trial_table([{"tokenizer": "D", "seed": 0, "test_accuracy": 0.9}])], ignore_index=True)
    board = stats.leaderboard(trials).set_index("tokenizer")
    # B's unscored trial contributes nothing, not even its accuracy, and is counted apart.
    assert board.loc["B", "test_mcc_mean"] == pytest.approx(0.425)
    assert board.loc["B", "test_accuracy_mean"] == pytest.approx(0.525)
    assert board.loc["B", ["trials", "seeds", "unscored"]].tolist() == [2, 2, 1]
    assert math.isnan(board.loc["B", "test_mcc_ci_low"]) and board.loc["B", "interval_note"] == stats.NO_INTERVAL
    # A counted trial without an accuracy makes the mean accuracy missing, never a mean of fewer.
    assert math.isnan(board.loc["A", "test_accuracy_mean"]) and board.loc["A", "test_mcc_mean"] == pytest.approx(0.7)
    # A tokenizer with no scored trial keeps its row, missing, last.
    assert board.index[-1] == "D" and math.isnan(board.loc["D", "test_mcc_mean"]) and board.loc["D", "unscored"] == 1
    effects = stats.main_effects(stats.leaderboard(trials)).set_index(["factor", "level"])
    assert effects.loc[("fg", "pretrained"), "test_mcc_mean"] == pytest.approx(0.425)


def test_running_and_failed_trials_are_counted_but_not_averaged():
    trials = pd.concat([two_tokenizers(), trial_table([
        {"tokenizer": "A", "seed": 9, "status": "RUNNING", "end_state": "running", "finished": False, "test_mcc": -1.0},
        {"tokenizer": "A", "seed": 8, "status": "FAILED", "end_state": "failed", "finished": False, "test_mcc": -1.0},
    ])], ignore_index=True)
    row = stats.leaderboard(trials).set_index("tokenizer").loc["A"]
    assert row["test_mcc_mean"] == pytest.approx(0.7)
    assert (row["running"], row["failed"], row["trials"]) == (1, 1, 3)


def test_main_effects_weight_each_tokenizer_equally():
    rows = []
    for tokenizer, fg, fe, score in [("l/z", "learned", "zero", 0.2), ("l/b", "learned", "bin", 0.4),
                                     ("p/z", "pretrained", "zero", 0.6), ("p/b", "pretrained", "bin", 0.9)]:
        seeds = 1 if tokenizer == "l/z" else 3  # unequal seed counts must not weight the average
        rows += [{"tokenizer": tokenizer, "fg": fg, "fe": fe, "seed": s, "test_mcc": score} for s in range(seeds)]
    effects = stats.main_effects(stats.leaderboard(trial_table(rows))).set_index(["factor", "level"])
    assert effects.loc[("fg", "learned"), "test_mcc_mean"] == pytest.approx(0.3)
    assert effects.loc[("fe", "zero"), "test_mcc_mean"] == pytest.approx(0.4)
    assert effects.loc[("fe", "bin"), "test_mcc_sd"] == pytest.approx(np.std([0.4, 0.9], ddof=1))
    assert effects.loc[("combine", "sum"), "tokenizers"] == 4


def test_heatmap_holds_one_cell_per_fe_fg_fc_without_the_baseline():
    grid = stats.heatmap_table(stats.leaderboard(two_tokenizers()))
    assert set(map(tuple, grid[["fe", "fg", "fc"]].to_numpy())) == {("zero", "learned", "geneformer"), ("zero", "pretrained", "scgpt")}
    assert grid.set_index("fg").loc["learned", "test_mcc_mean"] == pytest.approx(0.7)


def test_bootstrap_interval_is_scipys_and_needs_three_replicates():
    from scipy.stats import bootstrap

    values = np.array([0.1, 0.3, 0.2, 0.5, 0.4])
    mean, low, high = stats.bootstrap_mean_ci(values, n_resamples=2000, seed=3)
    ours = bootstrap((values,), np.mean, n_resamples=2000, confidence_level=0.95, rng=np.random.default_rng(3))
    assert (low, high) == (pytest.approx(ours.confidence_interval.low), pytest.approx(ours.confidence_interval.high))
    assert mean == pytest.approx(0.3) and low < mean < high
    assert stats.bootstrap_mean_ci(values, seed=3) == stats.bootstrap_mean_ci(values, seed=3)  # reproducible
    # Two seeds: the percentile bootstrap would only restate [min, max]; no interval at all.
    mean, low, high = stats.bootstrap_mean_ci([0.2, 0.6])
    assert mean == pytest.approx(0.4) and math.isnan(low) and math.isnan(high)
    assert all(math.isnan(v) for v in stats.bootstrap_mean_ci([0.1, math.nan, 0.3]))
    assert stats.bootstrap_mean_ci([0.2, 0.2, 0.2])[1:] == (pytest.approx(0.2), pytest.approx(0.2))
    diff, low, high = stats.bootstrap_diff_ci([0.5, 0.6, 0.7], [0.1, 0.2, 0.3], n_resamples=2000, seed=1)
    theirs = bootstrap(([0.5, 0.6, 0.7], [0.1, 0.2, 0.3]), lambda a, b, axis: a.mean(axis) - b.mean(axis),
                       n_resamples=2000, rng=np.random.default_rng(1)).confidence_interval
    assert diff == pytest.approx(0.4) and (low, high) == (pytest.approx(theirs.low), pytest.approx(theirs.high))
    assert math.isnan(stats.bootstrap_diff_ci([0.5, 0.6, 0.7], [0.1, 0.2])[1])


def test_pairwise_pairs_by_seed_with_t_test_and_power_and_falls_back_to_unpaired():
    from scipy.stats import ttest_ind, ttest_rel
    from statsmodels.stats.power import TTestPower

    trials = pd.concat([two_tokenizers(), trial_table([
        {"tokenizer": "C", "seed": 7, "test_mcc": 0.1}, {"tokenizer": "C", "seed": 8, "test_mcc": 0.3}])], ignore_index=True)
    best = stats.best_tokenizer(stats.leaderboard(trials))
    assert best == "A"
    pairs = stats.pairwise_vs_best(trials, best).set_index("other")
    a, b = [0.6, 0.7, 0.8], [0.4, 0.5, 0.45]
    assert pairs.loc["B", "paired"] and pairs.loc["B", "n"] == 3 and pairs.loc["B", "test"] == "paired t-test"
    assert pairs.loc["B", "mean_diff"] == pytest.approx(np.mean([0.2, 0.2, 0.35]))
    assert pairs.loc["B", "ci_low"] <= pairs.loc["B", "mean_diff"] <= pairs.loc["B", "ci_high"]
    assert pairs.loc["B", "p_value"] == pytest.approx(ttest_rel(a, b).pvalue)
    diffs = np.subtract(a, b)
    dz = diffs.mean() / diffs.std(ddof=1)
    assert pairs.loc["B", "effect_size"] == pytest.approx(dz)
    assert pairs.loc["B", "seeds_for_power"] == math.ceil(TTestPower().solve_power(dz, alpha=0.05, power=0.8))
    # C shares no seed with A: unpaired, Welch's test, and with two seeds no interval.
    assert not pairs.loc["C", "paired"] and pairs.loc["C", "mean_diff"] == pytest.approx(0.7 - 0.2)
    assert pairs.loc["C", "p_value"] == pytest.approx(ttest_ind(a, [0.1, 0.3], equal_var=False).pvalue)
    assert math.isnan(pairs.loc["C", "ci_low"]) and pairs.loc["C", "interval_note"] == stats.NO_INTERVAL
    # The leaderboard carries the same comparison.
    board = stats.leaderboard(trials).set_index("tokenizer")
    assert board.loc["B", "p_vs_best"] == pytest.approx(pairs.loc["B", "p_value"]) and board.loc["B", "n_vs_best"] == 3
    assert pd.isna(board.loc["A", "p_vs_best"])
    assert stats.seeds_for_power(0.0) != stats.seeds_for_power(0.0)  # no difference: no seed count
    assert stats.seeds_for_power(50.0) in (2, 3)  # where the solver fails, whole counts are tried


def test_best_tokenizer_is_never_the_baseline_unless_alone():
    board = stats.leaderboard(two_tokenizers())
    board.loc[board["baseline"], "test_mcc_mean"] = 0.99
    assert stats.best_tokenizer(board) == "A"
    only = stats.leaderboard(two_tokenizers()[lambda t: t["baseline"]])
    assert stats.best_tokenizer(only) == "baseline:logreg"
    assert stats.best_tokenizer(stats.leaderboard(trial_table([]))) is None


def test_compute_counts_epochs_asha_saved():
    trials = trial_table([
        {"tokenizer": "A", "seed": 0, "epochs_run": 8, "max_epochs": 8, "train_seconds": 4.0},
        {"tokenizer": "A", "seed": 1, "epochs_run": 2, "max_epochs": 8, "end_state": "stopped_early", "train_seconds": 1.0},
        # stopped by its own early stopping (patience): not ASHA's saving
        {"tokenizer": "B", "seed": 0, "epochs_run": 5, "max_epochs": 8, "train_seconds": math.nan},
    ])
    table = stats.compute_table(trials).set_index("tokenizer")
    assert table.loc["A", ["epochs_run", "epoch_budget", "epochs_saved_by_asha", "stopped_early"]].tolist() == [10, 16, 6, 1]
    assert table.loc["A", "train_seconds"] == pytest.approx(5.0)
    assert table.loc["B", "epochs_saved_by_asha"] == 0 and math.isnan(table.loc["B", "train_seconds"])


# --------------------------------------------------------------------------- hand-made MLflow stores


def hand_made_sweep(uri: str, sweep_id: str, trials: list[dict], experiment: str = "hand") -> str:
    """A sweep written to MLflow the way the sweep callback writes one; returns the parent run id."""
    parent = RunLogger(uri, experiment, run_name=sweep_id, tags={"sweep_id": sweep_id, "tokbench.kind": "sweep"})
    with tempfile.TemporaryDirectory() as tmp:
        sweep_file = Path(tmp) / "sweep.yaml"
        sweep_file.write_text(yaml.safe_dump({"name": sweep_id, "seeds": [0, 1], "max_epochs": 3}))
        parent.log_artifacts([sweep_file])
    for i, trial in enumerate(trials):
        baseline = trial["tokenizer"].startswith("baseline")
        parts = dict(zip(("fg", "fe", "fc"), trial["tokenizer"].split("/"))) if not baseline else {"fg": "-", "fe": "-", "fc": "-"}
        child = RunLogger(uri, experiment, run_name=f"{trial['tokenizer']} seed={trial['seed']}", parent_run_id=parent.run_id)
        child.log_params({"method": "logreg" if baseline else "transformer", "trainer.max_epochs": 3, "baseline.max_epochs": 3})
        tags = {**parts, "order": "expression", "select": "truncate", "combine": "sum", "tokenizer": trial["tokenizer"],
                "method": "logreg" if baseline else "transformer", "dataset": "hand_atlas", "split": "cross_tissue:a->b",
                "seed": trial["seed"], "sweep_id": sweep_id, "trial_id": f"t{i}", "combination": trial["tokenizer"],
                "end_state": trial.get("end_state", "completed"), "epochs_run": len(trial["val_mcc"])}
        child.set_tags(tags)
        for epoch, value in enumerate(trial["val_mcc"], start=1):
            child.log_metrics({"val_mcc": value, "epoch_seconds": 0.5}, step=epoch)
        child.log_metrics({f"final_{k}": v for k, v in trial.get("test", {}).items()})
        if trial.get("confusion"):
            with tempfile.TemporaryDirectory() as tmp:
                files = write_confusion_report({"class_names": ["B cell", "T cell", "monocyte"],
                                                "test_confusion_matrix": np.array([[5, 1, 0], [2, 6, 0], [0, 0, 4]])}, tmp)
                child.log_artifacts(files.values())
        if trial.get("end_state", "completed") != "running":
            child.end("FINISHED")
    parent.end("FINISHED")
    return parent.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One hand-made sweep for the module's tests, which only read it."""
    folder = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    cwd = os.getcwd()
    os.chdir(folder)  # artifacts under ./mlruns land here
    try:
        hand_made_sweep(uri, "hand-1", [
            {"tokenizer": "learned/zero/geneformer", "seed": 0, "val_mcc": [0.2, 0.6, 0.5], "test": {"test_mcc": 0.4, "test_accuracy": 0.6}},
            # the best trial: its confusion matrix is the one shown
            {"tokenizer": "learned/zero/geneformer", "seed": 1, "val_mcc": [0.3, 0.4, 0.7], "test": {"test_mcc": 0.5, "test_accuracy": 0.7}, "confusion": True},
            {"tokenizer": "pretrained/zero/geneformer", "seed": 0, "val_mcc": [0.1], "end_state": "stopped_early", "test": {"test_mcc": 0.1, "test_accuracy": 0.3}},
            # finished, but its test score was never logged: "missing" on the page, never 0
            {"tokenizer": "pretrained/zero/geneformer", "seed": 1, "val_mcc": [0.2, 0.3, 0.3], "test": {"test_accuracy": 0.35}},
            {"tokenizer": "baseline:logreg", "seed": 0, "val_mcc": [0.3, 0.3, 0.3], "test": {"test_mcc": 0.2, "test_accuracy": 0.4}},
        ])
    finally:
        os.chdir(cwd)
    return uri


@pytest.fixture(scope="module")
def store_report(store, tmp_path_factory) -> Path:
    """The page of the hand-made sweep (its output directory)."""
    out = tmp_path_factory.mktemp("store_report")
    build_report(store, out, sweep_id="hand-1")
    return out


def test_page_from_a_store_counts_unscored_trials_apart_and_marks_missing_values(store_report):
    page = store_report / "report.html"
    board = pd.read_csv(store_report / "tables" / "leaderboard.csv").set_index("tokenizer")
    # Seed 1 finished without a test score: counted as unscored, none of its numbers averaged.
    row = board.loc["pretrained/zero/geneformer"]
    assert row["test_mcc_mean"] == pytest.approx(0.1) and row["test_accuracy_mean"] == pytest.approx(0.3)
    assert row[["trials", "unscored", "stopped_early"]].tolist() == [1, 1, 1]
    assert board.loc["learned/zero/geneformer", "val_mcc_mean"] == pytest.approx(0.65)  # best epoch, not last
    html = page.read_text()
    row = re.search(r"<td class=\"name\">pretrained/zero/geneformer</td>.*?</tr>", html, re.S).group(0)
    assert "<td>0.100</td>" in row and "no interval" in row
    # One seed: no sd, no interval, no test; missing shown as such, never 0.
    pairs = re.search(r'<table id="table-pairwise">.*?</table>', html, re.S).group(0)
    assert "missing" in pairs and "n seeds &lt; 3: no interval" in pairs
    assert "1 without a test score" in html
    for figure_id in FIGURE_IDS:
        assert f'<figure id="{figure_id}">' in html
    # The confusion matrix of the best trial names its classes.
    per_class = pd.read_csv(store_report / "tables" / "best_trial_per_class.csv")
    assert per_class["cell_type"].tolist() == ["B cell", "T cell", "monocyte"]


def test_page_is_self_contained(store_report):
    html = (store_report / "report.html").read_text()
    assert "<script" not in html
    assert not re.search(r"(src|href)=\"(https?:)?//", html)  # nothing fetched from the network
    assert "<style>" in html and html.count("<svg") >= len(FIGURE_IDS)  # every figure drawn inline
    ids = re.findall(r'\bid="([^"]+)"', html)
    assert len(ids) == len(set(ids))  # several SVGs on one page, no id twice
    assert set(re.findall(r"url\(#([^)]+)\)", html)) <= set(ids)
    for figure_id in FIGURE_IDS:  # and written as files for papers
        assert (store_report / "figures" / f"{figure_id}.png").stat().st_size > 1000
        assert (store_report / "figures" / f"{figure_id}.svg").read_text().lstrip().startswith("<?xml")


def test_a_sweep_without_finished_trials_gets_a_page_that_says_so(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    hand_made_sweep(uri, "early", [
        {"tokenizer": "learned/zero/geneformer", "seed": 0, "val_mcc": [0.1, 0.2], "end_state": "running"},
        {"tokenizer": "learned/zero/scgpt", "seed": 0, "val_mcc": [], "end_state": "running"},
    ])
    html = build_report(uri, tmp_path / "out", sweep_id="early").read_text()
    assert 'id="no-finished-trials"' in html and "0 finished" in html and "2 running" in html
    for figure_id in FIGURE_IDS:
        assert f'<figure id="{figure_id}">' in html
    assert pd.read_csv(tmp_path / "out" / "tables" / "leaderboard.csv").empty
    assert "fig-learning-curves.svg" in os.listdir(tmp_path / "out" / "figures")  # running curves still drawn


def test_unknown_sweep_or_experiment_lists_the_ones_that_exist(store, tmp_path):
    with pytest.raises(TokbenchError, match=r"no sweep 'hand-2' at sqlite:///.*; sweeps there: hand-1"):
        build_report(store, tmp_path / "out", sweep_id="hand-2")
    with pytest.raises(TokbenchError, match=r"no MLflow experiment 'hands' at .*; experiments there: Default, hand"):
        build_report(store, tmp_path / "out", experiment="hands")
    assert not (tmp_path / "out" / "report.html").exists()


def test_an_experiment_report_covers_its_runs(store, tmp_path):
    build_report(store, tmp_path / "out", experiment="hand")
    trials = pd.read_csv(tmp_path / "out" / "tables" / "trials.csv")
    assert len(trials) == 5 and set(trials["sweep_id"]) == {"hand-1"}


def test_missing_sqlite_file_and_unreachable_server_are_named(tmp_path):
    with pytest.raises(TokbenchError, match=r"no MLflow database at .*nothing\.db"):
        build_report(f"sqlite:///{tmp_path / 'nothing.db'}", tmp_path / "out", sweep_id="x")
    assert not (tmp_path / "nothing.db").exists()  # reading never creates a store
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    started = time.monotonic()
    with pytest.raises(TokbenchError, match=rf"http://127.0.0.1:{port}.*not reachable"):
        build_report(f"http://127.0.0.1:{port}", tmp_path / "out", sweep_id="x")
    assert time.monotonic() - started < 10


def test_cli_report_writes_the_page_and_errors_in_one_line(store, tmp_path, capsys):
    assert main(["report", "--sweep", "hand-1", "--tracking-uri", store, "--out", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "report.html").exists()
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli" / "report.html")
    assert main(["report", "--sweep", "nope", "--tracking-uri", store]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no sweep 'nope'")


def test_watch_rebuilds_until_stopped_and_survives_a_later_failure(store, tmp_path):
    naps = []
    outcomes = iter(["ok", RuntimeError("server restarting"), "ok"])

    def build():
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return build_report(store, tmp_path / "w", sweep_id="hand-1", refresh_seconds=5)

    assert watch(build, 5, max_iterations=3, sleep=naps.append) == 2
    assert naps == [5, 5]
    assert '<meta http-equiv="refresh" content="5">' in (tmp_path / "w" / "report.html").read_text()
    with pytest.raises(TokbenchError, match="no sweep"):  # a first build that fails is the user's to fix
        watch(lambda: build_report(store, tmp_path / "w", sweep_id="nope"), 5, max_iterations=3, sleep=naps.append)

    def interrupted(_seconds):
        raise KeyboardInterrupt

    assert watch(lambda: "built", 1, sleep=interrupted) == 1  # Ctrl-C ends the loop quietly


def test_a_report_failure_after_a_sweep_is_a_warning(tmp_path, caplog):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = hand_made_sweep(uri, "s", [])
    assert publish_sweep_report(uri, "not-this-sweep", parent) is None
    assert "the report page could not be written" in caplog.text


def test_the_report_reads_mlflow_only_through_the_tracking_layer():
    import ast

    import tokbench.report

    for module in sorted(Path(tokbench.report.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(module.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] == "mlflow" for n in names), f"{module.name} imports {names}"


def test_the_tracking_reader_gives_plain_runs_histories_and_artifacts(store):
    reader = open_tracking(store)
    runs = reader.search_runs(tags={"sweep_id": "hand-1"})
    assert len(runs) == 6 and all(isinstance(r, RunRecord) and type(r.tags) is dict for r in runs)
    parent = next(r for r in runs if r.tags.get("tokbench.kind") == "sweep")
    assert [r.run_id for r in reader.search_runs(tags={"tokbench.kind": "sweep"})] == [parent.run_id]
    assert reader.experiment_name(parent.experiment_id) == "hand" and reader.experiment_names() == ["Default", "hand"]
    assert yaml.safe_load(reader.read_artifact_text(parent.run_id, "sweep.yaml"))["name"] == "hand-1"
    assert reader.read_artifact_text(parent.run_id, "absent.yaml") is None
    first = next(r for r in runs if r.tags.get("trial_id") == "t0")
    assert reader.metric_history(first.run_id, "val_mcc") == {1: 0.2, 2: 0.6, 3: 0.5}
    assert first.status == "FINISHED" and first.end_time >= first.start_time > 0
    with pytest.raises(TokbenchError, match="quote"):
        reader.search_runs(tags={"sweep_id": "it's"})


def test_the_page_is_written_without_leaving_temporary_files(store_report):
    assert sorted(p.name for p in store_report.iterdir()) == ["figures", "report.html", "tables"]


def test_figure_list_is_checked(tmp_path):
    assert set(FIGURE_IDS) >= {"fig-leaderboard", "fig-heatmap", "fig-main-effects", "fig-pairwise",
                               "fig-learning-curves", "fig-compute", "fig-confusion"}
    assert (Path(__file__).resolve().parents[1] / "dashboards" / "figures.yaml").samefile(dashboards_dir() / "figures.yaml")
    broken = tmp_path / "figures.yaml"
    broken.write_text(yaml.safe_dump([{"id": "fig-x", "draw": "violin", "section": "parts", "title": "t", "caption": "c"}]))
    with pytest.raises(TokbenchError, match=r"figures.yaml: figure fig-x: draw 'violin' is not one of leaderboard"):
        load_figure_specs(broken)


# --------------------------------------------------------------------------- a real small sweep


@pytest.fixture(scope="module")
def real_sweep(tmp_path_factory, tiny_atlas):
    """Two tokenizers and the baseline x 2 seeds, 2 epochs, on one Ray instance for the module."""
    import ray
    from ray.cluster_utils import Cluster

    from tokbench.sweep.launch import run_sweep

    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    os.environ["RAY_AUTH_MODE"] = "disabled"
    folder = tmp_path_factory.mktemp("report_sweep")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "object_store_memory": 80 * 1024**2,
                                                            "include_dashboard": False})
    ray.init(address=cluster.address, logging_level="WARNING")
    spec = {
        "name": "tiny",
        "base": {"experiment": "cross_tissue", "overrides": [
            f"dataset.path={tiny_atlas['h5ad']}", f"gene_embeddings={tiny_atlas['gene_embeddings']}",
            f"dataset.cache_dir={folder / 'cache'}", "model.d_model=16", "model.n_heads=2", "model.n_layers=1",
            "trainer.batch_size=16", "optimizer.lr=0.01", "model.pooling=mean", "trainer.early_stopping=false",
            "fc.select.size=32"]},
        "grid": {"fg": ["learned", "pretrained"], "fc": ["geneformer"]},
        "baseline": True,
        "seeds": [0, 1],
        "max_epochs": 2,
        "scheduler": {"name": "asha", "metric": "val_mcc", "mode": "max", "grace_period": 1, "reduction_factor": 2},
        "resources": {"cpu": 1, "gpu": 0},
        "tracking": {"uri": f"sqlite:///{folder / 'mlflow.db'}", "experiment": "tiny"},
        "storage_path": str(folder / "results"),
    }
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    cwd = os.getcwd()
    os.chdir(folder)  # artifacts under ./mlruns land here, not in the checkout
    try:
        run_sweep(path, verbose=0)
    finally:
        os.chdir(cwd)
        ray.shutdown()
        cluster.shutdown()
    uri = spec["tracking"]["uri"]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    parent = next(r for r in runs if r.data.tags.get("tokbench.kind") == "sweep")
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return {"uri": uri, "client": client, "parent": parent, "children": children,
            "sweep_id": parent.data.tags["sweep_id"], "folder": folder}


@pytest.fixture(scope="module")
def real_report(real_sweep, tmp_path_factory) -> Path:
    """The report the sweep itself logged to its parent run, downloaded from MLflow."""
    out = tmp_path_factory.mktemp("real_report")
    real_sweep["client"].download_artifacts(real_sweep["parent"].info.run_id, "report", str(out))
    return out / "report"


@pytest.mark.slow
def test_the_sweep_logs_its_report_to_the_parent_run(real_sweep):
    client, parent = real_sweep["client"], real_sweep["parent"]
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.html", "report/tables", "report/figures"} <= logged
    figures = {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(parent.info.run_id, "report/figures")}
    assert {f"{i}.{ext}" for i in FIGURE_IDS for ext in ("png", "svg")} <= figures
    tables = {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(parent.info.run_id, "report/tables")}
    assert {"leaderboard.csv", "pairwise.csv", "main_effects.csv", "heatmap.csv", "compute.csv"} <= tables


@pytest.mark.slow
def test_leaderboard_csv_matches_the_runs_in_mlflow(real_sweep, real_report):
    client = real_sweep["client"]
    board = pd.read_csv(real_report / "tables" / "leaderboard.csv").set_index("tokenizer")
    by_label: dict[str, list] = {}
    for run in real_sweep["children"]:
        by_label.setdefault(run.data.tags["combination"], []).append(run)
    assert set(board.index) == set(by_label) and "baseline:logreg" in board.index
    for label, runs in by_label.items():
        test = [r.data.metrics["final_test_mcc"] for r in runs]
        accuracy = [r.data.metrics["final_test_accuracy"] for r in runs]
        val = [max(m.value for m in client.get_metric_history(r.info.run_id, "val_mcc")) for r in runs]
        row = board.loc[label]
        assert row["seeds"] == len(runs) == 2
        assert row["test_mcc_mean"] == pytest.approx(np.mean(test), abs=1e-9)
        assert row["test_mcc_sd"] == pytest.approx(np.std(test, ddof=1), abs=1e-9)
        assert row["test_accuracy_mean"] == pytest.approx(np.mean(accuracy), abs=1e-9)
        assert row["val_mcc_mean"] == pytest.approx(np.mean(val), abs=1e-9)
        assert row["gap"] == pytest.approx(np.mean(val) - np.mean(test), abs=1e-9)
        assert row["stopped_early"] == sum(r.data.tags["end_state"] == "stopped_early" for r in runs)


@pytest.mark.slow
def test_pairwise_csv_matches_the_runs_and_two_seeds_give_no_interval(real_sweep, real_report):
    from scipy.stats import ttest_rel

    pairs = pd.read_csv(real_report / "tables" / "pairwise.csv")
    scores = {(r.data.tags["combination"], int(r.data.tags["seed"])): r.data.metrics["final_test_mcc"]
              for r in real_sweep["children"]}
    assert len(pairs) == 2 and pairs["paired"].all() and (pairs["n"] == 2).all()
    for row in pairs.itertuples():
        best, other = [scores[(row.best, s)] for s in (0, 1)], [scores[(row.other, s)] for s in (0, 1)]
        assert row.mean_diff == pytest.approx(np.mean(best) - np.mean(other), abs=1e-9)
        assert math.isnan(row.ci_low) and math.isnan(row.ci_high) and row.interval_note == stats.NO_INTERVAL
        expected = ttest_rel(best, other).pvalue
        assert (math.isnan(row.p_value) and math.isnan(expected)) or row.p_value == pytest.approx(expected)
    board = pd.read_csv(real_report / "tables" / "leaderboard.csv")
    assert board["test_mcc_ci_low"].isna().all() and (board["interval_note"] == stats.NO_INTERVAL).all()


@pytest.mark.slow
def test_console_and_page_leaderboards_of_the_sweep_are_equal(real_sweep, real_report, tmp_path):
    # Both are logged to the parent run: the console's (from the sweep state) at its top level,
    # the page's (from MLflow) under report/tables.
    console = real_sweep["client"].download_artifacts(real_sweep["parent"].info.run_id, "leaderboard.csv", str(tmp_path))
    pd.testing.assert_frame_equal(pd.read_csv(console), pd.read_csv(real_report / "tables" / "leaderboard.csv"),
                                  check_exact=False, rtol=1e-9)


@pytest.mark.slow
def test_compute_and_confusion_come_from_the_runs(real_sweep, real_report, tiny_atlas):
    compute = pd.read_csv(real_report / "tables" / "compute.csv").set_index("tokenizer")
    runs = real_sweep["children"]
    assert compute["epochs_run"].sum() == sum(int(r.data.tags["epochs_run"]) for r in runs)
    assert compute["epoch_budget"].sum() == 2 * len(runs)
    saved = sum(2 - int(r.data.tags["epochs_run"]) for r in runs if r.data.tags["end_state"] == "stopped_early")
    assert compute["epochs_saved_by_asha"].sum() == saved
    per_class = pd.read_csv(real_report / "tables" / "best_trial_per_class.csv")
    import anndata as ad

    classes = sorted(ad.read_h5ad(tiny_atlas["h5ad"], backed="r").obs["cell_type"].astype(str).unique())
    assert per_class["cell_type"].tolist() == classes


# --------------------------------------------------------------------------- the page in a browser

def check_in_chromium(page: Path, screenshot: Path) -> dict[str, bool]:
    """Open ``page`` in headless Chromium: no console error or warning, every figure id in
    the DOM; save a full-page screenshot (copied to $TOKBENCH_TEST_ARTIFACTS when set).
    Returns, per figure id, whether it holds a drawing."""
    from selenium.webdriver.common.by import By

    driver = chromium_driver("--window-size=1280,1000", "--hide-scrollbars")
    try:
        driver.get(page.as_uri())
        assert driver.title.startswith("tokbench report: ")
        for figure_id in FIGURE_IDS:
            assert driver.find_element(By.ID, figure_id).tag_name == "figure"
        assert [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")] == []
        driver.set_window_size(1280, driver.execute_script("return document.body.scrollHeight") + 50)
        assert driver.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000
        drawn = {f: bool(driver.find_element(By.ID, f).find_elements(By.TAG_NAME, "svg")) for f in FIGURE_IDS}
    finally:
        driver.quit()
    if os.environ.get("TOKBENCH_TEST_ARTIFACTS"):
        target = Path(os.environ["TOKBENCH_TEST_ARTIFACTS"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, target / screenshot.name)
    return drawn


@pytest.mark.slow
def test_the_real_sweep_page_renders_in_chromium_without_errors(real_report, tmp_path):
    drawn = check_in_chromium(real_report / "report.html", tmp_path / "report.png")
    assert all(drawn.values()), drawn


def test_the_page_without_finished_trials_renders_in_chromium(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    hand_made_sweep(uri, "early", [{"tokenizer": "learned/zero/geneformer", "seed": 0, "val_mcc": [0.1, 0.2], "end_state": "running"}])
    page = build_report(uri, tmp_path / "out", sweep_id="early", refresh_seconds=30)
    drawn = check_in_chromium(page, tmp_path / "report_no_finished_trials.png")
    assert drawn["fig-learning-curves"] and not drawn["fig-leaderboard"]


def test_the_page_with_unscored_trials_and_no_intervals_renders_in_chromium(store_report, tmp_path):
    drawn = check_in_chromium(store_report / "report.html", tmp_path / "report_hand_made.png")
    assert drawn["fig-leaderboard"] and drawn["fig-pairwise"]
