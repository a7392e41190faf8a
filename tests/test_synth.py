"""The synthetic cross-tissue atlas: determinism, layout, genes, embeddings, calibration."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from scipy.stats import chi2_contingency

from tokbench.data import synth
from tokbench.data.genes import gene_table
from tokbench.data.synth import CALIBRATION_TARGETS, calibrate, count_statistics, generate_atlas, write_atlas
from tokbench.errors import TokbenchError

SMALL = dict(n_cells=600, n_genes=400, seed=3)


@pytest.fixture(scope="module")
def small() -> ad.AnnData:
    return generate_atlas(**SMALL)


def test_same_seed_same_atlas_other_seed_differs(small):
    again = generate_atlas(**SMALL)
    assert (small.X != again.X).nnz == 0
    pd.testing.assert_frame_equal(small.obs, again.obs)
    pd.testing.assert_frame_equal(small.var, again.var)
    other = generate_atlas(**{**SMALL, "seed": 4})
    assert list(other.var_names) != list(small.var_names)
    assert (other.X != small.X).nnz > 0


def test_layout_and_integer_counts(small):
    assert small.shape == (600, 400)
    assert isinstance(small.X, sp.csr_matrix) and small.X.dtype == np.float32
    values = small.X.data
    assert (values >= 0).all() and np.array_equal(values, np.round(values))
    assert list(small.obs.columns) == ["cell_type", "tissue", "n_counts"]
    assert isinstance(small.obs["cell_type"].dtype, pd.CategoricalDtype)
    assert list(small.obs["tissue"].cat.categories) == ["blood", "lung", "gut", "brain"]
    np.testing.assert_allclose(small.obs["n_counts"], np.asarray(small.X.sum(axis=1)).ravel())
    assert list(small.var.columns) == ["ensembl_id", "chromosome", "start"]
    params = small.uns["synth"]
    assert params["seed"] == 3 and params["n_genes"] == 400 and "marker_loss" in params


def test_every_type_in_every_tissue_with_the_floor(small):
    table = pd.crosstab(small.obs["tissue"], small.obs["cell_type"])
    assert table.shape == (4, 8)
    assert (table.to_numpy() >= synth.AtlasKnobs().min_cells_per_type).all()
    # Dirichlet proportions: tissues differ in composition (too few cells here to show it
    # reliably, so a larger atlas of few genes, tested for independence of tissue and type).
    larger = generate_atlas(n_cells=4000, n_genes=50, seed=3).obs
    assert chi2_contingency(pd.crosstab(larger["tissue"], larger["cell_type"]).to_numpy()).pvalue < 1e-3


def test_generic_names_beyond_the_realistic_ones():
    atlas = generate_atlas(n_cells=1100, n_genes=120, n_tissues=5, n_cell_types=10, seed=1)
    assert list(atlas.obs["cell_type"].cat.categories)[8:] == ["type_9", "type_10"]
    assert list(atlas.obs["tissue"].cat.categories)[4] == "tissue_5"
    assert atlas.obs.groupby(["tissue", "cell_type"], observed=False).size().min() > 0


def test_genes_are_real_clean_and_spread_over_chromosomes():
    atlas = generate_atlas(n_cells=200, n_genes=2000, n_cell_types=4, seed=0)
    table = gene_table().set_index("symbol")
    assert atlas.var_names.is_unique
    rows = table.loc[atlas.var_names]
    assert (rows["ensembl_id"].to_numpy() == atlas.var["ensembl_id"].to_numpy()).all()
    assert (rows["chromosome"].to_numpy() == atlas.var["chromosome"].to_numpy()).all()
    assert (rows["start"].to_numpy() == atlas.var["start"].to_numpy()).all()
    nuclear = atlas.var["chromosome"] != "MT"
    assert not atlas.var_names[nuclear.to_numpy()].str.contains(r"[-.]").any()
    assert atlas.var.loc[nuclear, "chromosome"].nunique() >= 23


@pytest.fixture(scope="module")
def default_shape() -> ad.AnnData:
    """Few cells, but the default vocabulary and every default per-gene and per-cell knob."""
    return generate_atlas(n_cells=800, seed=0)


def test_default_atlas_statistics_within_their_tolerances(default_shape):
    assert default_shape.n_vars == 20_000
    stats = count_statistics(default_shape)
    has_mito = default_shape.var_names.str.startswith("MT-").any()
    outside = [f"{t.statistic}={stats[t.statistic]:.3f} not in [{t.low}, {t.high}]"
               for t in CALIBRATION_TARGETS
               if not (t.statistic == "mito_fraction_median" and not has_mito)
               and not t.low <= stats[t.statistic] <= t.high]
    assert not outside
    # Whole-transcriptome droplet data: 1-3k genes detected per cell, 3-10% of the vocabulary.
    detected = np.diff(default_shape.X.indptr)
    assert 1000 < np.median(detected) < 3000 and np.percentile(detected, 5) > 500


def test_count_statistics_on_hand_made_counts():
    X = np.array([[0, 1, 2, 0], [3, 0, 0, 0], [1, 1, 0, 0], [0, 0, 4, 0]], dtype=np.float32)
    var = pd.DataFrame(index=["CD3E", "MT-CO1", "LYZ", "ACTB"])
    stats = count_statistics(ad.AnnData(X=sp.csr_matrix(X), var=var), label_key=None)
    assert stats["genes_per_cell_median"] == 1.5 and stats["detected_fraction_median"] == 1.5 / 4
    assert stats["umis_per_cell_median"] == 3.0
    assert stats["mito_fraction_median"] == pytest.approx(np.median([1 / 3, 0, 1 / 2, 0]))
    assert stats["umis_per_detected_gene_median"] == pytest.approx(np.median([1.5, 3, 1, 4]))
    # (var - mean) / mean^2 with the n-1 variance: CD3E (0,3,1,0) 1; MT-CO1 (1,0,1,0) -2/3;
    # LYZ (2,0,0,4) 0.963; ACTB has mean 0 and is left out.
    assert stats["overdispersion_median"] == pytest.approx((11 / 3 - 1.5) / 2.25)
    assert stats["zero_fraction[1,3)"] == pytest.approx(0.5)


def test_markers_detected_mostly_in_their_type(default_shape):
    labels = default_shape.obs["cell_type"].astype(str).to_numpy()
    position = {g: i for i, g in enumerate(default_shape.var_names)}
    for cell_type, markers in default_shape.uns["synth"]["marker_genes"].items():
        hit = (default_shape.X[:, [position[g] for g in markers]] > 0).toarray()
        by_tissue = pd.DataFrame(hit[labels == cell_type]).groupby(
            default_shape.obs["tissue"].to_numpy()[labels == cell_type]).mean()
        # Each marker is silenced in some tissues; where it is on, most of its type detects it.
        assert np.median(by_tissue.max(axis=0)) > 0.5
        assert hit[labels != cell_type].mean() < 0.1


def test_small_vocabularies_are_panels_not_empty_cells():
    # A 300-gene atlas keeps program genes and the most abundant ones, as a panel of real
    # cells would: cells detect a good share of it, so tiny test atlases stay informative.
    atlas = generate_atlas(n_cells=480, n_genes=300, seed=0)
    detected = np.diff(atlas.X.indptr)
    assert np.median(detected) > 0.3 * atlas.n_vars and detected.min() > 30
    markers = {g for genes in atlas.uns["synth"]["marker_genes"].values() for g in genes}
    assert len(markers) >= 100
    result = calibrate(atlas)
    assert result["within_tissue_mean"] >= 0.9 and result["cross_tissue_mean"] < result["within_tissue_mean"]


def test_mitochondrial_genes_take_their_share_when_the_table_has_them(monkeypatch):
    # Four mitochondrial genes on a table without its own, so the test holds on any table.
    table = gene_table()[gene_table()["chromosome"] != "MT"]
    mito = pd.DataFrame({"symbol": ["MT-ND1", "MT-CO1", "MT-ATP6", "MT-CYB"],
                         "ensembl_id": [f"ENSG0000019{i:04d}" for i in range(4)],
                         "chromosome": "MT", "start": [3307, 5904, 8527, 14747],
                         "end": [4262, 7445, 9207, 15887]})
    monkeypatch.setattr(synth, "gene_table", lambda: pd.concat([table, mito], ignore_index=True))
    atlas = generate_atlas(n_cells=400, n_genes=3000, seed=1, mito_fraction=0.05)
    assert set(atlas.var_names[atlas.var["chromosome"] == "MT"]) == set(mito["symbol"])
    share = np.asarray(atlas[:, atlas.var["chromosome"] == "MT"].X.sum(axis=1)).ravel() / atlas.obs["n_counts"]
    # 5% of a whole transcriptome's UMIs; a 3,000-gene panel carries fewer UMIs, so more.
    assert 0.04 < np.median(share) < 0.2


def test_negative_binomial_sampler_matches_mean_and_zero_fraction():
    rng = np.random.default_rng(0)
    theta = np.array([0.5, 4.0, 4.0, 1.0], dtype=np.float32)
    mean = np.tile(np.array([0.05, 0.5, 3.0, 20.0], dtype=np.float32), (40_000, 1))
    counts = synth._sample_nb(mean, theta, rng).toarray()
    np.testing.assert_allclose(counts.mean(axis=0), mean[0], rtol=0.05)
    expected_zero = (1 + mean[0] / theta) ** -theta
    np.testing.assert_allclose((counts == 0).mean(axis=0), expected_zero, atol=0.01)
    expected_var = mean[0] + mean[0] ** 2 / theta
    np.testing.assert_allclose(counts.var(axis=0), expected_var, rtol=0.1)


def test_chunked_generation_stacks_rows(monkeypatch):
    monkeypatch.setattr(synth, "CHUNK_ENTRIES", 128 * 150)
    atlas = generate_atlas(n_cells=700, n_genes=150, seed=2)
    atlas.X.check_format(full_check=True)
    assert atlas.shape == (700, 150) and (np.diff(atlas.X.indptr) > 0).all()


def test_bad_arguments_say_what_to_do():
    with pytest.raises(TokbenchError, match="min_cells_per_type"):
        generate_atlas(n_cells=100, n_genes=100)
    with pytest.raises(TokbenchError, match="known knobs"):
        generate_atlas(n_cells=400, n_genes=100, marker_strength=2.0)


def test_write_atlas_round_trip_and_gene_embeddings(tmp_path):
    summary = write_atlas(tmp_path / "atlas.h5ad", n_cells=500, n_genes=600, seed=5,
                          embedding_dim=32)
    assert summary["h5ad"] == str(tmp_path / "atlas.h5ad")
    assert summary["gene_embeddings"] == str(tmp_path / "atlas.gene_embeddings.pt")
    assert (summary["n_cells"], summary["n_genes"]) == (500, 600)

    back = ad.read_h5ad(summary["h5ad"])
    direct = generate_atlas(n_cells=500, n_genes=600, seed=5)
    assert (back.X != direct.X).nnz == 0
    pd.testing.assert_frame_equal(back.obs, direct.obs)
    markers = direct.uns["synth"]["marker_genes"]
    assert list(back.uns["synth"]["marker_genes"]["T cell"]) == markers["T cell"]

    embeddings = torch.load(summary["gene_embeddings"])
    assert set(embeddings) == set(back.var_names)
    vector = embeddings[back.var_names[0]]
    assert vector.dtype == torch.float32 and vector.shape == (32,)

    # Genes sharing a marker program sit closer than random pairs: the file carries signal.
    symbols = list(back.var_names)
    unit = torch.nn.functional.normalize(torch.stack([embeddings[g] for g in symbols]), dim=1)
    position = {g: i for i, g in enumerate(symbols)}
    same = []
    for genes in markers.values():
        rows = unit[[position[g] for g in genes]]
        sim = rows @ rows.T
        same.append(sim[~torch.eye(len(genes), dtype=torch.bool)].mean())
    random_pairs = (unit @ unit.T)[~torch.eye(len(symbols), dtype=torch.bool)].mean()
    assert float(torch.stack(same).mean()) > float(random_pairs) + 0.2


@pytest.mark.slow
def test_default_atlas_is_calibrated():
    result = calibrate(generate_atlas())
    assert min(result["within_tissue_accuracy"].values()) >= 0.95
    assert 0.55 <= result["cross_tissue_mean"] <= 0.85
    assert set(result["cross_tissue_accuracy"]) == {"blood", "lung", "gut", "brain"}
