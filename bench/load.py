"""Seconds and peak memory to preprocess and cache a large synthetic atlas, and to reopen it.

    python bench/load.py                       # 200,000 cells x 20,000 genes
    python bench/load.py --n-cells 20000 --n-genes 5000

Each measured step runs in a fresh process, so peak RSS is that step's alone. The target:
peak memory of the build under 2x the CSR size of the matrix; the second open well under 1 s.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEP = r"""
import json, sys, time
import numpy as np
from tokbench.data.config import DatasetConfig, SplitConfig
from tokbench.data.prepare import prepare_dataset
path, cache_dir = sys.argv[1], sys.argv[2]

def high_water_mark():
    # VmHWM belongs to this process's own address space (ru_maxrss can carry the parent's).
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

baseline = high_water_mark()
t0 = time.perf_counter()
data = prepare_dataset(
    DatasetConfig(path=path, cache_dir=cache_dir, label_key="cell_type", chunk_size=8192),
    SplitConfig(kind="cross_tissue", key="tissue", train=["blood", "lung", "gut"], test=["brain"]),
)
touched = float(np.asarray(data.indptr[-1]))  # the arrays are mapped and readable
seconds = time.perf_counter() - t0
peak = high_water_mark()
print(json.dumps({"seconds": seconds, "peak_rss": peak, "import_rss": baseline, "nnz": data.meta["nnz"],
                  "n_cells": data.n_cells, "n_genes": data.n_genes}))
"""


def run_step(h5ad: Path, cache_dir: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", STEP, str(h5ad), str(cache_dir)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-cells", type=int, default=200_000)
    parser.add_argument("--n-genes", type=int, default=20_000)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    args = parser.parse_args()

    from tokbench.data.synth import write_atlas

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        h5ad = tmp / "atlas.h5ad"
        t0 = time.perf_counter()
        write_atlas(h5ad, n_cells=args.n_cells, n_genes=args.n_genes, seed=0)
        generate_s = time.perf_counter() - t0
        first = run_step(h5ad, tmp / "cache")
        second = run_step(h5ad, tmp / "cache")
    csr_bytes = first["nnz"] * 8 + (first["n_cells"] + 1) * 8
    gib = 1 << 30
    rows = [
        ("matrix", f"{first['n_cells']:,} cells x {first['n_genes']:,} genes, {first['nnz']:,} nonzero"),
        ("CSR size", f"{csr_bytes / gib:.2f} GiB"),
        ("generate + write h5ad", f"{generate_s:.1f} s"),
        ("preprocess + cache", f"{first['seconds']:.1f} s"),
        ("peak RSS (build process)", f"{first['peak_rss'] / gib:.2f} GiB = {first['peak_rss'] / csr_bytes:.2f}x CSR "
                                     f"(imports alone {first['import_rss'] / gib:.2f} GiB)"),
        ("second open (cache hit)", f"{second['seconds'] * 1000:.0f} ms"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
