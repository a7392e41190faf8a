"""``tokbench report``: the tokenizer comparison page of a sweep or an MLflow experiment.

``collect`` reads runs into tables through ``tokbench.tracking.reading`` (the report
itself never imports MLflow), ``stats`` aggregates them (the one
leaderboard, which ``tokbench sweep`` prints too; main effects; comparisons with bootstrap
intervals, paired t-tests and seeds needed for power), ``figures`` draws them, ``page``
renders the self-contained HTML from ``dashboards/`` and ``watch`` rebuilds it while a sweep
runs.
"""

from tokbench.report.page import build_report, publish_sweep_report
from tokbench.report.watch import watch

__all__ = ["build_report", "publish_sweep_report", "watch"]
