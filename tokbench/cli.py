"""The ``tokbench`` command line: ``data``, ``tokenizers``, ``train``, ``sweep`` and ``report``.

Every command and option carries a plain-text help that shows its default, so
``tokbench COMMAND --help`` is the reference for the command line; ``DESCRIPTION`` and
``EPILOG`` are what ``tokbench --help`` prints around the list of commands.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import textwrap
from pathlib import Path

from tokbench import __version__
from tokbench.errors import TokbenchError

DESCRIPTION = (
    "Benchmark how the tokenizer of a single-cell foundation model (gene identity Fg, "
    "expression Fe, cell constructor Fc) changes cell-type annotation across tissues: "
    "prepare a dataset, train one experiment, sweep tokenizers on Ray Tune, and compare "
    "them on a report page read from MLflow."
)
EPILOG = (
    "examples:\n"
    "  tokbench data synth --out atlas.h5ad\n"
    "  tokbench tokenizers\n"
    "  tokbench train cross_tissue fc=uce optimizer.lr=1e-3\n"
    "  tokbench sweep search_spaces/demo.yaml --dry-run\n"
    "  tokbench report --sweep demo-20260101-120000 --tracking-uri sqlite:///$PWD/mlflow.db\n"
    "\n"
    "tokbench COMMAND --help shows a command's options."
)
# Descriptions are wrapped here, not by argparse, so the examples keep their line breaks.
WIDTH = 78




class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Help with each option's default appended, and descriptions and epilogs printed as
    written (wrapped to ``WIDTH`` where they are made; the examples keep their lines).

    A default of None, False or empty is not shown: for an optional value the help says
    what happens without it ("default: X"), and a flag is off unless given; printing
    "(default: None)" would tell the reader nothing.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        default = action.default
        if default is None or default is False or (isinstance(default, (str, list, tuple)) and not default):
            return action.help or ""
        return super()._get_help_string(action)


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

    print(catalogue(tuple(args.plugin)))


def _command(commands: argparse._SubParsersAction, name: str, summary: str, details: str = "") -> argparse.ArgumentParser:
    """A sub-command whose one-line ``summary`` appears in its parent's list and opens its own
    help, followed by ``details``."""
    description = "\n\n".join(textwrap.fill(text, WIDTH) for text in (summary[0].upper() + summary[1:] + ".", details) if text)
    return commands.add_parser(name, help=summary, description=description, formatter_class=HelpFormatter)


def _data_options(p: argparse.ArgumentParser, split_key_default: str | None) -> None:
    """The options ``data inspect`` and ``data prepare`` share: where in the .h5ad file the
    counts, gene ids, labels and splits are."""
    p.add_argument("file", type=Path, help="the .h5ad file to read")
    p.add_argument("--label-key", default="cell_type", help="obs column holding the cell-type labels")
    p.add_argument("--split-key", default=split_key_default,
                   help="obs column holding the split (train/val/test values) or the tissue"
                        + ("" if split_key_default else "; default: labels are counted over all cells, not per split"))
    p.add_argument("--layer", default=None, help="layer holding the raw counts; default: X")
    p.add_argument("--gene-key", default=None, help="var column holding the gene ids; default: var_names")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``tokbench`` command."""
    parser = argparse.ArgumentParser(prog="tokbench", description=textwrap.fill(DESCRIPTION, WIDTH), epilog=EPILOG,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the installed version of tokbench and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages to stderr")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = _command(commands, "data", "generate, inspect and prepare datasets",
                    "tokbench data SUBCOMMAND --help shows a subcommand's options.")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")

    synth = _command(data_commands, "synth", "write the synthetic cross-tissue atlas (.h5ad) and its gene embeddings",
                     "Negative-binomial counts over real gene symbols, with cell-type, tissue and "
                     "type-by-tissue programs; the gene embeddings (a stand-in for a pretrained Fg) "
                     "go to OUT_STEM.gene_embeddings.pt beside the .h5ad file.")
    synth.add_argument("--out", type=Path, required=True, help="path of the .h5ad file to write")
    synth.add_argument("--n-cells", type=int, default=6000, help="number of cells")
    synth.add_argument("--n-genes", type=int, default=20_000, help="number of genes")
    synth.add_argument("--n-tissues", type=int, default=4, help="number of tissues (obs column tissue)")
    synth.add_argument("--n-cell-types", type=int, default=8, help="number of cell types (obs column cell_type)")
    synth.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same atlas")
    synth.set_defaults(func=_data_synth)

    inspect = _command(data_commands, "inspect", "cells, genes, sparsity, labels per split, and problems found")
    _data_options(inspect, None)
    inspect.set_defaults(func=_data_inspect)

    prepare = _command(data_commands, "prepare", "preprocess a dataset into the memory-mapped cache",
                       "Total-count normalisation and log1p, optionally the highly variable genes of the "
                       "training cells, written once per dataset and split options; training runs and sweep "
                       "trials then read this cache.")
    _data_options(prepare, "tissue")
    prepare.add_argument("--split", default="cross_tissue", choices=["predefined", "cross_tissue", "random"],
                         help="how cells are split: predefined (the split-key column holds train/val/test values), "
                              "cross_tissue (train on some tissues, test on held-out ones), random (stratified by label)")
    prepare.add_argument("--train", nargs="+", metavar="VALUE", help="split-key values to train on")
    prepare.add_argument("--val", nargs="+", metavar="VALUE",
                         help="split-key values to validate on; default: a stratified part of the training cells")
    prepare.add_argument("--test", nargs="+", metavar="VALUE", help="split-key values to test on")
    prepare.add_argument("--n-top-genes", type=int, default=None, metavar="N",
                         help="keep the N most highly variable genes, chosen on the training cells only; "
                              "default: every gene")
    prepare.add_argument("--cache-dir", default=None, help="cache directory; default: $TOKBENCH_CACHE, else ~/.cache/tokbench")
    prepare.add_argument("--rebuild", action="store_true",
                         help="preprocess again even when a cache of the same input and options exists")
    prepare.set_defaults(func=_data_prepare)

    tokenizers = _command(commands, "tokenizers", "list the Fg, Fe and Fc parts, their parameters, and the Fc presets")
    tokenizers.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                            help="also list the parts registered by this module (an importable name or a .py file); "
                                 "repeat for several")
    tokenizers.set_defaults(func=_tokenizers)

    train = _command(commands, "train", "train one experiment and record it in MLflow",
                     "Runs without Ray: train, validate each epoch, stop early on the tracked metric, "
                     "and score the test cells with the best-validation weights.")
    train.add_argument("experiment", help="experiment YAML file, or the name of a built-in experiment (cross_tissue)")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="dotted overrides of the experiment, e.g. model.d_model=256 fc=uce optimizer.lr=1e-3")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    train.add_argument("--no-progress", action="store_true", help="draw no progress bar (for logs and CI)")
    train.set_defaults(func=_train)

    sweep = _command(commands, "sweep", "run a sweep file on Ray Tune, locally or on a cluster",
                     "One trial per tokenizer combination, hyperparameter draw and seed, every trial recorded "
                     "in MLflow under one parent run per sweep.")
    sweep.add_argument("file", help="sweep file (search_spaces/*.yaml)")
    sweep.add_argument("--dry-run", action="store_true", help="expand and validate every trial, start nothing")
    sweep.add_argument("--address", help="address of a running Ray cluster (auto, or HEAD_IP:6379); "
                                         "default: start a Ray instance on this machine")
    sweep.add_argument("--name", help="sweep name (the Ray experiment directory); default: the sweep file's name "
                                      "field and the UTC time, NAME-YYYYMMDD-HHMMSS")
    sweep.add_argument("--resume", action="store_true",
                       help="continue an interrupted sweep: the latest one with this sweep file's name, or the one --name gives")
    sweep.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance; default: every CPU of this machine")
    sweep.add_argument("--sync", action="store_true",
                       help="write a sweep's queued MLflow records and fill what MLflow lacks from Ray's results "
                            "(after an MLflow outage; the latest sweep, or the one --name gives); runs no trial")
    sweep.set_defaults(func=_sweep)

    report = _command(commands, "report", "write the tokenizer comparison page (HTML, CSV, figures) of a sweep or experiment")
    which = report.add_mutually_exclusive_group(required=True)
    which.add_argument("--sweep", metavar="SWEEP_ID",
                       help="a sweep's id (its Ray experiment directory name, e.g. demo-20260101-120000)")
    which.add_argument("--experiment", metavar="NAME", help="every run of this MLflow experiment")
    report.add_argument("--tracking-uri", default="", metavar="URI",
                        help="sqlite:///PATH or http://HOST:PORT; default: $MLFLOW_TRACKING_URI, "
                             "else sqlite:///CWD/mlflow.db")
    report.add_argument("--out", type=Path, help="output directory; default: report-SWEEP_ID or report-NAME")
    report.add_argument("--watch", type=float, metavar="SECONDS",
                        help="rebuild the page every SECONDS until Ctrl-C, while a sweep runs; default: build once")
    report.set_defaults(func=_report)
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
