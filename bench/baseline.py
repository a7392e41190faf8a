"""Is tokbench's baseline as strong as the standard one? Test MCC and accuracy beside
scikit-learn's ``LogisticRegression()`` with its defaults, on the same training cells.

    python bench/baseline.py                    # the embedded atlas and pbmc68k_reduced
    python bench/baseline.py --atlas PATH.h5ad  # another atlas file in the atlas's layout

Both models see the same rows: tokbench's log-normalised expression of all genes (sparse
CSR), fitted on the training cells only. tokbench chooses C by 3-fold stratified
cross-validation on those cells (``baseline.*`` of the experiment); scikit-learn's default
is C=1, lbfgs, ``max_iter=100``. Data sets and splits:

- the atlas: the ``cross_tissue`` experiment (train on blood, lung and gut, 10% of their
  cells held out for validation; test on brain);
- ``scanpy.datasets.pbmc68k_reduced()`` (700 PBMCs, 765 genes, ``bulk_labels``): integer
  counts recovered as ``round(expm1(raw.X) * n_counts / 1e4)``, then tokbench's own
  preprocessing, and a random split stratified by label: 70% train, 10% validation,
  20% test (``split.seed=0``).

Prints one row per data set, the chosen C, the seconds of each fit and the difference.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np


def pbmc_h5ad(folder: Path) -> Path:
    """pbmc68k_reduced with its counts recovered, written as an h5ad under ``folder``."""
    import anndata as ad
    import pandas as pd
    import scanpy as sc
    import scipy.sparse as sp

    pbmc = sc.datasets.pbmc68k_reduced()
    raw = pbmc.raw.X.toarray() if sp.issparse(pbmc.raw.X) else np.asarray(pbmc.raw.X)
    counts = np.round(np.expm1(raw) * pbmc.obs["n_counts"].to_numpy()[:, None] / 1e4).astype(np.float32)
    adata = ad.AnnData(X=sp.csr_matrix(counts), obs=pbmc.obs[["bulk_labels"]].astype(str).copy(),
                       var=pd.DataFrame(index=pbmc.raw.var_names.astype(str)))
    path = folder / "pbmc68k_reduced_counts.h5ad"
    adata.write_h5ad(path)
    return path


def compare(name: str, overrides: list[str], run_dir: Path) -> dict:
    """Fit tokbench's baseline and scikit-learn's default on one data set; return the row."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, matthews_corrcoef

    from tokbench.training.baseline import LogisticRegressionBaseline, expression_matrix
    from tokbench.training.experiment import builtin_experiment, load_experiment
    from tokbench.training.run import load_data

    cfg = load_experiment(builtin_experiment("cross_tissue"), ["method=logreg", "tracking.enabled=false", *overrides])
    data = load_data(cfg)
    started = time.perf_counter()
    runner = LogisticRegressionBaseline(data, cfg.baseline, run_dir)
    history, result = runner.fit(), runner.test()
    tokbench_seconds = time.perf_counter() - started

    x, y = expression_matrix(data), np.asarray(data.labels)
    train, test = data.split_indices("train"), data.split_indices("test")
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        default = LogisticRegression().fit(x[train], y[train])
    default_seconds = time.perf_counter() - started
    predicted = default.predict(x[test])
    return {
        "data": name, "train": len(train), "test": len(test), "genes": data.n_genes,
        "tokbench_mcc": result["test_mcc"], "tokbench_acc": result["test_accuracy"], "C": history[0]["C"],
        "tokbench_s": tokbench_seconds,
        "sklearn_mcc": matthews_corrcoef(y[test], predicted), "sklearn_acc": accuracy_score(y[test], predicted),
        "sklearn_s": default_seconds, "sklearn_converged": not caught,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--atlas", help="an atlas h5ad to use instead of the embedded one")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        atlas = [f"dataset.path={Path(args.atlas).resolve()}"] if args.atlas else []
        pbmc = [
            f"dataset.path={pbmc_h5ad(tmp)}", "dataset.name=pbmc68k_reduced", "dataset.label_key=bulk_labels",
            "split.kind=random", "split.key=null", "split.val_fraction=0.1", "split.test_fraction=0.2", "split.seed=0",
        ]
        rows = [compare("atlas cross-tissue (->brain)", atlas, tmp / "atlas"),
                compare("pbmc68k_reduced (random 70/10/20)", pbmc, tmp / "pbmc")]

    print(f"{'data set':<34} {'train':>5} {'test':>5} {'genes':>5}   {'tokbench MCC / acc':>18} {'C':>5} {'s':>5}"
          f"   {'sklearn default MCC / acc':>25} {'s':>5}   {'MCC diff':>8}")
    for r in rows:
        note = "" if r["sklearn_converged"] else "  (sklearn default: lbfgs hit max_iter=100)"
        print(f"{r['data']:<34} {r['train']:>5} {r['test']:>5} {r['genes']:>5}   "
              f"{r['tokbench_mcc']:>9.3f} / {r['tokbench_acc']:.3f} {r['C']:>5g} {r['tokbench_s']:>5.1f}   "
              f"{r['sklearn_mcc']:>16.3f} / {r['sklearn_acc']:.3f} {r['sklearn_s']:>5.1f}   "
              f"{r['tokbench_mcc'] - r['sklearn_mcc']:>+8.3f}{note}")


if __name__ == "__main__":
    main()
