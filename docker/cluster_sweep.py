"""Write a copy of a sweep file pointed at the cluster's MLflow server and shared storage.

The files in search_spaces/ leave ``tracking.uri`` and ``storage_path`` empty, which means a
SQLite file and a results folder in the driver's working directory: right on one machine,
lost with a job's temporary working directory on a cluster, and not shared with the worker
nodes. This fills the empty ones from the environment every node of the cluster gets
(docker/compose.yaml, docker/kuberay/*.yaml):

    MLFLOW_TRACKING_URI     the MLflow server, e.g. http://mlflow:5000
    TOKBENCH_STORAGE_PATH   storage every node mounts at the same path, e.g. /home/ray/results

writes the copy to ``$TOKBENCH_STORAGE_PATH/sweeps/<file name>`` (next to the results it
produces, the same path each time so ``--resume`` finds the same sweep) and prints its path:

    tokbench sweep "$(python docker/cluster_sweep.py search_spaces/demo.yaml)" --address auto

Values the sweep file sets itself are kept.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml


def cluster_sweep(path: Path, tracking_uri: str, storage_path: str) -> Path:
    """Write ``path`` with empty ``tracking.uri``/``storage_path`` filled in; return the copy's path."""
    spec = yaml.safe_load(path.read_text()) or {}
    if not isinstance(spec, dict):
        raise SystemExit(f"error: {path}: not a sweep file (a YAML mapping)")
    tracking = spec.setdefault("tracking", {}) or {}
    spec["tracking"] = tracking
    if not tracking.get("uri"):
        tracking["uri"] = tracking_uri
    if not spec.get("storage_path"):
        spec["storage_path"] = storage_path
    # A base experiment given as a file is found relative to the sweep file, which moves.
    base = spec.get("base") or {}
    experiment = str(base.get("experiment", ""))
    if experiment.endswith((".yaml", ".yml")) and not Path(experiment).is_absolute():
        base["experiment"] = str((path.parent / experiment).resolve())
    out = Path(spec["storage_path"]) / "sweeps" / path.name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# {path} for the cluster (docker/cluster_sweep.py)\n" + yaml.safe_dump(spec, sort_keys=False))
    return out


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit("usage: python docker/cluster_sweep.py SEARCH_SPACE.yaml")
    path = Path(argv[0]).resolve()
    if not path.is_file():
        raise SystemExit(f"error: {argv[0]}: no such sweep file")
    missing = [name for name in ("MLFLOW_TRACKING_URI", "TOKBENCH_STORAGE_PATH") if not os.environ.get(name)]
    if missing:
        raise SystemExit(f"error: {' and '.join(missing)} not set; the cluster's manifests set them on every node")
    print(cluster_sweep(path, os.environ["MLFLOW_TRACKING_URI"], os.environ["TOKBENCH_STORAGE_PATH"]))


if __name__ == "__main__":
    main(sys.argv[1:])
