"""The sweep service on a real multi-node Ray cluster: expansion, ASHA, MLflow, retries, resume."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
import yaml
from mlflow.tracking import MlflowClient
from ray.cluster_utils import Cluster

from tokbench.errors import TokbenchError
from tokbench.sweep.launch import run_sweep
from tokbench.sweep.spec import dry_run, load_sweep
from tokbench.sweep.state import SweepState
from tokbench.trainable import TokbenchTrainable

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    """A head node without CPUs and two one-CPU worker nodes: trials must spread."""
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    os.environ["RAY_AUTH_MODE"] = "disabled"  # this in-process cluster is not the token-auth test
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 80 * 1024**2, "include_dashboard": False})
    for _ in range(2):
        c.add_node(num_cpus=1, object_store_memory=80 * 1024**2)
    c.wait_for_nodes()
    ray.init(address=c.address, logging_level="WARNING")
    yield c
    ray.shutdown()
    c.shutdown()


def write_sweep(tmp_path: Path, atlas: dict, **changes) -> Path:
    spec = {
        "name": "tiny",
        "base": {
            "experiment": "cross_tissue",
            "overrides": [
                f"dataset.path={atlas['h5ad']}",
                f"gene_embeddings={atlas['gene_embeddings']}",
                f"dataset.cache_dir={tmp_path / 'cache'}",
                "model.d_model=16", "model.n_heads=2", "model.n_layers=1",
                "trainer.batch_size=16", "optimizer.lr=0.01", "model.pooling=mean", "trainer.early_stopping=false", "fc.select.size=32",
            ],
        },
        "grid": {"fe": ["zero", "linear"], "fc": ["geneformer", "scgpt"]},
        "baseline": True,
        "seeds": [0],
        "max_epochs": 5,
        "scheduler": {"name": "asha", "metric": "val_mcc", "mode": "max", "grace_period": 2, "reduction_factor": 2},
        "resources": {"cpu": 1, "gpu": 0},
        "max_failures": 2,
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "tiny"},
        "storage_path": str(tmp_path / "results"),
    }
    spec.update(changes)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def mlflow_runs(tmp_path: Path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("tokbench.kind") == "sweep"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def test_sweep_spreads_over_nodes_asha_stops_and_mlflow_has_one_child_per_trial(cluster, tiny_atlas, tmp_path):
    board = run_sweep(write_sweep(tmp_path, tiny_atlas), verbose=0)
    state = SweepState.load(next(p for p in (tmp_path / "results").iterdir() if p.is_dir()))
    trials = state.doc["trials"]
    assert len(trials) == 5
    assert len({t["node_id"] for t in trials.values()}) == 2
    # Two one-CPU nodes, five trials: finished trials' workers take the next ones.
    assert len({t["worker_pid"] for t in trials.values()}) < 5
    assert any(t["end_state"] == "stopped_early" for t in trials.values())
    assert any(t["end_state"] == "completed" and t["epochs"] == 5 for t in trials.values())
    client, parents, children = mlflow_runs(tmp_path)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 5
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert {c.data.tags["tokenizer"] for c in children} == {
        "learned/zero/geneformer", "learned/zero/scgpt", "learned/linear/geneformer", "learned/linear/scgpt", "baseline:logreg"}
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["end_state"] in ("completed", "stopped_early")
        assert "final_test_mcc" in child.data.metrics
        # The degenerate flag follows the trial's own count of classes predicted on test.
        single_class = child.data.metrics["final_test_predicted_classes"] <= 1
        assert ("test" in child.data.tags["degenerate"].split("+")) == single_class
        assert child.data.metrics["startup_seconds"] >= child.data.metrics["setup_seconds"] > 0
    assert set(board["tokenizer"]) == {c.data.tags["combination"] for c in children}
    row = board.set_index("tokenizer").loc["baseline:logreg"]
    baseline_run = next(c for c in children if c.data.tags["tokenizer"] == "baseline:logreg")
    assert row["test_mcc_mean"] == pytest.approx(baseline_run.data.metrics["final_test_mcc"])


def test_asha_leaves_the_baseline_alone():
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from tokbench.sweep.scheduler import ReferenceExemptASHA

    asha = ReferenceExemptASHA(exempt_combinations=[2], time_attr="training_iteration", metric="val_mcc", mode="max",
                               max_t=4, grace_period=1, reduction_factor=2)
    baseline, first, second = (SimpleNamespace(trial_id=t, config={"combination": c}) for t, c in (("b", 2), ("t0", 0), ("t1", 1)))
    for trial in (baseline, first, second):
        asha.on_trial_add(None, trial)
    result = lambda epoch, mcc: {"training_iteration": epoch, "val_mcc": mcc}  # noqa: E731
    # The baseline's strong first epoch is not recorded at the rung: a weaker tokenizer
    # reaching it first still continues, and the next one is compared with that tokenizer.
    assert asha.on_trial_result(None, baseline, result(1, 0.99)) == TrialScheduler.CONTINUE
    assert asha.on_trial_result(None, first, result(1, 0.5)) == TrialScheduler.CONTINUE
    assert asha.on_trial_result(None, second, result(1, 0.1)) == TrialScheduler.STOP
    # Nor is the baseline ever stopped, not even at max_t: it ends itself.
    assert asha.on_trial_result(None, baseline, result(4, 0.0)) == TrialScheduler.CONTINUE
    asha.on_trial_complete(None, baseline, result(4, 0.0))


def test_a_reused_worker_trains_the_next_trial_as_a_fresh_one_would(cluster, tiny_atlas, tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, tiny_atlas))

    class Local(TokbenchTrainable):  # the sweep as tune.with_parameters hands it over
        def setup(self, config):
            super().setup(config, sweep=sweep)

    first, second = {"combination": 0, "seed": 0, "params": {}}, {"combination": 3, "seed": 1, "params": {}}
    keys = ("train_loss", "val_loss", "val_mcc", "test_mcc")
    fresh = Local(config=dict(second))
    expected = [{k: fresh.train().get(k) for k in keys} for _ in range(2)]
    fresh.stop()
    reused = Local(config=dict(first))
    reused.train()
    assert reused.reset(dict(second))
    assert [{k: reused.train().get(k) for k in keys} for _ in range(2)] == expected
    reused.stop()


class CrashOnce(TokbenchTrainable):
    """Raises once, after its second epoch, the first time it runs (marker file on disk)."""

    marker = ""

    def step(self):
        result = super().step()
        marker = Path(self.marker)
        if result["epoch"] == 2 and not marker.exists():
            marker.touch()
            raise RuntimeError("injected crash")
        return result


def test_a_crashed_trial_is_retried_from_its_checkpoint(cluster, tiny_atlas, tmp_path):
    marker = tmp_path / "crashed"
    path = write_sweep(tmp_path, tiny_atlas, grid={"fc": ["geneformer"]}, baseline=False, scheduler={"name": "none"}, max_epochs=3)
    # Ship the class (and its marker path) by value: workers cannot import this test module.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    CrashOnce.marker = str(marker)
    run_sweep(path, trainable=CrashOnce, verbose=0)
    assert marker.exists()
    state = SweepState.load(next(p for p in (tmp_path / "results").iterdir() if p.is_dir()))
    (trial,) = state.doc["trials"].values()
    assert trial["end_state"] == "completed"
    assert [h["epoch"] for h in trial["history"]] == [1, 2, 3]  # epoch 3 resumed after the crash, not rerun from 1
    client, _, children = mlflow_runs(tmp_path)
    assert len(children) == 1 and children[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(children[0].info.run_id, "val_mcc")] == [1, 2, 3]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"grid": {"fc": ["geneformer", "word2vec"]}}, r"unknown fc preset 'word2vec'; valid: geneformer"),
        ({"grid": {"fx": ["a"]}}, r"grid.fx: Key 'fx' not in 'GridSpec'"),
        ({"search": {"algorithm": "bayes"}}, r"search.algorithm: 'bayes' is not one of grid, random, optuna"),
        ({"params": {"optimizer.lr": {"loguniform": [0.1, 0.01]}}, "search": {"algorithm": "random"}}, r"params.optimizer.lr.loguniform: expected \[low, high\]"),
        ({"params": {"optimizer.lr": {"loguniform": [1e-4, 1e-2]}}}, r"search.algorithm=grid enumerates `choice` lists only"),
        ({"params": {"optimizer.lrate": {"choice": [0.1]}}}, r"params.optimizer.lrate: no such config key"),
        ({"params": {"model.n_heads": {"choice": [2, 3]}}}, r"model.n_heads: d_model 16 is not divisible by n_heads 3"),
        ({"combinations": [{"fg": "learned", "fx": "zero"}]}, r"combinations\[0\]: unknown key\(s\) \['fx'\]"),
        ({"scheduler": {"name": "asha", "reduction_factor": 1}}, r"scheduler.reduction_factor: must be > 1"),
        ({"resources": {"cpu": 1, "gpu": 1.5}}, r"resources.gpu: a fraction must be below 1"),
        ({"base": {"experiment": "missing.yaml"}}, r"missing.yaml: no such file"),
        ({"scheduler": {"name": "asha", "metric": "val_mccc"}}, r"scheduler.metric: 'val_mccc' is not one of val_mcc"),
        ({"plugins": ["no_such_plugin.py"]}, r"plugins: no_such_plugin.py: no such file"),
        ({"combinations": [{"fe": {"name": "linear", "n_bins": 3}}]}, r"'linear' does not take 'n_bins'"),
    ],
)
def test_dry_run_refuses_broken_sweep_files(tiny_atlas, tmp_path, changes, message):
    with pytest.raises(TokbenchError, match=message):
        dry_run(load_sweep(write_sweep(tmp_path, tiny_atlas, **changes)))


def test_dry_run_lists_trials_and_resources(tiny_atlas, tmp_path):
    report = dry_run(load_sweep(write_sweep(tmp_path, tiny_atlas, seeds=[0, 1])))
    assert "trials     10 = 5 combinations x 2 seeds" in report
    assert "1 CPU, 0 GPU per trial" in report and "baseline:logreg" in report


def test_gpu_request_on_a_cluster_without_gpus_is_refused(cluster, tiny_atlas, tmp_path):
    with pytest.raises(TokbenchError, match=r"resources.gpu=0.25 per trial, but the cluster .* has no GPU"):
        run_sweep(write_sweep(tmp_path, tiny_atlas, resources={"cpu": 1, "gpu": 0.25}), verbose=0)
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").iterdir())


def test_unwritable_storage_path_is_refused(tiny_atlas, tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(TokbenchError, match=r"storage_path .*file/results: not writable"):
        run_sweep(write_sweep(tmp_path, tiny_atlas, storage_path=str(blocked / "results")), verbose=0)


@pytest.mark.parametrize("name", ["demo", "cross_tissue_tokenizers", "hparams_optuna"])
def test_shipped_search_spaces_validate(name, tmp_path, monkeypatch):
    monkeypatch.setenv("TOKBENCH_CACHE", str(tmp_path / "cache"))  # the embedded atlas is generated here
    path = Path(__file__).resolve().parents[1] / "search_spaces" / f"{name}.yaml"
    sweep = load_sweep(path)
    report = dry_run(sweep)
    expected = {"demo": 18, "cross_tissue_tokenizers": 99, "hparams_optuna": 24}[name]
    assert sweep.n_trials() == expected and f"trials     {expected} =" in report


def test_unreachable_cluster_address_is_refused(tiny_atlas, tmp_path):
    with pytest.raises(TokbenchError, match=r"--address 127.0.0.1:1: no Ray head node answers there"):
        run_sweep(write_sweep(tmp_path, tiny_atlas), address="127.0.0.1:1", verbose=0)


def test_resume_refuses_a_directory_without_a_sweep_or_another_sweep_file(tiny_atlas, tmp_path):
    path = write_sweep(tmp_path, tiny_atlas)
    with pytest.raises(TokbenchError, match=r"--resume: no sweep named tiny-\* in"):
        run_sweep(path, resume=True, verbose=0)
    with pytest.raises(TokbenchError, match=r"--resume: .*/elsewhere holds no tokbench sweep to continue"):
        run_sweep(path, resume=True, name="elsewhere", verbose=0)
    exp_dir = tmp_path / "results" / "done"
    exp_dir.mkdir(parents=True)
    SweepState(exp_dir, {"sweep_hash": "0" * 16, "sweep_file": "/old/sweep.yaml"}).save()
    (exp_dir / "tuner.pkl").write_bytes(b"")
    with pytest.raises(TokbenchError, match=r"was started from a different sweep file \(/old/sweep.yaml\)"):
        run_sweep(path, resume=True, name="done", verbose=0)


class SlowEpochs(TokbenchTrainable):
    """Each epoch takes at least a second, so a node can be lost while its trial runs."""

    def step(self):
        started = time.monotonic()
        result = super().step()
        time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
        return result


def _kill_node_of_first_trial(cluster, results: Path, killed: dict) -> None:
    """Wait until a trial has checkpointed an epoch, then kill the worker node it runs on."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for state_file in results.glob("*.tokbench.json") if results.exists() else []:
            for trial_id, record in json.loads(state_file.read_text())["trials"].items():
                node_id = record.get("node_id")
                if record.get("last_epoch", 0) >= 1 and node_id:
                    node = next(n for n in cluster.list_all_nodes() if n.node_id == node_id)
                    killed.update(trial_id=trial_id, node_id=node_id, epoch=record["last_epoch"])
                    cluster.remove_node(node, allow_graceful=False)
                    return
        time.sleep(0.1)


def test_a_lost_node_sends_its_trials_to_other_nodes_from_their_checkpoints(cluster, tiny_atlas, tmp_path):
    # Runs last in this module: it takes one worker node away (and adds a spare first).
    cluster.add_node(num_cpus=1, object_store_memory=80 * 1024**2)
    cluster.wait_for_nodes()
    path = write_sweep(tmp_path, tiny_atlas, grid={"fe": ["zero", "linear"], "fc": ["geneformer"]},
                       baseline=False, scheduler={"name": "none"}, max_epochs=4)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    killed: dict = {}
    killer = threading.Thread(target=_kill_node_of_first_trial, args=(cluster, tmp_path / "results", killed), daemon=True)
    killer.start()
    run_sweep(path, trainable=SlowEpochs, verbose=0)
    killer.join(timeout=5)
    assert killed, "no trial reported an epoch: the node was never killed"
    state = SweepState.load(next(p for p in (tmp_path / "results").iterdir() if p.is_dir()))
    moved = state.doc["trials"][killed["trial_id"]]
    assert moved["end_state"] == "completed" and moved["node_id"] != killed["node_id"]
    assert [h["epoch"] for h in moved["history"]] == [1, 2, 3, 4]
    for trial in state.doc["trials"].values():
        assert trial["end_state"] == "completed" and trial["epochs"] == 4
    client, _, children = mlflow_runs(tmp_path)
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    for child in children:
        assert [m.step for m in client.get_metric_history(child.info.run_id, "val_mcc")] == [1, 2, 3, 4]
