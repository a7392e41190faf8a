"""What the sweep driver costs per reported result when many trials report every epoch.

    python bench/tracking_load.py --trials 1000 --epochs 30 --server sqlite
    python bench/tracking_load.py --trials 1000 --epochs 30 --tracking-uri http://127.0.0.1:5000  # e.g. PostgreSQL-backed
    python bench/tracking_load.py --trials 200 --epochs 10 --server sqlite --tracking-off --repeat 2

N trials of a no-op trainable (each epoch returns a handful of metrics at once) report M
epochs through the real sweep driver (``run_sweep``) and its MLflow callback, against an
``mlflow server``: ``--server sqlite`` starts one on a fresh SQLite file, ``--tracking-uri``
uses a running one (``scripts/cluster.sh up --backend postgres`` starts a PostgreSQL-backed
one). Printed: total wall time; the callback's time per reported result (median, p99: what
Tune's event loop pays for tracking); results per second; the time ``tokbench report`` takes
on the finished sweep; and (``--baseline``) the same trials through Tune with no tokbench
callback. Every epoch of every trial is checked in MLflow.

``--tracking-off`` also runs the same sweep through the same driver with tracking switched
off: ``run_sweep`` and its callback keep every piece of their own work (validation, cache
warm-up, the sweep state, its saves, the leaderboard), but the outbox they write to is a
no-op, no parent run is created, and neither the end-of-sweep check against MLflow nor the
report upload runs. The difference between the two is tracking alone: the outbox's SQLite
commits on Tune's event loop, its writer thread, and, on one machine, the MLflow server's
own CPU time. ``fit_s`` (``Tuner.fit``: the scheduling of every trial) is the figure the
"not slower by more than 10%" target compares; ``wall_s`` adds ``run_sweep``'s set-up and
its end-of-sweep work. ``--repeat N`` runs N rounds of on, then off (each round a new sweep
on the same server), for machines whose CPUs are shared.
"""

from __future__ import annotations

import argparse
import contextlib
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


def start_mlflow_server(backend_uri: str, artifacts: Path, port: int, workers: int = 2,
                        timeout_s: float = 300) -> subprocess.Popen:
    """``mlflow server`` on 127.0.0.1:``port`` (returns once /health answers; a machine under
    heavy load can take minutes to start one)."""
    import urllib.request

    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri, "--artifacts-destination",
         str(artifacts), "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return server
        except OSError:
            if server.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {server.returncode}")
            time.sleep(0.5)
    stop_server(server)
    raise RuntimeError(f"mlflow server did not answer within {timeout_s:.0f} s")


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


class NullOutbox:
    """An outbox that keeps nothing: every record is dropped, nothing is ever pending."""

    path, uri, last_error, written, closed = Path("/dev/null"), "", None, 0, False

    def start(self) -> "NullOutbox":
        return self

    def pending(self) -> int:
        return 0

    def flush(self, timeout: float) -> bool:
        return True

    def has_run(self, run_key: str) -> bool:
        return False

    def has_step(self, run_key: str, step: int) -> bool:
        return False

    def run_id(self, run_key: str) -> None:
        return None

    def run_ids(self) -> dict:
        return {}

    def __getattr__(self, name):
        # create_run, bind, log_metrics, set_tags, end, ...: accepted and dropped.
        return lambda *args, **kwargs: None


class NullRunLogger:
    """Stands in for the sweep's parent run, which tracking off never creates."""

    run_id = "tracking-off"

    def __init__(self, *args, **kwargs):
        pass


@contextlib.contextmanager
def tracking_off():
    """``run_sweep`` and its callback with tracking switched off (see the module docstring)."""
    import tokbench.report
    from tokbench.sweep import launch, mlflow_callback

    replaced = [(launch, "open_outbox", lambda *args, **kwargs: NullOutbox()),
                (mlflow_callback, "open_outbox", lambda *args, **kwargs: NullOutbox()),
                (launch, "RunLogger", NullRunLogger),
                (launch, "_sync_tracking", lambda *args, **kwargs: True),
                (tokbench.report, "publish_sweep_report", lambda *args, **kwargs: None)]
    saved = []
    for module, name, stand_in in replaced:
        if not hasattr(module, name):  # the driver changed: this mode would measure something else
            raise RuntimeError(f"{module.__name__}.{name} is gone; update tracking_off() in {__file__}")
        saved.append((module, name, getattr(module, name)))
        setattr(module, name, stand_in)
    try:
        yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)


@contextlib.contextmanager
def timed_fit(seconds: list, spans: list | None = None):
    """Append the wall seconds of every ``Tuner.fit`` inside the block to ``seconds`` (and
    its ``time.monotonic()`` start and end to ``spans``)."""
    original = tune.Tuner.fit

    def fit(self, *args, **kwargs):
        started, monotonic = time.perf_counter(), time.monotonic()
        try:
            return original(self, *args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - started)
            if spans is not None:
                spans.append((monotonic, time.monotonic()))

    tune.Tuner.fit = fit
    try:
        yield
    finally:
        tune.Tuner.fit = original


def run_load(folder: Path, h5ad: str, trials: int, epochs: int, tracking_uri: str, num_cpus: int, cpu: float,
             name: str = "load", tracking: bool = True) -> dict:
    """One load run through ``run_sweep``, tracking on or off; returns the figures (seconds)."""
    import ray

    from tokbench.sweep import mlflow_callback
    from tokbench.sweep.launch import run_sweep

    folder.mkdir(parents=True, exist_ok=True)
    path = write_load_sweep(folder, h5ad, trials, epochs, tracking_uri, cpu)
    ray.cloudpickle.register_pickle_by_value(sys.modules[NoOpTrainable.__module__])
    mlflow_callback.RESULT_SECONDS.clear()
    fit_seconds: list[float] = []
    started = time.perf_counter()
    with timed_fit(fit_seconds), (contextlib.nullcontext() if tracking else tracking_off()):
        run_sweep(path, name=name, num_cpus=num_cpus, trainable=NoOpTrainable, verbose=0)
    wall = time.perf_counter() - started
    per_result = np.asarray(mlflow_callback.RESULT_SECONDS) * 1000
    figures = {"tracking": "on" if tracking else "off", "trials": trials, "epochs": epochs,
               "wall_s": round(wall, 1), "fit_s": round(fit_seconds[0], 1), "results": int(per_result.size),
               "results_per_s": round(per_result.size / wall, 1),
               "overhead_ms_median": round(float(np.median(per_result)), 3) if per_result.size else None,
               "overhead_ms_p99": round(float(np.percentile(per_result, 99)), 3) if per_result.size else None}
    if not tracking:
        return figures
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tokbench.cli", "report", "--tracking-uri", tracking_uri, "--sweep", name,
                    "--out", str(folder / "report")], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    figures["report_s"] = round(time.perf_counter() - started, 1)
    figures.update(check_complete(tracking_uri, name, trials, epochs))
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
    parser.add_argument("--tracking-off", action="store_true",
                        help="also run the same sweep through the same driver with tracking off")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of (tracking on[, tracking off])")
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
            runs = []
            for i in range(1, args.repeat + 1):
                for tracking in (True, False) if args.tracking_off else (True,):
                    name = "load" if args.repeat == 1 and tracking else f"load{i}{'' if tracking else '-off'}"
                    runs.append(run_load(folder / name, h5ad, args.trials, args.epochs, uri, args.num_cpus, args.cpu,
                                         name=name, tracking=tracking))
                    print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
            figures = {"server": args.server or uri, **runs[0]}
            if len(runs) > 1:
                figures["runs"] = runs
                on = [r["fit_s"] for r in runs if r["tracking"] == "on"]
                off = [r["fit_s"] for r in runs if r["tracking"] == "off"]
                if off:
                    # Each round's on against its own off: the shared CPUs' load drifts between rounds.
                    figures["fit_slowdown_pct"] = [round(100 * (a / b - 1), 1) for a, b in zip(on, off)]
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
