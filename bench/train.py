"""Training throughput of the tutorial's model on the embedded atlas, batches prepared in the
background (``trainer.prefetch``, the default) and inside the step.

    python bench/train.py                     # d_model 128, 2 layers, 4 heads, geneformer L=2048, CPU
    python bench/train.py --threads 2 dataset.n_top_genes=5000 fc.select.size=320   # short sentences
    python bench/train.py --device cuda       # on a GPU, where one is at hand

Trains one epoch on ``--max-cells`` training cells through the same loop ``tokbench train``
uses, once per mode in ``--prefetch`` (each from a fresh model; ``--repeats`` alternates the
modes again, to see how much a shared machine moves the figures), and prints per mode:
training cells/s and tokens/s, the median milliseconds per training step (robust to other
processes stealing the CPU now and then), the time the step waited for its batch (the
exposed data time) and the time spent tokenising (in the background thread when
prefetching, so mostly hidden), both as shares of the training time, and the padded
fraction. ``--prefetch all`` adds a third mode, the background thread with an OpenMP team
of its own (what ``loop.one_intra_op_thread`` prevents), to show the thread contention.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch


def high_water_mark() -> int:
    """Peak resident memory of this process in bytes (Linux VmHWM)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def subset(cells: np.ndarray, n: int) -> np.ndarray:
    """``n`` of ``cells`` (all if fewer), drawn the same way on every call, sorted."""
    return np.sort(np.random.default_rng(0).choice(cells, min(n, len(cells)), replace=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--max-cells", type=int, default=2048, help="training cells in the measured epoch")
    parser.add_argument("--prefetch", choices=("both", "on", "off", "all"), default="both",
                        help="trainer.prefetch on, off, both (off first), or all: both plus the prefetch "
                             "thread with an OpenMP team of its own")
    parser.add_argument("--repeats", type=int, default=1, help="measure every mode this many times, alternating")
    parser.add_argument("overrides", nargs="*", help="extra config overrides, e.g. trainer.batch_size=64")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from tokbench.training import loop
    from tokbench.training.experiment import builtin_experiment, load_experiment
    from tokbench.training.run import build_runner, load_data

    one_thread = loop.one_intra_op_thread
    modes = {"both": ["off", "on"], "on": ["on"], "off": ["off"], "all": ["off", "on", "on, own team"]}[args.prefetch]
    common = ["fg=learned", "fe=zero", "fc=geneformer", "trainer.max_epochs=1", "tracking.enabled=false",
              f"trainer.device={args.device}", *args.overrides]
    cfg = load_experiment(builtin_experiment("cross_tissue"), common)
    data = load_data(cfg)
    rows = []
    # Read the measured cells once before any mode runs, so that the first mode does not pay
    # alone for the first reads of the memory-mapped cache and for loading the compiled kernel.
    with tempfile.TemporaryDirectory() as run_dir:
        warm = build_runner(cfg, run_dir, data=data)
        cells = subset(warm.train_cells, args.max_cells)
        for start in range(0, len(cells), 256):
            warm.tokenizer.sentences(cells[start : start + 256], 0, "cpu")
    for _ in range(args.repeats):
        for mode in modes:
            prefetch = mode != "off"
            loop.one_intra_op_thread = one_thread if mode != "on, own team" else (lambda: None)
            mode_cfg = load_experiment(builtin_experiment("cross_tissue"),
                                       common + [f"trainer.prefetch={str(prefetch).lower()}"])
            with tempfile.TemporaryDirectory() as run_dir:
                runner = build_runner(mode_cfg, run_dir, data=data)
                ends = [time.perf_counter()]
                runner.on_batch = lambda *_: ends.append(time.perf_counter())
                # Measure on a subset of the training cells: the per-cell cost is what matters.
                # Validation only has to run, so a quarter as many of its cells will do.
                runner.train_cells = subset(runner.train_cells, args.max_cells)
                runner.val_cells = subset(runner.val_cells, args.max_cells // 4)
                metrics = runner.step()
            rows.append((
                mode,
                f"{metrics['cells_per_second']:,.1f}",
                f"{metrics['tokens_per_second']:,.0f}",
                f"{1000 * np.median(np.diff(ends)):.1f}",
                f"{metrics['data_fraction']:.1%}",
                f"{metrics['tokenise_fraction']:.1%}" + (" (background)" if prefetch else " (in the step)"),
                f"{metrics['padded_fraction']:.1%}",
            ))

    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"CPU, {args.threads} threads"
    lengths = np.diff(np.asarray(data.indptr))
    print(f"model   d_model {cfg.model.d_model}, {cfg.model.n_layers} layers, {cfg.model.n_heads} heads; "
          f"{cfg.fc.name} L={cfg.fc.select.size}; batch {cfg.trainer.batch_size}")
    print(f"device  {device}")
    print(f"cells   {len(runner.train_cells):,} training cells; {data.n_genes:,} genes, "
          f"{np.mean(lengths):.0f} expressed per cell (mean)")
    print(f"memory  {high_water_mark() / 2**30:.2f} GiB peak RSS"
          + (f", {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB GPU" if args.device.startswith("cuda") else ""))
    header = ("prefetch", "cells/s", "tokens/s", "median ms/step", "waiting for the batch", "tokenisation", "padded")
    table = [header, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for row in table:
        print("  ".join(f"{v:<{w}}" for v, w in zip(row, widths)))


if __name__ == "__main__":
    sys.exit(main())
