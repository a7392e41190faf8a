"""Generate the synthetic atlas and print how well cell types transfer within and across tissues.

    python bench/calibrate_atlas.py [--n-cells 6000 --n-genes 2000 --seed 0]

Prints the generation time, the mean number of expressed genes per cell, and a table of
logistic-regression accuracy per tissue: within (a split of that tissue's cells) and
held out (trained on every other tissue). The defaults should give within >= 0.95 and a
held-out mean of roughly 0.6-0.85.
"""

from __future__ import annotations

import os
import sys

# Python puts this script's folder first on the path, and bench/ holds scripts named like
# standard modules (tokenize.py) that would shadow them; this script imports nothing from bench/.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from tokbench.data.synth import calibrate, generate_atlas  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    """Run the calibration; returns :func:`tokbench.data.synth.calibrate`'s dict plus timings (s)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-cells", type=int, default=6000)
    parser.add_argument("--n-genes", type=int, default=2000)
    parser.add_argument("--n-tissues", type=int, default=4)
    parser.add_argument("--n-cell-types", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    started = time.perf_counter()
    adata = generate_atlas(n_cells=args.n_cells, n_genes=args.n_genes, n_tissues=args.n_tissues,
                           n_cell_types=args.n_cell_types, seed=args.seed)
    generation_s = time.perf_counter() - started
    genes_per_cell = float(np.diff(adata.X.indptr).mean())
    print(f"atlas: {adata.n_obs} cells x {adata.n_vars} genes, seed {args.seed}, "
          f"generated in {generation_s:.1f} s")
    print(f"expressed genes per cell: {genes_per_cell:.0f} (mean; "
          f"{genes_per_cell / adata.n_vars:.1%} of genes), "
          f"UMIs per cell: {float(np.median(adata.obs['n_counts'])):.0f} (median)")

    started = time.perf_counter()
    result = calibrate(adata, seed=args.seed)
    calibration_s = time.perf_counter() - started
    print(f"\n{'tissue':<12}{'within':>8}{'held out':>10}")
    for tissue, within in result["within_tissue_accuracy"].items():
        print(f"{tissue:<12}{within:>8.3f}{result['cross_tissue_accuracy'][tissue]:>10.3f}")
    print(f"{'mean':<12}{result['within_tissue_mean']:>8.3f}{result['cross_tissue_mean']:>10.3f}")
    print(f"\ncalibration (logistic regression, {2 * len(result['within_tissue_accuracy'])} fits) "
          f"took {calibration_s:.1f} s")
    return {**result, "generation_s": generation_s, "calibration_s": calibration_s,
            "genes_per_cell": genes_per_cell}


if __name__ == "__main__":
    main()
