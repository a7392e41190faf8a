"""The ``tokbench`` command: ``data``, ``tokenizers`` (and, as they land, ``train``/``sweep``/``report``)."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

from tokbench.errors import TokbenchError


def _data_synth(args: argparse.Namespace) -> None:
    from tokbench.data.synth import write_atlas

    summary = write_atlas(
        args.out,
        n_cells=args.n_cells,
        n_genes=args.n_genes,
        n_tissues=args.n_tissues,
        n_cell_types=args.n_cell_types,
        seed=args.seed,
    )
    print(json.dumps(summary, indent=1, default=str))


def _data_inspect(args: argparse.Namespace) -> None:
    from tokbench.data.inspect import inspect_h5ad

    print(
        inspect_h5ad(
            args.file, label_key=args.label_key, split_key=args.split_key, layer=args.layer, gene_key=args.gene_key
        )
    )


def _data_prepare(args: argparse.Namespace) -> None:
    from tokbench.data.config import DatasetConfig, SplitConfig
    from tokbench.data.prepare import prepare_dataset

    dataset = DatasetConfig(
        path=str(args.file),
        layer=args.layer,
        gene_key=args.gene_key,
        label_key=args.label_key,
        n_top_genes=args.n_top_genes,
        cache_dir=args.cache_dir or "",
    )
    split = SplitConfig(
        kind=args.split,
        key=args.split_key,
        train=args.train or [],
        val=args.val or [],
        test=args.test or [],
    )
    data = prepare_dataset(dataset, split, rebuild=args.rebuild)
    meta = data.meta
    print(f"cache     {data.path}")
    print(f"cells     {data.n_cells:,}  genes {data.n_genes:,}  nonzero {meta['nnz']:,}")
    print(f"splits    {meta['splits']['cells']}")
    print(f"classes   {len(data.class_names)}: {', '.join(data.class_names)}")


def _train(args: argparse.Namespace) -> None:
    from tokbench.train_command import train

    train(args.experiment, args.overrides, resume=args.resume, progress=not args.no_progress)


def _sweep(args: argparse.Namespace) -> None:
    from tokbench.sweep.spec import dry_run, load_sweep

    if args.dry_run:
        print(dry_run(load_sweep(args.file)))
        return
    from tokbench.sweep.launch import run_sweep

    if args.sync:
        from tokbench.sweep.launch import sync_sweep

        sync_sweep(args.file, name=args.name)
        return
    run_sweep(args.file, address=args.address, name=args.name, resume=args.resume, num_cpus=args.num_cpus)


def _report(args: argparse.Namespace) -> None:
    from tokbench.report import build_report, watch

    # An experiment name may hold slashes or spaces; the default directory name must not.
    out = args.out or Path("report-" + re.sub(r"[^A-Za-z0-9._-]+", "_", args.sweep or args.experiment))

    def build() -> Path:
        return build_report(args.tracking_uri, out, sweep_id=args.sweep, experiment=args.experiment,
                            refresh_seconds=args.watch)

    if args.watch is None:
        print(build())
        return
    watch(build, args.watch)


def _tokenizers(args: argparse.Namespace) -> None:
    from tokbench.tokenizers import catalogue

    print(catalogue())


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``tokbench`` command."""
    parser = argparse.ArgumentParser(prog="tokbench", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="generate, inspect and prepare datasets").add_subparsers(
        dest="data_command", required=True
    )
    synth = data.add_parser("synth", help="write the synthetic cross-tissue atlas (.h5ad) and its gene embeddings")
    synth.add_argument("--out", type=Path, required=True, help="output .h5ad path")
    synth.add_argument("--n-cells", type=int, default=6000)
    synth.add_argument("--n-genes", type=int, default=20_000)
    synth.add_argument("--n-tissues", type=int, default=4)
    synth.add_argument("--n-cell-types", type=int, default=8)
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=_data_synth)

    def data_options(p: argparse.ArgumentParser, split_key_default: str | None) -> None:
        p.add_argument("file", type=Path, help=".h5ad file")
        p.add_argument("--label-key", default="cell_type", help="obs column with cell-type labels")
        p.add_argument("--split-key", default=split_key_default, help="obs column with the split or tissue")
        p.add_argument("--layer", default=None, help="layer with raw counts (default: X)")
        p.add_argument("--gene-key", default=None, help="var column with gene ids (default: var_names)")

    inspect = data.add_parser("inspect", help="cells, genes, sparsity, labels per split, problems")
    data_options(inspect, None)
    inspect.set_defaults(func=_data_inspect)

    prepare = data.add_parser("prepare", help="preprocess into the memory-mapped cache")
    data_options(prepare, "tissue")
    prepare.add_argument("--split", default="cross_tissue", choices=["predefined", "cross_tissue", "random"])
    prepare.add_argument("--train", nargs="+", help="split-key values to train on")
    prepare.add_argument("--val", nargs="+", help="split-key values to validate on")
    prepare.add_argument("--test", nargs="+", help="split-key values to test on")
    prepare.add_argument("--n-top-genes", type=int, default=None)
    prepare.add_argument("--cache-dir", default=None, help="default: $TOKBENCH_CACHE or ~/.cache/tokbench")
    prepare.add_argument("--rebuild", action="store_true")
    prepare.set_defaults(func=_data_prepare)

    train = commands.add_parser("train", help="train one experiment and record it in MLflow")
    train.add_argument("experiment", help="experiment YAML, or a built-in name (cross_tissue)")
    train.add_argument("overrides", nargs="*", help="dotted overrides: model.d_model=256 fc=uce optimizer.lr=1e-3")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=_train)

    sweep = commands.add_parser("sweep", help="run a sweep file on Ray Tune (locally or on a cluster)")
    sweep.add_argument("file", help="search-space YAML (search_spaces/*.yaml)")
    sweep.add_argument("--dry-run", action="store_true", help="expand and validate every trial, start nothing")
    sweep.add_argument("--address", help="Ray cluster address (auto, or HEAD_IP:6379); default: start Ray here")
    sweep.add_argument("--name", help="sweep name (Ray experiment directory); default: <file name>-<UTC time>")
    sweep.add_argument("--resume", action="store_true", help="continue an interrupted sweep (the latest, or --name)")
    sweep.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance (default: all)")
    sweep.add_argument("--sync", action="store_true",
                       help="write a sweep's queued MLflow records and fill what MLflow lacks from Ray's results "
                            "(after an MLflow outage; the latest sweep, or --name); runs no trial")
    sweep.set_defaults(func=_sweep)

    report = commands.add_parser("report", help="the tokenizer comparison page (HTML, CSV, figures) of a sweep or experiment")
    which = report.add_mutually_exclusive_group(required=True)
    which.add_argument("--sweep", metavar="SWEEP_ID", help="a sweep's id (its Ray experiment directory name, e.g. demo-20260101-120000)")
    which.add_argument("--experiment", metavar="NAME", help="every run of an MLflow experiment")
    report.add_argument("--tracking-uri", default="", help="sqlite:///PATH or http://HOST:PORT (default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db)")
    report.add_argument("--out", type=Path, help="output directory (default: report-<sweep id or experiment>)")
    report.add_argument("--watch", type=float, metavar="SECONDS", help="rebuild every SECONDS until Ctrl-C, while a sweep runs")
    report.set_defaults(func=_report)

    tokenizers = commands.add_parser("tokenizers", help="the catalogue of Fg, Fe, Fc parts and presets")
    tokenizers.set_defaults(func=_tokenizers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; user errors print one line and exit 2."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        args.func(args)
    except TokbenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
