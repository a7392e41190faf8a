"""What the sweep driver costs per reported result when many trials report every epoch.

    python bench/tracking_load.py --trials 1000 --epochs 30 --server sqlite
    python bench/tracking_load.py --trials 1000 --epochs 30 --tracking-uri http://127.0.0.1:5000  # e.g. PostgreSQL-backed

N trials of a no-op trainable (each epoch returns a handful of metrics at once) report M
epochs through the real sweep driver (``run_sweep``) and its MLflow callback, against an
``mlflow server``: ``--server sqlite`` starts one on a fresh SQLite file, ``--tracking-uri``
uses a running one (``scripts/cluster.sh up --backend postgres`` starts a PostgreSQL-backed
one). Printed: total wall time; the callback's time per reported result (median, p99: what
Tune's event loop pays for tracking); results per second; the time ``tokbench report`` takes
on the finished sweep; and (``--baseline``) the same trials through Tune with no tokbench
callback, for the scheduling cost of tracking. Every epoch of every trial is checked in MLflow.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from ray import tune

ROOT = Path(__file__).resolve().parents[1]


class NoOpTrainable(tune.Trainable):
    """Reports ``epochs`` epochs of made-up metrics as fast as Tune asks for them."""

    def setup(self, config, sweep=None, epochs: int = 30):
        self.epochs = int(sweep.spec.max_epochs) if sweep is not None else epochs
        self.epoch = 0
        self.rng = np.random.default_rng(int(config.get("seed", 0)))

    def step(self):
        self.epoch += 1
        mcc = float(self.rng.uniform(0, 1))
        return {"epoch": self.epoch, "train_loss": 1.0 / self.epoch, "val_loss": 1.1 / self.epoch, "val_accuracy": mcc,
                "val_macro_f1": mcc, "val_mcc": mcc, "best_val_mcc": mcc, "epoch_seconds": 0.0,
                "should_stop": self.epoch >= self.epochs, "done": self.epoch >= self.epochs}

    def save_checkpoint(self, checkpoint_dir):
        return {"epoch": self.epoch}

    def load_checkpoint(self, checkpoint):
        self.epoch = int(checkpoint["epoch"])

    def reset_config(self, new_config):
        # A reused worker starts the next trial afresh (the epoch count stays the sweep's).
        self.epoch = 0
        self.rng = np.random.default_rng(int(new_config.get("seed", 0)))
        return True


def write_tiny_h5ad(path: Path) -> Path:
    """200 cells of 12 real genes, 2 cell types, the four tissues of the cross_tissue split
    (the no-op trainable never reads it; the driver fingerprints it, Ray warms its cache)."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    genes = ["CD3E", "MS4A1", "CD14", "LYZ", "XIST", "GAPDH", "ACTB", "NKG7", "CD8A", "FCGR3A", "PTPRC", "CD19"]
    n = 200
    obs = pd.DataFrame({"cell_type": np.array(["B cell", "T cell"])[np.arange(n) % 2],
                        "tissue": np.array(["blood", "lung", "gut", "brain"])[(np.arange(n) // 2) % 4]},
                       index=[f"cell{i}" for i in range(n)])
    counts = rng.poisson(5.0, size=(n, len(genes))).astype(np.float32)
    ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(path)
    return path


def write_load_sweep(folder: Path, h5ad: str, trials: int, epochs: int, tracking_uri: str, cpu: float) -> Path:
    spec = {
        "name": "load",
        "base": {"experiment": "cross_tissue", "overrides": [f"dataset.path={h5ad}", f"dataset.cache_dir={folder / 'cache'}",
                                                          f"gene_embeddings={h5ad}"]},
        "grid": {"fc": ["geneformer"]},
        "baseline": False,
        "seeds": list(range(trials)),
        "max_epochs": epochs,
        "scheduler": {"name": "none"},
        "resources": {"cpu": cpu, "gpu": 0},
        "max_failures": 0,
        "tracking": {"uri": tracking_uri, "experiment": "load"},
        "storage_path": str(folder / "results"),
    }
    path = folder / "load.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(backend_uri: str, artifacts: Path, port: int, workers: int = 2) -> subprocess.Popen:
    """``mlflow server`` on 127.0.0.1:``port`` (returns once /health answers)."""
    import urllib.request

    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri, "--artifacts-destination",
         str(artifacts), "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return server
        except OSError:
            if server.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {server.returncode}")
            time.sleep(0.5)
    server.kill()
    raise RuntimeError("mlflow server did not answer within 120 s")


def stop_server(server: subprocess.Popen) -> None:
    """Kill the server and its workers at once (as a crash would; a graceful stop waits for
    the clients' keep-alive connections)."""
    import signal

    try:
        os.killpg(server.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    server.wait(timeout=30)


def check_complete(tracking_uri: str, sweep_id: str, trials: int, epochs: int) -> dict:
    """Runs, end states and per-epoch metric points of the sweep in MLflow."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name("load")
    runs, token = [], None
    while True:
        page = client.search_runs([experiment.experiment_id], f"tags.sweep_id = '{sweep_id}'", max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            break
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    steps = {r.data.tags["trial_id"]: [m.step for m in client.get_metric_history(r.info.run_id, "val_mcc")] for r in children}
    return {
        "runs": len(children),
        "distinct_trials": len(steps),
        "finished": sum(r.info.status == "FINISHED" for r in children),
        "complete": sum(sorted(s) == list(range(1, epochs + 1)) for s in steps.values()),
        "points": sum(len(s) for s in steps.values()),
    }


def run_load(folder: Path, h5ad: str, trials: int, epochs: int, tracking_uri: str, num_cpus: int, cpu: float) -> dict:
    """One load run through ``run_sweep``; returns the figures (seconds)."""
    import ray

    from tokbench.sweep import mlflow_callback
    from tokbench.sweep.launch import run_sweep

    path = write_load_sweep(folder, h5ad, trials, epochs, tracking_uri, cpu)
    ray.cloudpickle.register_pickle_by_value(sys.modules[NoOpTrainable.__module__])
    mlflow_callback.RESULT_SECONDS.clear()
    started = time.perf_counter()
    run_sweep(path, name="load", num_cpus=num_cpus, trainable=NoOpTrainable, verbose=0)
    wall = time.perf_counter() - started
    per_result = np.asarray(mlflow_callback.RESULT_SECONDS) * 1000
    figures = {"trials": trials, "epochs": epochs, "wall_s": round(wall, 1), "results": int(per_result.size),
               "results_per_s": round(per_result.size / wall, 1),
               "overhead_ms_median": round(float(np.median(per_result)), 3) if per_result.size else None,
               "overhead_ms_p99": round(float(np.percentile(per_result, 99)), 3) if per_result.size else None}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tokbench.cli", "report", "--tracking-uri", tracking_uri, "--sweep", "load",
                    "--out", str(folder / "report")], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    figures["report_s"] = round(time.perf_counter() - started, 1)
    figures.update(check_complete(tracking_uri, "load", trials, epochs))
    return figures


def run_baseline(folder: Path, h5ad: str, trials: int, epochs: int, num_cpus: int, cpu: float) -> float:
    """The same trials through Tune alone (no tokbench callback, no MLflow): wall seconds."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from tokbench.sweep.launch import _param_space, _tune_config
    from tokbench.sweep.spec import load_sweep

    sweep = load_sweep(write_load_sweep(folder, h5ad, trials, epochs, "", cpu))
    wrapped = tune.with_resources(tune.with_parameters(NoOpTrainable, sweep=sweep), {"cpu": cpu})
    tuner = tune.Tuner(wrapped, param_space=_param_space(sweep), tune_config=_tune_config(sweep),
                       run_config=tune.RunConfig(name="baseline", storage_path=str(folder / "baseline"), verbose=0,
                                                 callbacks=[CSVLoggerCallback(), JsonLoggerCallback()],
                                                 checkpoint_config=tune.CheckpointConfig(checkpoint_frequency=1, num_to_keep=2,
                                                                                         checkpoint_at_end=True)))
    started = time.perf_counter()
    tuner.fit()
    return round(time.perf_counter() - started, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--server", choices=["sqlite"], help="start an mlflow server on a fresh SQLite file")
    parser.add_argument("--tracking-uri", help="an MLflow server already running (e.g. PostgreSQL-backed)")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray instance")
    parser.add_argument("--cpu", type=float, default=0.25, help="CPUs per trial (concurrency = num-cpus / cpu)")
    parser.add_argument("--baseline", action="store_true", help="also time the trials through Tune with no tracking")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args()
    if not (args.server or args.tracking_uri):
        parser.error("pass --server sqlite or --tracking-uri URL")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        h5ad = str(write_tiny_h5ad(folder / "tiny.h5ad"))
        server = None
        uri = args.tracking_uri
        if args.server == "sqlite":
            port = free_port()
            server = start_mlflow_server(f"sqlite:///{folder / 'mlflow.db'}", folder / "artifacts", port)
            uri = f"http://127.0.0.1:{port}"
        try:
            figures = {"server": args.server or uri, **run_load(folder, h5ad, args.trials, args.epochs, uri,
                                                                args.num_cpus, args.cpu)}
            if args.baseline:
                figures["baseline_wall_s"] = run_baseline(folder, h5ad, args.trials, args.epochs,
                                                          args.num_cpus, args.cpu)
        finally:
            if server is not None:
                stop_server(server)
    print(json.dumps(figures, indent=1))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
