"""A sweep whose driver dies mid-way is continued with --resume: nothing rerun, nothing lost,
exactly one MLflow run per trial."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from test_sweep import write_sweep
from tokbench.sweep.state import state_path

pytestmark = pytest.mark.slow


def sweep_command(path, *extra):
    return [sys.executable, "-m", "tokbench.cli", "sweep", str(path), "--name", "resumable", "--num-cpus", "1", *extra]


def test_killed_driver_then_resume(tiny_atlas, tmp_path):
    path = write_sweep(tmp_path, tiny_atlas, grid={"fc": ["geneformer", "scgpt", "log_expression"]}, baseline=False,
                       scheduler={"name": "none"}, max_epochs=3)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1"}
    state_file = state_path(tmp_path / "results" / "resumable")
    driver = subprocess.Popen(sweep_command(path), env=env, cwd=tmp_path, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    finished_before = {}
    while time.time() < deadline:
        if state_file.exists():
            trials = json.loads(state_file.read_text())["trials"]
            finished_before = {k: v for k, v in trials.items() if v.get("end_state") == "completed"}
            if finished_before:
                break
        time.sleep(0.5)
    assert finished_before, "no trial finished before the deadline"
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray instance it started die at once
    driver.wait()

    resumed = subprocess.run(sweep_command(path, "--resume"), env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    trials = json.loads(state_file.read_text())["trials"]
    assert len(trials) == 3, resumed.stdout[-4000:]
    assert all(t.get("end_state") == "completed" for t in trials.values()), ({k: t.get("end_state") for k, t in trials.items()}, resumed.stderr[-3000:])
    for trial_id, before in finished_before.items():  # finished trials were not rerun
        assert trials[trial_id]["history"] == before["history"]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 3 and len({c.data.tags["trial_id"] for c in children}) == 3
    assert all(c.info.status == "FINISHED" for c in children)
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_mcc")]
        assert steps == [1, 2, 3]
    assert "log_expression" in resumed.stdout
