"""The data layer: loading, preprocessing, splits, cache, gene table, bad input."""

from __future__ import annotations

import logging
import multiprocessing as mp
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
import scipy.sparse as sp

from conftest import SYMBOLS, tiny_adata
from tokbench.data import loading
from tokbench.data.cache import NpyAppender
from tokbench.data.config import DatasetConfig, SplitConfig
from tokbench.data.genes import chromosome_rank, gene_table, map_genes
from tokbench.data.prepare import prepare_dataset
from tokbench.errors import TokbenchError

CROSS = dict(kind="cross_tissue", key="tissue", train=["blood", "lung"], test=["gut"])


def prepare(path, tmp_path, split=None, **dataset):
    dataset.setdefault("label_key", "cell_type")
    return prepare_dataset(
        DatasetConfig(path=str(path), cache_dir=str(tmp_path / "cache"), **dataset), SplitConfig(**(split or CROSS))
    )


# --- gene table ----------------------------------------------------------------------


def test_gene_table_is_genomic_and_unique():
    table = gene_table()
    assert len(table) > 30_000
    assert not table["symbol"].duplicated().any() and not table["ensembl_id"].duplicated().any()
    ranks = table["chromosome"].map(chromosome_rank).to_numpy()
    assert (np.diff(ranks) >= 0).all()
    by_symbol = table.set_index("symbol")
    assert tuple(by_symbol.loc["CD3E", ["ensembl_id", "chromosome"]]) == ("ENSG00000198851", "11")
    # Y and mitochondrial genes are in the table, under the symbols 10x data use
    assert by_symbol.loc["RPS4Y1", "chromosome"] == "Y" and by_symbol.loc["RPS4Y1", "start"] > 0
    assert {"MT-ND1", "MT-CO1", "MT-CYB", "MT-ATP6"} <= set(table.loc[table["chromosome"] == "MT", "symbol"])
    assert table["symbol"].str.fullmatch(r"[A-Z][A-Z0-9]{1,9}").sum() > 20_000
    assert (table["start"] > 0).mean() > 0.6


def test_map_genes_symbols_ensembl_and_mixed():
    by_symbol = map_genes(["cd3e", "MS4A1", "NOT_A_GENE", "CD14"])
    assert list(by_symbol.ensembl_id[:2]) == ["ENSG00000198851", "ENSG00000156738"]
    assert by_symbol.start[2] == -1 and by_symbol.fraction_mapped == 0.75
    by_ensembl = map_genes(["ENSG00000170458.14", "ENSG00000156738"])
    assert by_ensembl.id_kind == "ensembl" and list(by_ensembl.symbol) == ["CD14", "MS4A1"]
    mixed = map_genes(["CD3E", "ENSG00000170458"])
    assert list(mixed.symbol) == ["CD3E", "CD14"]


def test_map_genes_maps_earlier_symbols_through_their_alias(pbmc_counts):
    mapped = map_genes(["H2AFY", "IGJ", "CD3E"])
    assert list(mapped.symbol) == ["MACROH2A1", "JCHAIN", "CD3E"]
    assert map_genes(pbmc_counts.var_names).fraction_mapped > 0.97


def test_map_genes_refuses_unknown_ids():
    with pytest.raises(TokbenchError, match=r"data.h5ad: var_names: only 0% of 3 gene ids"):
        map_genes(["g1", "g2", "g3"], where="data.h5ad: var_names")


# --- loading -------------------------------------------------------------------------


def test_chunked_reading_matches_full_matrix(pbmc_h5ad, pbmc_counts):
    with loading.H5adSource(pbmc_h5ad) as src:
        blocks = [block for _, block in src.row_chunks(97)]
    assert all(b.shape[0] <= 97 for b in blocks)
    assert (sp.vstack(blocks) != pbmc_counts.X).nnz == 0


def test_counts_from_layer_and_genes_from_var_column(tmp_path):
    adata = tiny_adata()
    adata.layers["counts"] = adata.X.copy()
    adata.X = sp.csr_matrix(np.log1p(adata.X.toarray()))  # X holds something else
    adata.var["gene_symbol"] = adata.var_names
    adata.var_names = [f"probe{i}" for i in range(adata.n_vars)]
    path = tmp_path / "layered.h5ad"
    adata.write_h5ad(path)
    data = prepare(path, tmp_path, layer="counts", gene_key="gene_symbol")
    assert list(data.gene_ids) == SYMBOLS
    direct = prepare(_write(tmp_path / "plain.h5ad", tiny_adata()), tmp_path)
    np.testing.assert_allclose(np.asarray(data.data), np.asarray(direct.data))


def test_dense_x_is_read(tmp_path):
    adata = tiny_adata()
    adata.X = adata.X.toarray()
    data = prepare(_write(tmp_path / "dense.h5ad", adata), tmp_path)
    assert data.n_cells == adata.n_obs


def _write(path: Path, adata: ad.AnnData) -> Path:
    adata.write_h5ad(path)
    return path


# --- preprocessing -------------------------------------------------------------------


def test_values_equal_scanpy_normalize_log1p(pbmc_h5ad, pbmc_counts, tmp_path):
    data = prepare(pbmc_h5ad, tmp_path, split=dict(kind="random"), label_key="bulk_labels", chunk_size=64)
    expected = pbmc_counts.copy()
    sc.pp.normalize_total(expected, target_sum=1e4)
    sc.pp.log1p(expected)
    matrix = sp.csr_matrix((np.asarray(data.data), np.asarray(data.indices), np.asarray(data.indptr)), shape=(data.n_cells, data.n_genes))
    np.testing.assert_allclose(matrix.toarray(), expected.X.toarray(), rtol=1e-5, atol=1e-6)
    assert [s["step"] for s in data.meta["preprocessing"]] == ["drop_empty", "filter_genes", "normalize_total", "log1p"]


def test_hvg_is_chosen_on_training_cells_only(tmp_path):
    adata = tiny_adata(n_cells=90)
    test_cells = (adata.obs["tissue"] == "gut").to_numpy()
    # Make gene 11 wildly variable, but only in the held-out tissue.
    dense = adata.X.toarray()
    dense[test_cells, 11] = np.random.default_rng(1).integers(0, 500, test_cells.sum())
    adata.X = sp.csr_matrix(dense)
    data = prepare(_write(tmp_path / "hvg.h5ad", adata), tmp_path, n_top_genes=4)
    assert SYMBOLS[11] not in set(data.gene_ids)
    # And the selection does not change when only test cells change.
    dense[test_cells] = 0
    dense[test_cells, 5] = 7
    adata.X = sp.csr_matrix(dense)
    other = prepare(_write(tmp_path / "hvg2.h5ad", adata), tmp_path, n_top_genes=4)
    assert list(other.gene_ids) == list(data.gene_ids)
    assert data.meta["preprocessing"][-1] == {"step": "highly_variable_genes", "flavor": "seurat", "n_top_genes": 4, "on": "train"}


def test_empty_cells_and_genes_are_dropped_with_a_warning(tmp_path, caplog):
    adata = tiny_adata()
    dense = adata.X.toarray()
    dense[[0, 1], :] = 0
    dense[:, 3] = 0
    adata.X = sp.csr_matrix(dense)
    with caplog.at_level(logging.WARNING, logger="tokbench"):
        data = prepare(_write(tmp_path / "empty.h5ad", adata), tmp_path)
    assert data.n_cells == adata.n_obs - 2 and data.n_genes == adata.n_vars - 1
    assert "2 cells express no gene; dropped" in caplog.text
    assert "1 genes are zero in every cell; dropped" in caplog.text


def test_min_cells_counts_training_cells(tmp_path):
    adata = tiny_adata()
    dense = adata.X.toarray()
    gut = (adata.obs["tissue"] == "gut").to_numpy()
    dense[:, 4] = 0
    dense[gut, 4] = 5  # expressed, but only in test cells
    adata.X = sp.csr_matrix(dense)
    data = prepare(_write(tmp_path / "minc.h5ad", adata), tmp_path, min_cells=1)
    assert SYMBOLS[4] not in set(data.gene_ids)


def test_a_cell_left_without_counts_keeps_an_empty_sentence_and_no_warning_escapes(tmp_path, caplog):
    # A test cell whose only count is in a gene min_cells drops reaches normalize_total with
    # a zero total; tokbench reports it itself, so scanpy's warning must not leak. Duplicated
    # cell names are stored as they are, without anndata's advice to make them unique.
    adata = tiny_adata()
    dense = adata.X.toarray()
    gut = np.flatnonzero((adata.obs["tissue"] == "gut").to_numpy())
    dense[:, 4] = 0
    dense[gut, 4] = 5
    dense[gut[0]] = 0
    dense[gut[0], 4] = 5
    adata.X = sp.csr_matrix(dense)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata.obs_names = ["cell1"] + list(adata.obs_names[1:])
        _write(tmp_path / "empty_row.h5ad", adata)
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING, logger="tokbench"):
        warnings.simplefilter("error")
        data = prepare(tmp_path / "empty_row.h5ad", tmp_path)
    assert data.meta["empty_sentences"] == 1
    assert "1 cells express none of the selected genes" in caplog.text
    assert list(np.load(data.path / "obs_names.npy")[:2]) == ["cell1", "cell1"]


def test_gene_median_nonzero_over_training_cells(pbmc_h5ad, tmp_path):
    data = prepare(pbmc_h5ad, tmp_path, split=dict(kind="random"), label_key="bulk_labels")
    matrix = sp.csr_matrix((np.asarray(data.data), np.asarray(data.indices), np.asarray(data.indptr)), shape=(data.n_cells, data.n_genes))
    train = matrix[data.split_indices("train")].tocsc()
    expected = [np.median(train.data[train.indptr[j] : train.indptr[j + 1]]) if train.indptr[j + 1] > train.indptr[j] else np.nan for j in range(data.n_genes)]
    np.testing.assert_allclose(data.gene_median_nonzero(), expected, rtol=1e-6)
    assert (data.path / "gene_median_nonzero.npy").exists()


def test_storing_gene_medians_draws_nothing_from_the_global_rng(tiny_h5ad, tmp_path):
    # Checkpoints save the global numpy state; a cache write must not move it.
    data = prepare(tiny_h5ad, tmp_path)
    np.random.seed(3)
    _, key, position, *_ = np.random.get_state()
    data.gene_median_nonzero()
    data.gene_median_normalised()
    assert (data.path / "gene_median_nonzero.npy").exists() and (data.path / "gene_median_normalised.npy").exists()
    _, key_after, position_after, *_ = np.random.get_state()
    np.testing.assert_array_equal(key_after, key)
    assert position_after == position
    assert sorted(p.name for p in data.path.iterdir() if ".tmp" in p.name) == []


def test_cache_keeps_each_cells_counts_and_geneformer_medians(pbmc_counts, tmp_path):
    # Gene 0 is expressed only in test cells, so min_cells drops it: the library size (what
    # normalize_total divided by) then differs from the whole cell's total count.
    adata = pbmc_counts.copy()
    train = (adata.obs["split"] == "train").to_numpy()
    dense = adata.X.toarray()
    dense[:, 0] = np.where(train, 0, 50)
    adata.X = sp.csr_matrix(dense)
    path = tmp_path / "counts.h5ad"
    adata.write_h5ad(path)
    data = prepare(path, tmp_path, split=dict(kind="predefined", key="split", train=["train"], val=["val"],
                                              test=["test"]), label_key="bulk_labels")
    counts = adata[np.load(data.path / "obs_names.npy")]
    x = counts.X.toarray().astype(np.float64)
    cols = counts.var_names.get_indexer(data.gene_ids)
    assert 0 not in cols
    np.testing.assert_array_equal(data.total_counts, x.sum(1))
    np.testing.assert_array_equal(data.library_size, x[:, cols].sum(1))
    indptr, indices, values = data.rows(np.arange(data.n_cells))
    cell = np.repeat(np.arange(data.n_cells), np.diff(indptr))
    np.testing.assert_array_equal(data.raw_counts(values, cell), x[cell, cols[indices]])
    # Geneformer: count / whole-cell total * 1e4, median of the nonzero training values in linear space
    normalised = (x / x.sum(1, keepdims=True) * 1e4)[data.split_indices("train")][:, cols]
    expected = [np.median(g[g > 0]) if (g > 0).any() else np.nan for g in normalised.T]
    np.testing.assert_allclose(data.gene_median_normalised(), expected, rtol=1e-9)
    assert (data.path / "gene_median_normalised.npy").exists()


def test_rows_gathers_in_the_given_order(pbmc_h5ad, tmp_path):
    data = prepare(pbmc_h5ad, tmp_path, split=dict(kind="random"), label_key="bulk_labels")
    full = sp.csr_matrix((np.asarray(data.data), np.asarray(data.indices), np.asarray(data.indptr)), shape=(data.n_cells, data.n_genes))
    cells = np.array([5, 0, 699, 5])
    indptr, indices, values = data.rows(cells)
    assert (sp.csr_matrix((values, indices, indptr), shape=(4, data.n_genes)) != full[cells]).nnz == 0


# --- splits --------------------------------------------------------------------------


def test_predefined_split_and_sorted_class_ids(pbmc_h5ad, tmp_path):
    data = prepare(pbmc_h5ad, tmp_path, split=dict(kind="predefined", key="split"), label_key="bulk_labels")
    assert data.class_names == sorted(data.class_names)
    np.testing.assert_array_equal(np.asarray(data.split)[:5], [0, 0, 0, 1, 2])
    names = np.asarray(data.class_names)[np.asarray(data.labels)]
    assert (names == data.obs["bulk_labels"].astype(str).to_numpy()).all()


def test_predefined_split_with_custom_value_names(tmp_path):
    adata = tiny_adata()
    adata.obs["fold"] = np.array(["fit", "fit", "tune", "holdout"])[np.arange(adata.n_obs) % 4]
    data = prepare(_write(tmp_path / "f.h5ad", adata), tmp_path, split=dict(kind="predefined", key="fold", train=["fit"], val=["tune"], test=["holdout"]))
    assert data.meta["splits"]["cells"] == {"train": 30, "val": 15, "test": 15}


def test_cross_tissue_validation_is_carved_from_training_tissues_stratified(tmp_path):
    adata = tiny_adata(n_cells=300)
    data = prepare(_write(tmp_path / "x.h5ad", adata), tmp_path, split=dict(CROSS, val_fraction=0.2))
    tissue = data.obs["tissue"].astype(str).to_numpy()
    split = np.asarray(data.split)
    assert set(tissue[split == 2]) == {"gut"}
    assert set(tissue[split == 1]) <= {"blood", "lung"} and set(tissue[split == 0]) <= {"blood", "lung"}
    labels = np.asarray(data.labels)
    for c in range(3):
        in_train_tissues = ((split == 0) | (split == 1)) & (labels == c)
        assert abs(((split == 1) & (labels == c)).sum() / in_train_tissues.sum() - 0.2) < 0.03


def test_cross_tissue_validation_from_the_held_out_tissue(tmp_path):
    adata = tiny_adata(n_cells=300)
    data = prepare(_write(tmp_path / "x.h5ad", adata), tmp_path, split=dict(CROSS, val_fraction=0.4, val_from="test"))
    tissue = data.obs["tissue"].astype(str).to_numpy()
    split, labels = np.asarray(data.split), np.asarray(data.labels)
    assert set(tissue[split == 1]) == {"gut"} and set(tissue[split == 2]) == {"gut"}
    assert set(tissue[split == 0]) == {"blood", "lung"}
    assert data.meta["splits"]["val_from"] == "test"
    for c in range(3):
        gut = (tissue == "gut") & (labels == c)
        assert abs(((split == 1) & gut).sum() / gut.sum() - 0.4) < 0.05
    # A different source of validation cells is a different dataset: never the same cache entry.
    assert data.path != prepare(tmp_path / "x.h5ad", tmp_path, split=dict(CROSS, val_fraction=0.4)).path


def test_random_split_is_stratified(pbmc_h5ad, tmp_path):
    data = prepare(pbmc_h5ad, tmp_path, split=dict(kind="random", val_fraction=0.1, test_fraction=0.2), label_key="bulk_labels")
    split, labels = np.asarray(data.split), np.asarray(data.labels)
    for c in np.unique(labels):
        n = (labels == c).sum()
        assert abs((split[labels == c] == 2).sum() - 0.2 * n) <= 1.5
    assert (split == 1).sum() == pytest.approx(70, abs=6)


def test_unseen_test_labels_are_kept_and_reported(tmp_path, caplog):
    adata = tiny_adata(n_cells=90)
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str)
    adata.obs.loc[(adata.obs["tissue"] == "gut").to_numpy() & (adata.obs["cell_type"] == "B cell").to_numpy(), "cell_type"] = "plasma cell"
    with caplog.at_level(logging.WARNING, logger="tokbench"):
        data = prepare(_write(tmp_path / "u.h5ad", adata), tmp_path)
    assert "plasma cell" in data.class_names
    assert data.meta["splits"]["test_labels_unseen_in_train"] == ["plasma cell"]
    assert "test labels never seen in training: ['plasma cell']" in caplog.text


@pytest.mark.parametrize(
    "split, message",
    [
        (dict(kind="cross_tissue", key="organ", train=["blood"], test=["gut"]), r"split.key obs column 'organ' not found; obs columns: cell_type, tissue"),
        (dict(kind="cross_tissue", key="tissue", train=["blood"], test=["kidney"]), r"split.test value\(s\) \['kidney'\] not found in obs\['tissue'\]"),
        (dict(kind="cross_tissue", key="tissue", train=["blood"], test=[]), r"split.test: a cross_tissue split needs"),
        (dict(kind="cross_tissue", key="tissue", train=["blood", "gut"], test=["gut"]), r"listed for both train and test"),
        (dict(kind="predefined", key="tissue", train=["blood"], val=["lung"], test=["gut"], val_fraction=0.1), None),
        (dict(kind="weird"), r"split.kind: 'weird' is not one of predefined, cross_tissue, random"),
        (dict(CROSS, val_from="brain"), r"split.val_from: 'brain' is not one of train, test"),
        (dict(CROSS, val=["lung"], val_from="test"), r"split.val_from=test applies to a cross_tissue split without split.val"),
        (dict(kind="random", val_from="test"), r"split.val_from=test applies to a cross_tissue split"),
    ],
)
def test_split_errors(tiny_h5ad, tmp_path, split, message):
    if message is None:
        lung = int((tiny_adata().obs["tissue"] == "lung").sum())
        assert prepare(tiny_h5ad, tmp_path, split=split).meta["splits"]["cells"]["val"] == lung
        return
    with pytest.raises(TokbenchError, match=message):
        prepare(tiny_h5ad, tmp_path, split=split)


def test_split_with_no_cells_is_refused(tmp_path):
    adata = tiny_adata()
    adata.obs["fold"] = np.array(["train", "test"])[np.arange(adata.n_obs) % 2]
    with pytest.raises(TokbenchError, match=r"tiny.h5ad: split.val value\(s\) \['val'\] not found"):
        prepare(_write(tmp_path / "tiny.h5ad", adata), tmp_path, split=dict(kind="predefined", key="fold"))


# --- bad input -----------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(TokbenchError, match=r"missing.h5ad: no such file"):
        prepare(tmp_path / "missing.h5ad", tmp_path)


def test_not_an_h5ad_file(tmp_path):
    path = tmp_path / "table.h5ad"
    path.write_text("gene,count\nCD3E,1\n")
    with pytest.raises(TokbenchError, match=r"table.h5ad: not an .h5ad file"):
        prepare(path, tmp_path)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(label_key="celltype"), r"obs column 'celltype' not found; obs columns: cell_type, tissue"),
        (dict(layer="counts"), r"layer 'counts' not found; layers present: none"),
        (dict(gene_key="symbol"), r"var column 'symbol' not found"),
    ],
)
def test_missing_keys(tiny_h5ad, tmp_path, options, message):
    with pytest.raises(TokbenchError, match=message):
        prepare(tiny_h5ad, tmp_path, **options)


@pytest.mark.parametrize("bad", [-1.0, np.nan, np.inf])
def test_negative_or_non_finite_counts(tmp_path, bad):
    adata = tiny_adata()
    dense = adata.X.toarray()
    dense[7, 2] = bad
    adata.X = sp.csr_matrix(dense)
    with pytest.raises(TokbenchError, match=r"bad.h5ad: X has a negative or non-finite count .* in cell 'cell7'"):
        prepare(_write(tmp_path / "bad.h5ad", adata), tmp_path)


def test_bad_count_is_shown_as_a_plain_number(tmp_path):
    adata = tiny_adata()
    dense = adata.X.toarray()
    dense[7, 2] = -2.0
    adata.X = sp.csr_matrix(dense)
    with pytest.raises(TokbenchError) as error:
        prepare(_write(tmp_path / "bad.h5ad", adata), tmp_path)
    assert "X has a negative or non-finite count (-2.0) in cell 'cell7'; expected raw counts" in str(error.value)


def test_label_column_named_like_a_column_tokbench_adds_is_refused(tiny_h5ad, tmp_path):
    adata = tiny_adata()
    adata.obs["kept"] = adata.obs["cell_type"]
    with pytest.raises(TokbenchError, match=r"dataset.label_key='kept' is a name tokbench uses .* copy obs\['kept'\]"):
        prepare(_write(tmp_path / "kept.h5ad", adata), tmp_path, label_key="kept")


def test_gene_ids_that_are_not_genes(tmp_path):
    adata = tiny_adata()
    adata.var_names = [f"feature_{i}" for i in range(adata.n_vars)]
    with pytest.raises(TokbenchError, match=r"genes.h5ad: var_names: only 0% of 12 gene ids match"):
        prepare(_write(tmp_path / "genes.h5ad", adata), tmp_path)


# --- cache ---------------------------------------------------------------------------


def test_second_load_maps_the_cache_without_reading_the_h5ad(tiny_h5ad, tmp_path, monkeypatch):
    first = prepare(tiny_h5ad, tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("the h5ad was read again")

    monkeypatch.setattr("tokbench.data.prepare.H5adSource", refuse)
    second = prepare(tiny_h5ad, tmp_path)
    assert second.path == first.path
    assert isinstance(second.data, np.memmap)
    np.testing.assert_array_equal(np.asarray(second.data), np.asarray(first.data))


def test_changed_option_or_file_gives_a_new_key(tiny_h5ad, tmp_path):
    base = prepare(tiny_h5ad, tmp_path).path
    assert prepare(tiny_h5ad, tmp_path, target_sum=1e6).path != base
    assert prepare(tiny_h5ad, tmp_path, split=dict(CROSS, val_fraction=0.3)).path != base
    assert prepare(tiny_h5ad, tmp_path, chunk_size=7).path == base  # speed only, same content
    tiny_adata(seed=5).write_h5ad(tiny_h5ad)
    assert prepare(tiny_h5ad, tmp_path).path != base


def _build_in_process(path: str, cache_dir: str, queue) -> None:
    data = prepare_dataset(DatasetConfig(path=path, cache_dir=cache_dir, label_key="cell_type"), SplitConfig(**CROSS))
    queue.put((str(data.path), float(np.asarray(data.data).sum())))


@pytest.mark.slow
def test_concurrent_builders_share_one_complete_entry(tiny_h5ad, tmp_path):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_build_in_process, args=(str(tiny_h5ad), str(tmp_path / "cache"), queue)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len(set(results)) == 1
    leftovers = [p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_corrupt_cache_is_rebuilt(tiny_h5ad, tmp_path, caplog):
    first = prepare(tiny_h5ad, tmp_path)
    expected = np.asarray(first.data).copy()
    with open(first.path / "data.npy", "r+b") as fh:
        fh.truncate(100)
    with caplog.at_level(logging.WARNING, logger="tokbench"):
        again = prepare(tiny_h5ad, tmp_path)
    assert "is corrupt" in caplog.text
    np.testing.assert_array_equal(np.asarray(again.data), expected)


def test_npy_appender_writes_a_loadable_array_shorter_than_its_capacity(tmp_path):
    writer = NpyAppender(tmp_path / "a.npy", np.int32, capacity=1000)
    writer.append(np.arange(40))
    writer.append(np.arange(3))
    writer.close()
    loaded = np.load(tmp_path / "a.npy", mmap_mode="r")
    np.testing.assert_array_equal(loaded, np.r_[np.arange(40), np.arange(3)])
    assert (tmp_path / "a.npy").stat().st_size == 128 + 43 * 4
    with pytest.raises(ValueError, match="more values than the capacity"):
        NpyAppender(tmp_path / "b.npy", np.int32, capacity=2).append(np.arange(3))
