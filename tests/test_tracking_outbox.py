"""The durable outbox between the sweep driver and MLflow: order, batching, outages, replays."""

from __future__ import annotations

import logging
import socket
import sqlite3
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tokbench.tracking.outbox import Outbox, QueuedRun

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from tracking_load import free_port, start_mlflow_server, stop_server  # noqa: E402


def test_records_are_written_in_order_in_batches_and_once(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    box = Outbox(tmp_path / "s.tracking.db", uri)
    box.create_run("t1", "exp", run_name="one", tags={"trial_id": "t1", "end_state": "running"})
    run = QueuedRun(box, "t1")
    run.log_params({f"p{i}": i for i in range(250)})  # more than one request's worth
    for epoch in range(1, 6):
        box.log_metrics("t1", {"val_mcc": epoch / 10, "loss": 1 / epoch}, step=epoch, mark_step=True)
    run.set_tags({"end_state": "completed"})
    (tmp_path / "config.yaml").write_text("a: 1\n")
    run.log_artifacts([tmp_path / "config.yaml"])
    (tmp_path / "config.yaml").unlink()  # the outbox kept its own copy
    run.end("FINISHED")
    assert box.has_step("t1", 3) and not box.has_step("t1", 6)
    assert box.flush(timeout=60) and box.pending() == 0
    client = MlflowClient(tracking_uri=uri)
    got = client.get_run(box.run_id("t1"))
    assert got.info.status == "FINISHED" and got.data.tags["end_state"] == "completed"
    assert len(got.data.params) == 250
    assert [m.step for m in client.get_metric_history(got.info.run_id, "val_mcc")] == [1, 2, 3, 4, 5]
    assert [a.path for a in client.list_artifacts(got.info.run_id)] == ["config.yaml"]
    assert client.get_experiment_by_name("exp").tags["mlflow.experimentKind"] == "custom_model_development"
    box.close()

    # A driver killed after the writes but before they were struck off replays them all:
    # still one run, no metric twice.
    reopened = Outbox(tmp_path / "s.tracking.db", uri)
    assert reopened.run_id("t1") == got.info.run_id and reopened.has_step("t1", 5)
    db = sqlite3.connect(tmp_path / "s.tracking.db")
    db.execute("INSERT INTO ops (run_key, kind, payload, attempts) VALUES ('t2', 'create', "
               "'{\"experiment\": \"exp\", \"run_name\": \"two\", \"tags\": {}, \"parent_key\": null}', 0)")
    db.commit()
    reopened.start()
    assert reopened.flush(timeout=60)
    db.execute("DELETE FROM runs WHERE run_key = 't2'")  # as if the answer to the creation was lost
    db.execute("INSERT INTO ops (run_key, kind, payload, attempts) VALUES ('t2', 'create', "
               "'{\"experiment\": \"exp\", \"run_name\": \"two\", \"tags\": {}, \"parent_key\": null}', 1)")
    db.commit()
    reopened.close()
    again = Outbox(tmp_path / "s.tracking.db", uri)
    for epoch in range(1, 6):  # replayed with the timestamps they were queued with
        again.log_metrics("t1", {"val_mcc": epoch / 10}, step=epoch)
    again.start()
    assert again.flush(timeout=60)
    again.close()
    runs = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["one", "two"]


def test_a_refused_record_is_set_aside_and_the_rest_goes_on(tmp_path, caplog):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    box = Outbox(tmp_path / "s.tracking.db", uri)
    box.create_run("t1", "exp", run_name="one")
    box.log_params("t1", {"lr": "0.1"})
    box.start()
    assert box.flush(timeout=60)
    box.log_params("t1", {"lr": "0.2"})  # MLflow refuses to change a param once logged
    box.log_metrics("t1", {"val_mcc": 0.5}, step=1)
    with caplog.at_level(logging.ERROR, logger="tokbench.tracking"):
        assert box.flush(timeout=60)
    assert "MLflow refused a data record of run t1" in caplog.text
    assert len(box.refused()) == 1
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(box.run_id("t1"))
    assert run.data.params["lr"] == "0.1" and run.data.metrics["val_mcc"] == 0.5
    box.close()


class CuttableProxy:
    """A TCP relay to ``port`` that can be cut (connections refused, open ones dropped) and
    restored: an MLflow server that goes away and comes back, in a fraction of a second."""

    def __init__(self, port: int):
        self.target, self.port = port, free_port()
        self.up = threading.Event()
        self.up.set()
        self._conns: list[socket.socket] = []
        self._server = None
        self._listen()

    def _listen(self):
        self._server = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        threading.Thread(target=self._accept, args=(self._server,), daemon=True).start()

    def _accept(self, server):
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b):
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self):
        try:
            self._server.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
        except OSError:
            pass
        self._server.close()
        for conn in self._conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            except OSError:
                pass
        self._conns.clear()

    def restore(self):
        self._listen()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("server")
    port = free_port()
    server = start_mlflow_server(f"sqlite:///{folder / 'server.db'}", folder / "artifacts", port, workers=1)
    yield port
    stop_server(server)


def test_a_server_that_goes_away_gets_every_record_once_it_is_back(mlflow_server, tmp_path, caplog):
    proxy = CuttableProxy(mlflow_server)
    uri = f"http://127.0.0.1:{proxy.port}"
    box = Outbox(tmp_path / "s.tracking.db", uri, behind_after=0.5).start()
    try:
        box.create_run("t1", "outage", run_name="one")
        box.log_metrics("t1", {"val_mcc": 0.1}, step=1)
        assert box.flush(timeout=60)
        proxy.cut()
        with caplog.at_level(logging.WARNING, logger="tokbench.tracking"):
            for epoch in range(2, 6):
                box.log_metrics("t1", {"val_mcc": epoch / 10}, step=epoch)
            box.end("t1", "FINISHED")
            assert not box.flush(timeout=3) and box.pending() == 5
            assert "tracking is behind: MLflow at " + uri in caplog.text
            proxy.restore()
            assert box.flush(timeout=60)
            time.sleep(1.5)  # the writer notices the empty queue within a second
        assert "tracking caught up" in caplog.text
        client = MlflowClient(tracking_uri=uri)
        assert [m.step for m in client.get_metric_history(box.run_id("t1"), "val_mcc")] == [1, 2, 3, 4, 5]
        assert client.get_run(box.run_id("t1")).info.status == "FINISHED"
    finally:
        box.close()
        proxy.cut()
