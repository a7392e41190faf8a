"""``tokbench sweep``: launch (or resume) a sweep on this machine or on a Ray cluster."""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
import uuid
from pathlib import Path
from typing import Optional

import pandas as pd

from tokbench.errors import TokbenchError
from tokbench.tokenizers.registry import PluginSource, plugin_source
from tokbench.sweep.spec import Sweep, dry_run, load_sweep
from tokbench.sweep.state import SweepState
from tokbench.tracking.mlflow_runs import RunLogger, resolve_tracking_uri
from tokbench.tracking.record import log_plugin_sources
from tokbench.tracking.outbox import PARENT_KEY, Outbox, QueuedRun, client_env_for_outbox, open_outbox

log = logging.getLogger("tokbench.sweep")

# How long the end of a sweep waits for MLflow to take every queued record before it stops
# and names the replay command (seconds; $TOKBENCH_TRACKING_WAIT overrides).
TRACKING_WAIT = 180.0


def storage_root(sweep: Sweep) -> Path:
    """The absolute, writable directory Ray writes results to: the sweep file's
    ``storage_path``; when empty, ``$TOKBENCH_STORAGE_PATH`` (set on every node by the
    tokbench cluster manifests); when that is unset or empty too, ``<cwd>/ray_results``.
    A relative path is taken against the current directory."""
    if sweep.spec.storage_path:
        source, path = "storage_path", sweep.spec.storage_path
    elif os.environ.get("TOKBENCH_STORAGE_PATH"):
        source, path = "TOKBENCH_STORAGE_PATH", os.environ["TOKBENCH_STORAGE_PATH"]
    else:
        source, path = "storage_path", "ray_results"
    root = Path(path).expanduser()
    if not root.is_absolute():
        root = Path.cwd() / root
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test-{uuid.uuid4().hex[:6]}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise TokbenchError(f"{source} {root}: not writable ({exc.strerror}); set {source} to a writable directory") from exc
    return root


def plugin_runtime_env(sources: list[PluginSource]) -> dict:
    """Ray's runtime environment that ships the user's modules to every worker
    (``py_modules``: a module file or a package folder each), merged by Ray with the job's
    own (``ray job submit --working-dir``)."""
    return {"py_modules": [str(source.path) for source in sources]} if sources else {}


def _connect(address: Optional[str], cpus: Optional[int], runtime_env: Optional[dict] = None) -> None:
    import ray

    # Results go to MLflow and to Ray's CSV/JSON logs; TensorBoard files are not wanted.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    if address and address != "auto":
        _probe(address)
    if ray.is_initialized():
        if runtime_env:
            log.warning("Ray was started before the sweep, so the sweep cannot add its modules (%s) to the "
                        "runtime environment; trials on other nodes can import them only if those nodes have them",
                        ", ".join(runtime_env["py_modules"]))
        return
    try:
        if address:
            ray.init(address=address, logging_level=logging.WARNING, runtime_env=runtime_env or None)
        else:
            ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING,
                     runtime_env=runtime_env or None)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise TokbenchError(
            f"no Ray cluster reachable at {address!r} ({str(exc).splitlines()[0]}); start one with "
            f"`ray start --head` (or scripts/cluster.sh up), or omit --address to run on this machine"
        ) from exc


def _probe(address: str) -> None:
    """Fail fast, with the address in the message, when nothing listens at HOST:PORT."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=5):
            return
    except (OSError, ValueError) as exc:
        raise TokbenchError(
            f"--address {address}: no Ray head node answers there ({exc}); start one with "
            "`ray start --head` (or scripts/cluster.sh up) and pass its HOST:PORT, or omit --address"
        ) from exc


def _check_resources(sweep: Sweep, address: Optional[str]) -> None:
    import ray

    total = ray.cluster_resources()
    need = sweep.spec.resources
    if need.gpu > 0 and total.get("GPU", 0) == 0:
        raise TokbenchError(
            f"{sweep.path}: resources.gpu={need.gpu:g} per trial, but the cluster "
            f"{'at ' + address if address else 'on this machine'} has no GPU; set resources.gpu=0"
        )
    if need.cpu > total.get("CPU", 0):
        raise TokbenchError(
            f"{sweep.path}: resources.cpu={need.cpu:g} per trial, but the cluster has {total.get('CPU', 0):g} CPUs"
        )


def _warm_caches(sweep: Sweep) -> None:
    """Build the dataset cache and compile the tokenizer kernel once on every node, before any
    trial starts there."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    trials = sweep.representative_trials()

    @ray.remote(num_cpus=1)
    def warm(sweep: Sweep, trials: list[dict]) -> int:
        from tokbench.data.prepare import prepare_dataset
        from tokbench.tokenizers.constructor import compile_kernels

        compile_kernels()

        seen = set()
        for trial in trials:
            cfg = sweep.trial_config(trial)
            key = repr((cfg.dataset, cfg.split))
            if key not in seen:
                seen.add(key)
                prepare_dataset(cfg.dataset, cfg.split)
        return len(seen)

    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) >= 1]
    refs = [
        warm.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(sweep, trials)
        for node in nodes
    ]
    ray.get(refs)


def _experiment_dir(root: Path, sweep: Sweep, name: Optional[str], resume: bool) -> Path:
    if name:
        return root / name
    if resume:
        candidates = sorted(
            (p for p in root.glob(f"{sweep.spec.name}-*") if p.is_dir() and SweepState.load(p) is not None),
            key=lambda p: p.stat().st_mtime,
        )
        if not candidates:
            raise TokbenchError(f"--resume: no sweep named {sweep.spec.name}-* in {root}; pass --name of the sweep to continue")
        return candidates[-1]
    return root / f"{sweep.spec.name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


def run_sweep(
    path: str | Path,
    *,
    address: Optional[str] = None,
    name: Optional[str] = None,
    resume: bool = False,
    num_cpus: Optional[int] = None,
    trainable=None,
    verbose: int = 1,
) -> pd.DataFrame:
    """Run the sweep in ``path``; return the leaderboard. All validation happens first.

    ``verbose``: 0 prints nothing while trials run; 1 a progress table every
    ``$TOKBENCH_CONSOLE_INTERVAL`` seconds (:mod:`tokbench.sweep.console`); 2 and up adds
    Ray Tune's own output at verbosity ``verbose - 1``. The leaderboard and the report's path
    are printed at the end."""
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from tokbench.report import publish_sweep_report
    from tokbench.sweep.console import ConsoleProgress
    from tokbench.sweep.mlflow_callback import MlflowSweepCallback
    from tokbench.sweep.report import leaderboard, print_leaderboard
    from tokbench.trainable import TokbenchTrainable

    sweep = load_sweep(path)
    dry_run(sweep)  # every trial config is valid before anything starts
    root = storage_root(sweep)
    exp_dir = _experiment_dir(root, sweep, name, resume)
    state = SweepState.load(exp_dir)
    if resume:
        if state is None or not tune.Tuner.can_restore(str(exp_dir)):
            raise TokbenchError(f"--resume: {exp_dir} holds no tokbench sweep to continue")
        if state.doc["sweep_hash"] != sweep.sweep_hash:
            raise TokbenchError(
                f"--resume: {exp_dir} was started from a different sweep file "
                f"({state.doc['sweep_file']}); resume it with that file unchanged"
            )
    elif state is not None:
        raise TokbenchError(f"{exp_dir} holds a sweep already; continue it with --resume --name {exp_dir.name}")
    # A resumed sweep keeps logging where it started, whatever MLFLOW_TRACKING_URI says now.
    uri = state.doc["tracking_uri"] if state is not None else resolve_tracking_uri(sweep.spec.tracking.uri)

    sources = [src for src in map(plugin_source, sweep.user_modules()) if src is not None]
    _connect(address, num_cpus, plugin_runtime_env(sources))
    _check_resources(sweep, address)

    client_env_for_outbox()
    if state is None:
        sweep_id = exp_dir.name
        # Created at once: a tracking URI that does not work is refused before any trial.
        created = RunLogger(uri, sweep.experiment_name, run_name=sweep_id, tags={"sweep_id": sweep_id, "tokbench.kind": "sweep"})
        state = SweepState(
            exp_dir,
            {"sweep_id": sweep_id, "sweep_hash": sweep.sweep_hash, "sweep_file": str(sweep.path),
             "parent_run_id": created.run_id, "tracking_uri": uri, "experiment": sweep.experiment_name},
        )
        state.save()
        outbox = open_outbox(exp_dir, uri).start()
        outbox.bind(PARENT_KEY, created.run_id)
        parent = QueuedRun(outbox, PARENT_KEY)
        parent.log_params({"sweep_file": str(sweep.path), "n_trials": sweep.n_trials(),
                           "scheduler": sweep.spec.scheduler.name, "search": sweep.spec.search.algorithm})
        _log_text(parent, "sweep.yaml", sweep.text)
        _log_text(parent, "trials.txt", dry_run(sweep))
        if sources:
            parent.set_tags({f"plugin.{src.module}": src.sha256 for src in sources})
            log_plugin_sources(parent, sources)
    else:
        # Whatever a killed driver left queued is written from now on, while the sweep goes on.
        outbox = open_outbox(exp_dir, uri).start()
        outbox.bind(PARENT_KEY, state.doc["parent_run_id"])
        if outbox.pending():
            log.info("tracking: %d records left queued by the previous driver are being written", outbox.pending())
        parent = QueuedRun(outbox, PARENT_KEY)
        outbox.reopen(PARENT_KEY)

    log.info("sweep %s: %d trials, results in %s, tracking %s", state.doc["sweep_id"], sweep.n_trials(), exp_dir, uri)
    trainable = trainable or TokbenchTrainable
    if verbose < 2:
        # Tune's newer console output prints an experiment box and a trial-status table even
        # when silenced; its classic reporter at verbosity 0 prints nothing, which leaves the
        # console to ConsoleProgress.
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    resources = {"cpu": sweep.spec.resources.cpu, "gpu": sweep.spec.resources.gpu}
    wrapped = tune.with_resources(tune.with_parameters(trainable, sweep=sweep), resources)
    try:
        _warm_caches(sweep)
        if resume:
            # The run config, our callback included, is restored from the experiment directory.
            tuner = tune.Tuner.restore(str(exp_dir), trainable=wrapped, resume_unfinished=True, resume_errored=True)
        else:
            tuner = tune.Tuner(
                wrapped,
                param_space=_param_space(sweep),
                tune_config=_tune_config(sweep),
                run_config=tune.RunConfig(
                    name=exp_dir.name,
                    storage_path=str(root),
                    callbacks=[CSVLoggerCallback(), JsonLoggerCallback(), MlflowSweepCallback(sweep, exp_dir, uri),
                               *([ConsoleProgress(sweep, _console_interval())] if verbose >= 1 else [])],
                    failure_config=tune.FailureConfig(max_failures=sweep.spec.max_failures),
                    checkpoint_config=tune.CheckpointConfig(checkpoint_frequency=1, num_to_keep=2, checkpoint_at_end=True),
                    # Ray's own per-trial result boxes only on request (verbose 2 and up).
                    verbose=max(0, verbose - 1),
                ),
            )
        tuner.fit()
    except BaseException:
        parent.end("KILLED")
        outbox.flush(timeout=10)  # best effort; whatever is left waits in the outbox for --resume
        raise
    state = SweepState.load(exp_dir)
    synced = _sync_tracking(outbox, state, exp_dir, sweep, _tracking_wait())
    board = leaderboard(state)
    _log_text(parent, "leaderboard.csv", board.to_csv(index=False))
    parent.log_metrics({"trials": len(state.doc["trials"]), "epochs_run": int(board["epochs_run"].sum()) if len(board) else 0})
    parent.end("FINISHED")
    print_leaderboard(board, state)
    if not (synced and outbox.flush(timeout=_tracking_wait())):
        raise TokbenchError(_replay_message(outbox, sweep, exp_dir))
    page = publish_sweep_report(uri, state.doc["sweep_id"], parent.run_id)  # never raises: the sweep is recorded
    if page is not None:
        print(f"report: {page}")
    return board


def _console_interval() -> float:
    """Seconds between two progress tables (``$TOKBENCH_CONSOLE_INTERVAL``, default 30)."""
    return float(os.environ.get("TOKBENCH_CONSOLE_INTERVAL") or 30.0)


def _tracking_wait() -> float:
    return float(os.environ.get("TOKBENCH_TRACKING_WAIT") or TRACKING_WAIT)


def _sync_tracking(outbox: Outbox, state: SweepState, exp_dir: Path, sweep: Sweep, wait: float) -> bool:
    """Write what is queued, check MLflow against Ray's results (queueing every gap), write
    that too, and record the run ids in the sweep state; True when MLflow is complete."""
    from tokbench.tracking.reconcile import find_gaps

    synced = outbox.flush(timeout=wait)
    if synced:
        try:
            find_gaps(outbox, state, exp_dir, sweep, parent_key=PARENT_KEY)
            synced = outbox.flush(timeout=wait)
        except Exception as exc:  # noqa: BLE001 - the server went away during the check
            log.warning("tracking check against Ray's results failed (%s)", str(exc).splitlines()[0][:300])
            synced = False
    for trial_id, run_id in outbox.run_ids().items():
        if trial_id in state.doc["trials"]:
            state.doc["trials"][trial_id]["run_id"] = run_id
    state.save()
    return synced


def _replay_message(outbox: Outbox, sweep: Sweep, exp_dir: Path) -> str:
    return (
        f"MLflow at {outbox.uri} did not take the sweep's last tracking records ({outbox.last_error or 'no answer'}): "
        f"{outbox.pending()} records are kept in {outbox.path}, and every trial's results are in Ray's storage at "
        f"{exp_dir}. Once the server answers, replay them with `tokbench sweep {sweep.path} --sync --name {exp_dir.name}`"
    )


def sync_sweep(path: str | Path, *, name: Optional[str] = None) -> int:
    """``tokbench sweep FILE --sync``: write a finished (or interrupted) sweep's queued tracking
    records and fill what MLflow lacks from Ray's results; returns the number of trials."""
    from tokbench.report import publish_sweep_report

    sweep = load_sweep(path)
    exp_dir = _experiment_dir(storage_root(sweep), sweep, name, resume=True)
    state = SweepState.load(exp_dir)
    if state is None:
        raise TokbenchError(f"--sync: {exp_dir} holds no tokbench sweep; pass --name of a sweep in {exp_dir.parent}")
    uri = state.doc["tracking_uri"]
    resolve_tracking_uri(uri)  # refuses, with the fix, a server that still does not answer
    client_env_for_outbox()
    outbox = open_outbox(exp_dir, uri).start()
    outbox.bind(PARENT_KEY, state.doc["parent_run_id"])
    queued = outbox.pending()
    if not _sync_tracking(outbox, state, exp_dir, sweep, _tracking_wait()):
        raise TokbenchError(_replay_message(outbox, sweep, exp_dir))
    print(f"sweep {state.doc['sweep_id']}: MLflow at {uri} holds all {len(state.doc['trials'])} trials "
          f"({queued} queued records written, then checked against Ray's results in {exp_dir})")
    publish_sweep_report(uri, state.doc["sweep_id"], state.doc["parent_run_id"])
    outbox.close()
    return len(state.doc["trials"])


def _log_text(logger: RunLogger, name: str, text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(text)
        logger.log_artifacts([path])


def _sampler(spec: dict, grid: bool):
    from ray import tune

    kind, args = next(iter(spec.items()))
    if kind == "choice":
        return tune.grid_search(list(args)) if grid else tune.choice(list(args))
    return {"loguniform": tune.loguniform, "uniform": tune.uniform, "randint": tune.randint}[kind](*args)


def _param_space(sweep: Sweep) -> dict:
    from ray import tune
    from omegaconf import OmegaConf

    spec = sweep.spec
    params = {k: _sampler(v, spec.search.algorithm == "grid") for k, v in OmegaConf.to_container(spec.params).items()}
    if spec.search.algorithm == "optuna":
        return {"combination": 0, "seed": int(spec.seeds[0]), "params": params}
    return {
        "combination": tune.grid_search(list(range(len(sweep.combinations)))),
        "seed": tune.grid_search([int(s) for s in spec.seeds]),
        "params": params,
    }


def _tune_config(sweep: Sweep):
    from ray import tune

    from tokbench.sweep.scheduler import ReferenceExemptASHA

    spec = sweep.spec
    max_epochs = spec.max_epochs or sweep.trial_config({"combination": 0, "seed": spec.seeds[0], "params": {}}).trainer.max_epochs
    scheduler = None
    if spec.scheduler.name == "asha":
        scheduler = ReferenceExemptASHA(
            exempt_combinations=[i for i, combo in enumerate(sweep.combinations) if combo["baseline"]],
            time_attr="training_iteration",
            metric=spec.scheduler.metric,
            mode=spec.scheduler.mode,
            max_t=int(max_epochs),
            grace_period=int(spec.scheduler.grace_period),
            reduction_factor=float(spec.scheduler.reduction_factor),
        )
    search_alg = None
    if spec.search.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(metric=spec.scheduler.metric, mode=spec.scheduler.mode, seed=int(spec.seeds[0]))
    metric_mode = {} if scheduler or search_alg else {"metric": spec.scheduler.metric, "mode": spec.scheduler.mode}
    return tune.TuneConfig(
        scheduler=scheduler,
        search_alg=search_alg,
        num_samples=int(spec.search.num_samples),
        max_concurrent_trials=int(spec.max_concurrent) or None,
        # A finished trial's worker takes the next trial (TokbenchTrainable.reset_config)
        # instead of a new process paying for Python, torch and tokbench imports again.
        reuse_actors=True,
        **metric_mode,
    )

