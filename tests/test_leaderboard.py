"""One leaderboard everywhere: the console's (from the sweep state file), the page's (from
MLflow) and ``leaderboard.csv`` agree on a sweep with a failed trial that had logged a
partial score, a finished trial without a test score, ASHA-stopped trials and degenerate
flags, and both leave the interval empty below three seeds."""

from __future__ import annotations

import io
import math
import os
import re
from contextlib import redirect_stdout

import pandas as pd
import pytest

from tokbench.report import build_report, stats
from tokbench.sweep.report import leaderboard, print_leaderboard, trial_table
from tokbench.sweep.state import SweepState
from tokbench.tracking.mlflow_runs import RunLogger

SWEEP_ID = "board-1"
PARTS = {"order": "expression", "select": "truncate", "combine": "sum"}

# (label, seed, end state, per-epoch val MCC, test scores or None, degenerate flag or None)
TRIALS = [
    *[("learned/zero/geneformer", s, "completed", [0.2, 0.5 + s / 10], {"test_mcc": 0.40 + s / 20, "test_accuracy": 0.6}, "no")
      for s in range(3)],
    ("learned/zero/geneformer", 3, "stopped_early", [0.1], {"test_mcc": 0.333, "test_accuracy": 0.5}, None),
    ("pretrained/zero/geneformer", 0, "completed", [0.3, 0.4], {"test_mcc": 0.35, "test_accuracy": 0.55}, "no"),
    ("pretrained/zero/geneformer", 1, "completed", [0.3, 0.2], {"test_mcc": 0.0, "test_accuracy": 0.25}, "test"),
    # failed after logging a good partial score: it must not lift the mean
    ("pretrained/zero/geneformer", 2, "failed", [0.9], {"test_mcc": 0.95, "test_accuracy": 0.97}, None),
    # finished without a test score: counted apart, never 0
    ("pretrained/zero/geneformer", 3, "completed", [0.3, 0.3], None, "no"),
    *[("baseline:logreg", s, "completed", [0.25], {"test_mcc": 0.2 + s / 50, "test_accuracy": 0.4}, "no") for s in range(4)],
]


def _tags(label: str, seed: int) -> dict:
    if label.startswith("baseline"):
        return {**{p: "-" for p in ("fg", "fe", "fc", "order", "select", "combine")}, "method": "logreg",
                "tokenizer": label, "seed": str(seed)}
    return {**dict(zip(("fg", "fe", "fc"), label.split("/"))), **PARTS, "method": "transformer", "tokenizer": label,
            "seed": str(seed)}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> dict:
    """The sweep of ``TRIALS`` recorded twice, as the sweep callback records it: the state
    file's trial records and the MLflow parent and child runs."""
    folder = tmp_path_factory.mktemp("board")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    cwd = os.getcwd()
    os.chdir(folder)  # artifacts under ./mlruns land here
    try:
        parent = RunLogger(uri, "board", run_name=SWEEP_ID, tags={"sweep_id": SWEEP_ID, "tokbench.kind": "sweep"})
        state = SweepState(folder / SWEEP_ID, {"sweep_id": SWEEP_ID, "parent_run_id": parent.run_id,
                                               "tracking_uri": uri, "experiment": "board"})
        for i, (label, seed, end_state, val_mcc, test, degenerate) in enumerate(TRIALS):
            tags = _tags(label, seed)
            child = RunLogger(uri, "board", run_name=f"{label} seed={seed}", parent_run_id=parent.run_id)
            child.log_params({"method": tags["method"], "trainer.max_epochs": 2, "baseline.max_epochs": 2})
            run_tags = {**tags, "sweep_id": SWEEP_ID, "trial_id": f"t{i}", "combination": label,
                        "end_state": end_state, "epochs_run": len(val_mcc)}
            if degenerate is not None:  # older runs carry no flag
                run_tags["degenerate"] = degenerate
            child.set_tags(run_tags)
            for epoch, value in enumerate(val_mcc, start=1):
                epoch_metrics = {"val_mcc": value, "epoch_seconds": 0.5}
                if test and epoch == len(val_mcc):
                    epoch_metrics.update(test)  # per-epoch test scores, as every trial logs them
                child.log_metrics(epoch_metrics, step=epoch)
            if test and end_state != "failed":
                child.log_metrics({f"final_{k}": v for k, v in test.items()})
            child.end("FAILED" if end_state == "failed" else "FINISHED")
            record = state.trial(f"t{i}")
            record.update(label=label, seed=seed, tags=tags, end_state=end_state, epochs=len(val_mcc),
                          val_mcc_best=max(val_mcc), history=[{"epoch": e + 1, "val_mcc": v} for e, v in enumerate(val_mcc)])
            if test:
                record["test"] = dict(test)
            if degenerate is not None:
                record["degenerate"] = degenerate
        state.save()
        parent.end("FINISHED")
        build_report(uri, folder / "report", sweep_id=SWEEP_ID)
    finally:
        os.chdir(cwd)
    console = io.StringIO()
    board = leaderboard(state)
    with redirect_stdout(console):
        print_leaderboard(board, state)
    return {"state": state, "board": board, "console": console.getvalue(), "folder": folder,
            "page_csv": pd.read_csv(folder / "report" / "tables" / "leaderboard.csv"),
            "html": (folder / "report" / "report.html").read_text()}


def test_console_csv_and_page_csv_are_the_same_table(recorded):
    # The console's board goes to the parent run's leaderboard.csv exactly like this.
    console_csv = pd.read_csv(io.StringIO(recorded["board"].to_csv(index=False)))
    pd.testing.assert_frame_equal(console_csv, recorded["page_csv"], check_exact=False, rtol=1e-12)


def test_failed_and_unscored_trials_are_counted_but_never_scored(recorded):
    board = recorded["board"].set_index("tokenizer")
    row = board.loc["pretrained/zero/geneformer"]
    assert row["test_mcc_mean"] == pytest.approx(0.175)  # seeds 0 and 1 only: not the failed 0.95, not 0
    assert row["test_accuracy_mean"] == pytest.approx(0.4)
    assert row["val_mcc_mean"] == pytest.approx(0.35)  # best epochs (0.4, 0.3) of the two counted trials
    assert row[["trials", "seeds", "failed", "unscored", "epochs_run"]].tolist() == [2, 2, 1, 1, 7]
    learned = board.loc["learned/zero/geneformer"]
    assert learned["test_mcc_mean"] == pytest.approx((0.40 + 0.45 + 0.50 + 0.333) / 4)
    assert (learned["stopped_early"], learned["trials"]) == (1, 4)


def test_interval_only_from_three_seeds_and_the_page_says_why(recorded):
    board = recorded["board"].set_index("tokenizer")
    learned = board.loc["learned/zero/geneformer"]
    expected = stats.bootstrap_mean_ci([0.40, 0.45, 0.50, 0.333])
    assert (learned["test_mcc_ci_low"], learned["test_mcc_ci_high"]) == pytest.approx(expected[1:])
    assert learned["test_mcc_ci_low"] < learned["test_mcc_mean"] < learned["test_mcc_ci_high"]
    pretrained = board.loc["pretrained/zero/geneformer"]
    assert math.isnan(pretrained["test_mcc_ci_low"]) and pretrained["interval_note"] == "n seeds < 3: no interval"
    csv_row = recorded["page_csv"].set_index("tokenizer").loc["pretrained/zero/geneformer"]
    assert math.isnan(csv_row["test_mcc_ci_low"]) and math.isnan(csv_row["test_mcc_ci_high"])  # empty cells
    html_row = re.search(r'<td class="name">pretrained/zero/geneformer</td>.*?</tr>', recorded["html"], re.S).group(0)
    assert "n seeds &lt; 3: no interval" in html_row
    pairs = pd.read_csv(recorded["folder"] / "report" / "tables" / "pairwise.csv").set_index("other")
    assert math.isnan(pairs.loc["pretrained/zero/geneformer", "ci_low"])  # two shared seeds
    assert not math.isnan(pairs.loc["baseline:logreg", "ci_low"])  # four shared seeds


def test_p_value_n_and_seeds_for_power_are_shown(recorded):
    from scipy.stats import ttest_rel

    board = recorded["board"].set_index("tokenizer")
    baseline = board.loc["baseline:logreg"]
    learned, base = [0.40, 0.45, 0.50, 0.333], [0.2 + s / 50 for s in range(4)]
    assert baseline["p_vs_best"] == pytest.approx(ttest_rel(learned, base).pvalue)
    assert baseline["n_vs_best"] == 4 and baseline["seeds_for_power"] >= 2
    html = recorded["html"]
    row = re.search(r'<table id="table-pairwise">.*?<td class="name">baseline:logreg</td>.*?</tr>', html, re.S).group(0)
    assert f"{baseline['p_vs_best']:.3f} (n=4)" in row
    assert f"<td>{int(baseline['seeds_for_power'])}</td>" in row
    assert re.search(rf"baseline:logreg .*{baseline['p_vs_best']:.3f} \(4\)", recorded["console"])


def test_degenerate_trials_are_flagged_and_a_missing_flag_is_unknown(recorded):
    board = recorded["board"].set_index("tokenizer")
    assert board.loc["pretrained/zero/geneformer", ["degenerate", "degenerate_unknown"]].tolist() == [1, 0]
    assert board.loc["learned/zero/geneformer", ["degenerate", "degenerate_unknown"]].tolist() == [0, 1]
    assert board.loc["baseline:logreg", ["degenerate", "degenerate_unknown"]].tolist() == [0, 0]
    assert re.search(r"pretrained/zero/geneformer .* !1 ", recorded["console"])
    assert re.search(r"learned/zero/geneformer .* 0\+1\? ", recorded["console"])
    row = re.search(r'<td class="name">pretrained/zero/geneformer</td>.*?</tr>', recorded["html"], re.S).group(0)
    assert 'class="flag"' in row
    trials = re.search(r'<table id="table-trials">.*?</table>', recorded["html"], re.S).group(0)
    assert trials.count("&#9888; test") == 1 and trials.count('<td class="name">?</td>') == 2  # seed 3 and the failed trial


def test_console_prints_the_page_numbers(recorded):
    page = recorded["page_csv"].set_index("tokenizer")
    lines = {line.split()[0]: line for line in recorded["console"].splitlines()
             if line.split(" ")[0] in set(page.index)}
    for tokenizer, row in page.iterrows():
        line = lines[tokenizer]
        assert f"{row['test_mcc_mean']:.3f}" in line and f"{row['test_accuracy_mean']:.3f}" in line
        html_row = re.search(rf'<td class="name">{re.escape(tokenizer)}</td>.*?</tr>', recorded["html"], re.S).group(0)
        assert f"{row['test_mcc_mean']:.3f}" in html_row


def test_state_adapter_reads_old_records_without_new_fields(tmp_path):
    state = SweepState(tmp_path / "old", {"sweep_id": "old", "trials": {
        "a": {"label": "learned/zero/geneformer", "seed": 0, "end_state": "completed", "epochs": 2,
              "val_mcc_best": 0.5, "test": {"test_mcc": 0.4, "test_accuracy": 0.6}},
        "b": {"label": "learned/zero/geneformer", "seed": 1},  # still running: no end state yet
    }})
    table = trial_table(state)
    assert table["end_state"].tolist() == ["completed", "running"] and table["degenerate"].isna().all()
    row = leaderboard(state).iloc[0]
    assert row["test_mcc_mean"] == pytest.approx(0.4) and row["val_mcc_mean"] == pytest.approx(0.5)
    assert (row["running"], row["degenerate_unknown"]) == (1, 1)
