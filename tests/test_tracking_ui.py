"""The MLflow UI a user opens on a sweep's store: the experiment lands on its training runs,
and each run shows its dataset."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from conftest import chromium_driver
from tokbench.tracking.mlflow_runs import RunLogger
from tokbench.tracking.outbox import PARENT_KEY, Outbox, QueuedRun

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from tracking_load import free_port, start_mlflow_server, stop_server  # noqa: E402

pytestmark = pytest.mark.slow
def sweep_store(tmp_path: Path) -> tuple[str, str, str]:
    """A store written as a sweep writes it: parent run, two trial runs with their dataset."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = RunLogger(uri, "ui", run_name="ui-sweep", tags={"sweep_id": "ui-sweep", "tokbench.kind": "sweep"})
    box = Outbox(tmp_path / "ui.tracking.db", uri)
    box.bind(PARENT_KEY, parent.run_id)
    for i, label in enumerate(["learned/zero/geneformer", "learned/linear/scgpt"]):
        key = f"t{i}"
        box.create_run(key, "ui", run_name=f"{label} seed=0", tags={"sweep_id": "ui-sweep", "trial_id": key}, parent_key=PARENT_KEY)
        run = QueuedRun(box, key)
        run.log_inputs([{"name": "tinyatlas", "digest": "0123456789abcdef01234567", "source": "/data/tinyatlas.h5ad",
                         "context": "cross_tissue:blood->brain"}])
        for epoch in (1, 2):
            box.log_metrics(key, {"val_mcc": 0.1 * epoch}, step=epoch)
        run.end("FINISHED")
    box.end(PARENT_KEY, "FINISHED")
    box.start()
    assert box.flush(timeout=60)
    child_id = box.run_id("t1")
    box.close()
    return uri, parent.client.get_experiment_by_name("ui").experiment_id, child_id


def test_the_experiment_opens_on_its_runs_with_their_dataset(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    uri, experiment_id, child_id = sweep_store(tmp_path)
    from mlflow.tracking import MlflowClient

    assert MlflowClient(tracking_uri=uri).get_experiment(experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    driver = chromium_driver("--window-size=1600,1000")
    port = free_port()
    server = start_mlflow_server(uri, tmp_path / "artifacts", port, workers=1)
    try:
        # MLflow 3.17's UI picks GenAI or model-training pages from a browser-wide workflow
        # type (GenAI unless chosen), set by this URL parameter; the experiment's kind tag
        # is what it and MLflow's tools read where that switch is off.
        driver.get(f"http://127.0.0.1:{port}/#/experiments/{experiment_id}?workflowType=machine_learning")
        body = lambda d: d.find_element(By.TAG_NAME, "body").text  # noqa: E731
        WebDriverWait(driver, 90).until(lambda d: "ui-sweep" in body(d))
        assert "/runs" in driver.current_url and "overview" not in driver.current_url
        # A trial's run page names its dataset (the trial runs are folded under the sweep's run
        # in the table).
        driver.get(f"http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs/{child_id}?workflowType=machine_learning")
        WebDriverWait(driver, 90).until(lambda d: "learned/linear/scgpt" in body(d) and "tinyatlas" in body(d))
    finally:
        driver.quit()
        stop_server(server)
