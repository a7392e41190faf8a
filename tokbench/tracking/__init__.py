"""MLflow tracking: the only layer (with the sweep service) that talks to MLflow."""

from tokbench.tracking.mlflow_runs import RunLogger, flatten, resolve_tracking_uri
from tokbench.tracking.outbox import Outbox, QueuedRun, open_outbox

__all__ = ["Outbox", "QueuedRun", "RunLogger", "flatten", "open_outbox", "resolve_tracking_uri"]
