"""Build the comparison page: MLflow runs → tables (CSV) → figures (PNG, SVG) → one
self-contained HTML file, rendered from ``dashboards/`` (the template, its CSS and the
figure list).

Output directory::

    report.html            the page; styles and figures inlined, opens offline
    tables/*.csv           every table on the page, NaN left empty (never 0)
    figures/<id>.png/.svg  every figure, for papers and slides
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import numbers
import os
import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import yaml

from tokbench.errors import TokbenchError
from tokbench.fileio import write_atomic
from tokbench.report import collect, stats
from tokbench.report.figures import DRAW, ReportTables, save_figure
from tokbench.tracking.reading import publish_folder

log = logging.getLogger("tokbench.report")

# The page's template, stylesheet and figure list; the top-level `dashboards/` of the
# repository is this directory, shipped inside the package so installed copies find it.
DASHBOARDS = Path(__file__).resolve().parent / "templates"
TEMPLATE = "report.html.j2"
STYLESHEET = "report.css"
FIGURE_LIST = "figures.yaml"
FIGURE_KEYS = {"id", "draw", "section", "title", "caption"}
VERSIONED = ("tokbench", "ray", "torch", "mlflow", "pandas", "matplotlib")


@dataclass
class FigureSpec:
    """One entry of ``figures.yaml``."""

    id: str
    draw: str
    section: str
    title: str
    caption: str


def dashboards_dir() -> Path:
    """The directory holding the page's template, CSS and figure list."""
    if not (DASHBOARDS / TEMPLATE).is_file():
        raise TokbenchError(
            f"{DASHBOARDS / TEMPLATE}: the report template is missing; reinstall tokbench "
            f"(pip install -e . from a checkout ships dashboards/ with the package)"
        )
    return DASHBOARDS


def load_figure_specs(path: Optional[Path] = None) -> list[FigureSpec]:
    """The figures of the page from ``figures.yaml``, checked: every entry has exactly the
    keys id, draw, section, title, caption; ids are unique and ``draw`` names a function
    in ``tokbench.report.figures.DRAW``."""
    path = path or dashboards_dir() / FIGURE_LIST
    entries = yaml.safe_load(path.read_text()) or []
    if not isinstance(entries, list):
        raise TokbenchError(f"{path}: expected a list of figures, got {type(entries).__name__}")
    specs, seen = [], set()
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or set(entry) != FIGURE_KEYS:
            keys = sorted(entry) if isinstance(entry, dict) else entry
            raise TokbenchError(f"{path}: figure {index}: expected keys {sorted(FIGURE_KEYS)}, got {keys}")
        if entry["draw"] not in DRAW:
            raise TokbenchError(f"{path}: figure {entry['id']}: draw {entry['draw']!r} is not one of {', '.join(DRAW)}")
        if entry["id"] in seen:
            raise TokbenchError(f"{path}: figure id {entry['id']!r} appears twice")
        seen.add(entry["id"])
        specs.append(FigureSpec(**{k: str(v) for k, v in entry.items()}))
    return specs


def build_tables(runs: collect.RunSet) -> ReportTables:
    """Every table the page shows, from the runs (reads the best trial's confusion files)."""
    board = stats.leaderboard(runs.trials)
    best = stats.best_tokenizer(board)
    trial = stats.best_trial(runs.trials, best)
    confusion = per_class = None
    if trial is not None and runs.reader is not None:
        confusion, per_class = collect.confusion_tables(runs.reader, trial["run_id"])
    return ReportTables(
        trials=runs.trials,
        curves=runs.curves,
        board=board,
        heatmap=stats.heatmap_table(board),
        effects=stats.main_effects(board),
        pairwise=stats.pairwise_vs_best(runs.trials, best),
        compute=stats.compute_table(runs.trials),
        best=best,
        best_trial=trial,
        confusion=confusion,
        per_class=per_class,
    )


def write_tables(tables: ReportTables, out_dir: Path) -> list[str]:
    """Write the tables as CSV into ``out_dir``; return the file names."""
    out_dir.mkdir(parents=True, exist_ok=True)
    frames = {
        "leaderboard.csv": tables.board,
        "trials.csv": tables.trials,
        "heatmap.csv": tables.heatmap,
        "main_effects.csv": tables.effects,
        "pairwise.csv": tables.pairwise,
        "compute.csv": tables.compute,
        "learning_curves.csv": tables.curves,
    }
    if tables.confusion is not None:
        frames["best_trial_confusion_matrix.csv"] = tables.confusion
    if tables.per_class is not None:
        frames["best_trial_per_class.csv"] = tables.per_class
    for name, frame in frames.items():
        frame.to_csv(out_dir / name, index=name == "best_trial_confusion_matrix.csv")
    return list(frames)


def render_figures(tables: ReportTables, specs: list[FigureSpec], out_dir: Path) -> list[dict]:
    """Draw every figure of ``specs``; each entry of the result has the spec's fields plus
    ``svg`` (inline markup) or ``note`` (why there is nothing to draw). A figure that fails
    to draw becomes a note, so one broken figure never costs the whole page."""
    from matplotlib.figure import Figure

    rendered = []
    for spec in specs:
        entry = {**spec.__dict__, "svg": None, "note": None}
        try:
            drawn = DRAW[spec.draw](tables)
            if isinstance(drawn, Figure):
                entry["svg"] = save_figure(drawn, spec.id, out_dir)
            else:
                entry["note"] = drawn
        except Exception as exc:  # noqa: BLE001
            log.warning("report figure %s could not be drawn: %s", spec.id, exc, exc_info=True)
            entry["note"] = f"This figure could not be drawn ({type(exc).__name__}: {exc})."
        rendered.append(entry)
    return rendered


def versions() -> dict[str, str]:
    """Versions of Python and the packages whose behaviour the numbers depend on."""
    found = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def _is_missing(value) -> bool:
    if value is None or value is pd.NA:
        return True
    return isinstance(value, float) and math.isnan(value)


def format_number(value, digits: int = 3):
    """A number for the page: integers as they are, floats to ``digits`` decimals, and a
    missing value as a marked "missing" (never 0)."""
    from markupsafe import Markup

    if _is_missing(value):
        return Markup('<span class="missing">missing</span>')
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, numbers.Integral):
        return str(int(value))
    return f"{float(value):.{digits}f}"


def format_mean_sd(mean, sd, digits: int = 3):
    """``mean ± sd``; the mean alone when sd is undefined (one seed); "missing" without a mean."""
    from markupsafe import Markup

    if _is_missing(mean):
        return format_number(mean)
    if _is_missing(sd):
        return f"{mean:.{digits}f}"
    return Markup(f"{mean:.{digits}f} &plusmn; {sd:.{digits}f}")


def format_interval(low, high, note: Optional[str] = None, digits: int = 3):
    """``[low, high]``; without an interval, the reason (``note``, e.g. "n seeds < 3: no
    interval") in place of numbers, so an empty cell is never read as a result."""
    from markupsafe import Markup, escape

    if _is_missing(low) or _is_missing(high):
        return Markup(f'<span class="note">{escape(note or stats.NO_INTERVAL)}</span>')
    return f"[{float(low):.{digits}f}, {float(high):.{digits}f}]"


def format_p_value(p_value, n=None):
    """A p-value with its n: ``0.042 (n=5)``, ``<0.001 (n=5)``; "missing" without one."""
    if _is_missing(p_value):
        return format_number(p_value)
    shown = "<0.001" if float(p_value) < 0.001 else f"{float(p_value):.3f}"
    return shown if _is_missing(n) else f"{shown} (n={int(n)})"


def format_degenerate(count, unknown=0):
    """Trials that predicted one class, marked when any did; "?" counts trials recorded
    without the check (unknown, not "no")."""
    from markupsafe import Markup

    count = 0 if _is_missing(count) else int(count)
    unknown = 0 if _is_missing(unknown) else int(unknown)
    text = Markup(f'<span class="flag">&#9888; {count}</span>') if count else "0"
    if unknown:
        text = Markup(f"{text} + {unknown}?")
    return text


def _records(frame: Optional[pd.DataFrame]) -> list[dict]:
    if frame is None or frame.empty:
        return []
    return frame.astype(object).where(frame.notna(), None).to_dict("records")


def _counts(trials: pd.DataFrame) -> dict:
    states = trials["end_state"].value_counts()
    return {
        "trials": len(trials),
        "finished": int(trials["finished"].astype(bool).sum()),
        "stopped_early": int(states.get("stopped_early", 0)),
        "running": int(states.get("running", 0)),
        "failed": int(states.get("failed", 0)),
        "unscored": int((trials["finished"].astype(bool) & ~stats.counted(trials)).sum()) if len(trials) else 0,
    }


def render_page(runs: collect.RunSet, tables: ReportTables, figures: list[dict], table_files: list[str],
                kind: str, refresh_seconds: Optional[float] = None) -> str:
    """The page's HTML (template ``dashboards/report.html.j2``, its CSS inlined)."""
    import jinja2

    folder = dashboards_dir()
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(folder), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = format_number
    env.filters["pm"] = format_mean_sd
    env.filters["interval"] = format_interval
    env.filters["pvalue"] = format_p_value
    env.filters["flag"] = format_degenerate
    board = _records(tables.board)
    by_name = {row["tokenizer"]: row for row in board}
    baseline = next((row for row in board if row["baseline"]), None)
    # The closest rival decides whether "best" is a winner or a tie.
    runner_up = next((row for row in board if row["tokenizer"] != tables.best and not row["baseline"]
                      and row["diff_vs_best"] is not None), None)
    trials = runs.trials
    return env.get_template(TEMPLATE).render(
        title=runs.title,
        kind=kind,
        tracking_uri=runs.tracking_uri,
        generated=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        refresh_seconds=int(refresh_seconds) if refresh_seconds else None,
        css=(folder / STYLESHEET).read_text(),
        ci_level=stats.CI_LEVEL,
        min_replicates=stats.MIN_REPLICATES,
        power=stats.POWER,
        alpha=stats.ALPHA,
        counts=_counts(trials),
        datasets=sorted({d for d in trials["dataset"] if d}),
        splits=sorted({s for s in trials["split"] if s}),
        best=by_name.get(tables.best),
        baseline=baseline if baseline and baseline["tokenizer"] != tables.best else None,
        runner_up=runner_up,
        board=board,
        effects=_records(tables.effects),
        pairwise=_records(tables.pairwise),
        compute=_records(tables.compute),
        trials=_records(trials),
        best_trial=None if tables.best_trial is None else _records(tables.best_trial.to_frame().T)[0],
        per_class=_records(tables.per_class),
        figures=figures,
        sweeps=runs.sweeps,
        versions=versions(),
        tables=table_files,
    )


def build_report(tracking_uri: Optional[str], out_dir: str | Path, *, sweep_id: Optional[str] = None,
                 experiment: Optional[str] = None, refresh_seconds: Optional[float] = None) -> Path:
    """Read one sweep (``sweep_id``) or one experiment from MLflow and write the page, its
    tables and figures into ``out_dir``; return the path of ``report.html``.
    ``refresh_seconds`` makes the browser reload the page that often (``--watch``)."""
    specs = load_figure_specs()
    runs = collect.load_runs(tracking_uri, sweep_id=sweep_id, experiment=experiment)
    tables = build_tables(runs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table_files = write_tables(tables, out_dir / "tables")
    figures = render_figures(tables, specs, out_dir / "figures")
    html = render_page(runs, tables, figures, table_files, "sweep" if sweep_id else "experiment", refresh_seconds)
    page = out_dir / "report.html"
    # Atomic, so a browser reloading the page (--watch) never reads half a file; not fsynced:
    # the page is rebuilt from MLflow at will, and a watch loop rewrites it every few seconds.
    write_atomic(page, html, durable=False)
    return page


def publish_sweep_report(tracking_uri: str, sweep_id: str, parent_run_id: str,
                         out_dir: Optional[str | Path] = None) -> Optional[Path]:
    """Build the sweep's page into ``out_dir`` (default ``report-<sweep id>/`` in
    ``$TOKBENCH_REPORT_DIR`` or else the working directory: plain files, openable without
    MLflow) and log it (page, tables, figures) as
    artifacts of the sweep's parent run under ``report/``; return the local page's path. The
    sweep is over and recorded when this runs, so a failure here is logged as a warning and
    returns None."""
    root = Path(os.environ.get("TOKBENCH_REPORT_DIR") or Path.cwd())
    folder = Path(out_dir) if out_dir is not None else root / f"report-{sweep_id}"
    try:
        page = build_report(tracking_uri, folder, sweep_id=sweep_id)
        location = f"{publish_folder(tracking_uri, parent_run_id, folder, 'report')}/report.html"
    except Exception as exc:  # noqa: BLE001
        log.warning("sweep %s: the report page could not be written (%s); the sweep's results are intact, "
                    "build it with `tokbench report --sweep %s --tracking-uri %s`",
                    sweep_id, exc, sweep_id, tracking_uri, exc_info=True)
        return None
    log.info("report of sweep %s: %s (in MLflow: %s)", sweep_id, page, location)
    return page
