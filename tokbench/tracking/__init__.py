"""MLflow tracking: the only layer (with the sweep service) that talks to MLflow."""

from tokbench.tracking.mlflow_runs import RunLogger, flatten, resolve_tracking_uri

__all__ = ["RunLogger", "flatten", "resolve_tracking_uri"]
