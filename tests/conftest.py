"""Shared fixtures: small real data (pbmc68k_reduced as counts) and tiny hand-made h5ad files."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

# A handful of real symbols with known positions, reused by hand-made datasets.
SYMBOLS = ["CD3E", "MS4A1", "CD14", "LYZ", "XIST", "GAPDH", "ACTB", "NKG7", "CD8A", "FCGR3A", "PTPRC", "CD19"]


@pytest.fixture(scope="session", autouse=True)
def _no_tracking_or_storage_from_the_environment(tmp_path_factory):
    # An empty tracking.uri / storage_path falls back to these; a developer's own values
    # would send test runs to their MLflow server and results folder. Session-wide, so the
    # module-scoped Ray clusters (and the job drivers they start) never see them either;
    # a test that wants them sets them with monkeypatch.setenv. A sweep's report folder
    # (report-<sweep id>/, else in the working directory) goes to a temporary folder.
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.delenv("TOKBENCH_STORAGE_PATH", raising=False)
        patch.setenv("TOKBENCH_REPORT_DIR", str(tmp_path_factory.mktemp("reports")))
        yield


@pytest.fixture(autouse=True)
def _propagate_tokbench_logs():
    # The CLI configures handlers; in tests records must reach caplog.
    logging.getLogger("tokbench").propagate = True
    yield


@pytest.fixture(scope="session")
def pbmc_counts() -> ad.AnnData:
    """scanpy's pbmc68k_reduced (700 cells, 765 genes) with integer counts recovered."""
    import scanpy as sc

    pbmc = sc.datasets.pbmc68k_reduced()
    raw = pbmc.raw.X.toarray() if sp.issparse(pbmc.raw.X) else np.asarray(pbmc.raw.X)
    counts = np.round(np.expm1(raw) * pbmc.obs["n_counts"].to_numpy()[:, None] / 1e4).astype(np.float32)
    obs = pbmc.obs[["bulk_labels", "phase"]].copy()
    # A deterministic three-way split column, as a "predefined" split would carry.
    obs["split"] = pd.Categorical(np.array(["train", "train", "train", "val", "test"])[np.arange(len(obs)) % 5])
    return ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=pbmc.raw.var_names.astype(str)))


@pytest.fixture
def pbmc_h5ad(pbmc_counts, tmp_path) -> Path:
    path = tmp_path / "pbmc.h5ad"
    pbmc_counts.write_h5ad(path)
    return path


def tiny_adata(n_cells: int = 60, seed: int = 0) -> ad.AnnData:
    """Counts for 12 real genes, 3 cell types with marker genes, 3 tissues."""
    rng = np.random.default_rng(seed)
    types = np.array(["B cell", "T cell", "monocyte"])[np.arange(n_cells) % 3]
    tissues = np.array(["blood", "lung", "gut"])[(np.arange(n_cells) // 3) % 3]
    rate = np.full((n_cells, len(SYMBOLS)), 2.0)
    rate[types == "T cell", 0] = 30
    rate[types == "B cell", 1] = 30
    rate[types == "monocyte", 2] = 30
    counts = rng.poisson(rate).astype(np.float32)
    obs = pd.DataFrame({"cell_type": types, "tissue": tissues}, index=[f"cell{i}" for i in range(n_cells)])
    return ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=SYMBOLS))


@pytest.fixture
def tiny_h5ad(tmp_path) -> Path:
    path = tmp_path / "tiny.h5ad"
    tiny_adata().write_h5ad(path)
    return path


@pytest.fixture(scope="session")
def tiny_atlas(tmp_path_factory) -> dict:
    """A small synthetic atlas (480 cells, 300 genes, 4 tissues, 8 types) and its gene embeddings."""
    from tokbench.data.synth import write_atlas

    folder = tmp_path_factory.mktemp("atlas")
    return write_atlas(folder / "atlas.h5ad", n_cells=480, n_genes=300, seed=0)


def tiny_overrides(atlas: dict, tmp_path: Path) -> list[str]:
    """Overrides that make the cross_tissue experiment a seconds-long run on ``atlas``."""
    return [
        f"dataset.path={atlas['h5ad']}",
        f"gene_embeddings={atlas['gene_embeddings']}",
        f"dataset.cache_dir={tmp_path / 'cache'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "model.d_model=16",
        "model.n_heads=2",
        "model.n_layers=1",
        "trainer.batch_size=64",
        "trainer.max_epochs=2",
        "fc.select.size=48",
    ]


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def chromium_driver(*arguments: str):
    """Debian's headless Chromium driven by chromedriver, with extra command-line
    ``arguments`` (window size, say) and the browser console log kept; skip (locally) or
    fail (in CI, where `make test` installs it) without one."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    if missing:
        message = f"{', '.join(missing)} not installed (scripts/install_chromium.sh installs them)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", *arguments):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
