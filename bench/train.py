"""Training throughput of the tutorial's model on the embedded atlas.

    python bench/train.py                     # d_model 128, 2 layers, 4 heads, geneformer L=2048, CPU
    python bench/train.py --device cuda       # on a GPU, where one is at hand

Trains one epoch (or ``--max-cells`` training cells) through the same loop ``tokbench train``
uses and prints training cells/s, tokens/s, the share of step time spent building and
tokenising batches (the loop's own overhead), the padded fraction, and peak memory.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
import torch


def high_water_mark() -> int:
    """Peak resident memory of this process in bytes (Linux VmHWM)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--max-cells", type=int, default=2048, help="training cells in the measured epoch")
    parser.add_argument("overrides", nargs="*", help="extra config overrides, e.g. trainer.batch_size=64")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from tokbench.training.experiment import builtin_experiment, load_experiment
    from tokbench.training.run import build_runner, load_data

    cfg = load_experiment(builtin_experiment("cross_tissue"), [
        "fg=learned", "fe=zero", "fc=geneformer", "trainer.max_epochs=1", "tracking.enabled=false",
        f"trainer.device={args.device}", *args.overrides,
    ])
    data = load_data(cfg)
    with tempfile.TemporaryDirectory() as run_dir:
        runner = build_runner(cfg, run_dir, data=data)
        # Measure on a subset of the training cells: the per-cell cost is what matters.
        rng = np.random.default_rng(0)
        runner.train_cells = np.sort(rng.choice(runner.train_cells, min(args.max_cells, len(runner.train_cells)), replace=False))
        metrics = runner.step()
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"CPU, {args.threads} threads"
    lengths = np.diff(np.asarray(data.indptr))
    rows = [
        ("model", f"d_model {cfg.model.d_model}, {cfg.model.n_layers} layers, {cfg.model.n_heads} heads; "
                  f"{cfg.fc.name} L={cfg.fc.select.size}; batch {cfg.trainer.batch_size}"),
        ("device", device),
        ("cells", f"{len(runner.train_cells):,} training cells; {np.mean(lengths):.0f} expressed genes per cell (mean)"),
        ("training cells/s", f"{metrics['cells_per_second']:,.1f}"),
        ("training tokens/s", f"{metrics['tokens_per_second']:,.0f}"),
        ("data + tokenisation", f"{metrics['data_fraction']:.1%} of step time"),
        ("padded fraction", f"{metrics['padded_fraction']:.1%}"),
        ("peak memory", f"{high_water_mark() / 2**30:.2f} GiB RSS"
                        + (f", {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB GPU" if args.device.startswith("cuda") else "")),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    sys.exit(main())
