"""The sweep driver's tracking at load and through MLflow outages: every epoch of every trial
ends up in MLflow exactly once, with exactly one run per trial."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
from mlflow.tracking import MlflowClient

from tokbench.errors import TokbenchError
from tokbench.sweep import mlflow_callback
from tokbench.sweep.launch import run_sweep, sync_sweep

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import tracking_load  # noqa: E402
from tracking_load import NoOpTrainable, check_complete, free_port, start_mlflow_server, stop_server, write_load_sweep, write_tiny_h5ad  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 1024**2, logging_level="WARNING")
    ray.cloudpickle.register_pickle_by_value(tracking_load)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def h5ad(tmp_path_factory):
    return str(write_tiny_h5ad(tmp_path_factory.mktemp("data") / "tiny.h5ad"))


class SlowNoOp(NoOpTrainable):
    """Half a second per epoch, so a server can go away while trials still report."""

    def step(self):
        time.sleep(0.5)
        return super().step()


def test_fifty_trials_of_five_epochs_all_land_in_mlflow(local_ray, h5ad, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a SQLite store keeps its artifacts under ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = write_load_sweep(tmp_path, h5ad, trials=50, epochs=5, tracking_uri=uri, cpu=0.5)
    mlflow_callback.RESULT_SECONDS.clear()
    run_sweep(path, name="load", trainable=NoOpTrainable, verbose=0)
    assert len(mlflow_callback.RESULT_SECONDS) == 250
    got = check_complete(uri, "load", 50, 5)
    assert got == {"runs": 50, "distinct_trials": 50, "finished": 50, "complete": 50, "points": 250}
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("load")
    # The UI opens the experiment on its training runs, each with its dataset.
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    run = client.search_runs([experiment.experiment_id], "tags.trial_id != ''", max_results=1)[0]
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.name == run.data.tags["dataset"] and dataset.dataset.source.endswith('tiny.h5ad"}')
    assert [t.value for t in dataset.tags if t.key == "mlflow.data.context"] == ["cross_tissue:blood+lung+gut->brain"]
    cache_entries = [p.name for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert dataset.dataset.digest in cache_entries


def _when_reporting(action):
    """Run ``action`` in a thread once the driver has recorded a first result."""

    def wait():
        deadline = time.monotonic() + 300
        while not mlflow_callback.RESULT_SECONDS and time.monotonic() < deadline:
            time.sleep(0.1)
        action()

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    return thread


def test_a_server_killed_mid_sweep_and_restarted_loses_nothing(local_ray, h5ad, tmp_path, caplog, monkeypatch):
    monkeypatch.chdir(tmp_path)
    port, store = free_port(), f"sqlite:///{tmp_path / 'server.db'}"
    servers = [start_mlflow_server(store, tmp_path / "artifacts", port, workers=1)]
    uri = f"http://127.0.0.1:{port}"
    path = write_load_sweep(tmp_path, h5ad, trials=3, epochs=6, tracking_uri=uri, cpu=0.5)

    def outage():
        stop_server(servers[0])
        time.sleep(6)
        servers.append(start_mlflow_server(store, tmp_path / "artifacts", port, workers=1))

    mlflow_callback.RESULT_SECONDS.clear()
    try:
        with caplog.at_level(logging.WARNING, logger="tokbench"):
            thread = _when_reporting(outage)
            run_sweep(path, name="outage", trainable=SlowNoOp, verbose=0)
            thread.join(timeout=120)
        assert len(servers) == 2, "the server was never restarted"
        assert "tracking is behind: MLflow at " + uri in caplog.text
        assert "tracking caught up" in caplog.text
        assert check_complete(uri, "outage", 3, 6) == {"runs": 3, "distinct_trials": 3, "finished": 3, "complete": 3, "points": 18}
    finally:
        stop_server(servers[-1])


def test_a_server_that_never_comes_back_ends_the_sweep_with_a_replay_command(local_ray, h5ad, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TOKBENCH_TRACKING_WAIT", "3")
    port, store = free_port(), f"sqlite:///{tmp_path / 'server.db'}"
    server = start_mlflow_server(store, tmp_path / "artifacts", port, workers=1)
    uri = f"http://127.0.0.1:{port}"
    path = write_load_sweep(tmp_path, h5ad, trials=2, epochs=4, tracking_uri=uri, cpu=0.5)
    mlflow_callback.RESULT_SECONDS.clear()
    thread = _when_reporting(lambda: stop_server(server))
    with pytest.raises(TokbenchError, match=r"records are kept in .*gone\.tracking\.db.*results are in Ray's storage at "
                                            r".*replay them with `tokbench sweep .*load\.yaml --sync --name gone`"):
        run_sweep(path, name="gone", trainable=SlowNoOp, verbose=0)
    thread.join(timeout=60)
    with pytest.raises(TokbenchError, match="MLflow server not reachable"):
        sync_sweep(path, name="gone")
    server = start_mlflow_server(store, tmp_path / "artifacts", port, workers=1)
    monkeypatch.setenv("TOKBENCH_TRACKING_WAIT", "120")
    try:
        assert sync_sweep(path, name="gone") == 2
        assert check_complete(uri, "gone", 2, 4) == {"runs": 2, "distinct_trials": 2, "finished": 2, "complete": 2, "points": 8}
    finally:
        stop_server(server)


def test_the_load_benchmark_with_tracking_off_runs_the_driver_and_writes_nothing(local_ray, h5ad, tmp_path, monkeypatch):
    """bench/tracking_load.py --tracking-off: the same run_sweep and callback, every record dropped."""
    from tokbench.sweep import launch
    from tokbench.sweep.state import SweepState
    from tokbench.tracking import outbox

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    figures = tracking_load.run_load(tmp_path / "off", h5ad, trials=2, epochs=2, tracking_uri=uri, num_cpus=2, cpu=0.5,
                                     name="off", tracking=False)
    assert figures["tracking"] == "off" and figures["results"] == 4 and 0 < figures["fit_s"] <= figures["wall_s"]
    # The driver's own bookkeeping ran: every epoch of both trials is in the sweep state.
    state = SweepState.load(tmp_path / "off" / "results" / "off")
    assert sorted(t["epochs"] for t in state.doc["trials"].values()) == [2, 2]
    assert not outbox.outbox_path(tmp_path / "off" / "results" / "off").exists()
    assert MlflowClient(tracking_uri=uri).get_experiment_by_name("load") is None
    # Tracking is back for whatever runs next in this process.
    assert launch.open_outbox is outbox.open_outbox and launch._sync_tracking.__module__ == launch.__name__
