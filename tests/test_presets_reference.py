"""Each preset against its published model, on hand-made cells.

Every expected sentence is written out below; the reference computations beside them
follow the published code (repository and file named in each), never tokbench's functions.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

from tokbench.data.genes import map_genes
from tokbench.data.prepared import PreparedData
from tokbench.errors import TokbenchError
from tokbench.tokenizers import CHROM_END, CLS, N_SPECIAL, build_tokenizer, kernels, load_component


def from_counts(counts, *, n_counts=None, split=None, chromosome=None, start=None, gene_ids=None) -> PreparedData:
    """PreparedData as the cache holds it: scanpy normalize_total(1e4) + log1p of ``counts``
    (cells x panel genes), each cell's library size, and its whole-cell total ``n_counts``
    (counts of genes outside the panel included; default: the library size)."""
    counts = np.asarray(counts, dtype=np.float32)
    n_cells, n_genes = counts.shape
    adata = ad.AnnData(X=sp.csr_matrix(counts))
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    csr = sp.csr_matrix(adata.X, dtype=np.float32)
    csr.eliminate_zeros()
    csr.sort_indices()
    ids = np.array(gene_ids or [f"GENE{j}" for j in range(n_genes)], dtype=object)
    library = counts.sum(1).astype(np.float64)
    return PreparedData(
        indptr=csr.indptr.astype(np.int64), indices=csr.indices.astype(np.int32), data=csr.data,
        gene_ids=ids, gene_symbols=ids,
        gene_chromosome=np.array(chromosome or [""] * n_genes, dtype=object),
        gene_start=np.array(start or [-1] * n_genes, dtype=np.int64),
        labels=np.zeros(n_cells, np.int64), class_names=["cell"],
        split=np.array(split or [0] * n_cells, dtype=np.int8), obs=pd.DataFrame(index=pd.RangeIndex(n_cells)),
        meta={"dataset": {"target_sum": 1e4, "log1p": True}},
        library_size=library, total_counts=library if n_counts is None else np.asarray(n_counts, np.float64),
    )


def tokenizer_for(data, fc: str, fe: str = "zero", seed: int = 0):
    return build_tokenizer(load_component("fg", "learned"), load_component("fe", fe), load_component("fc", fc),
                           data, 8, seed)


def G(*genes: int) -> list[int]:
    return [N_SPECIAL + g for g in genes]


# -- Geneformer: ctheodoris/Geneformer, geneformer/tokenizer.py + its gene median dictionary --


# Four panel genes A-D; each cell's n_counts also counts genes outside the panel (3, 4, 0
# and 5 counts), so the whole-cell total differs from the panel's library size.
GF_COUNTS = [[4, 1, 0, 2], [1, 3, 2, 0], [2, 0, 6, 2], [5, 4, 9, 3]]
GF_N_COUNTS = [10, 10, 10, 26]
GF_SPLIT = [0, 0, 0, 2]  # cells 0-2 train, cell 3 test


def geneformer_reference(counts, n_counts, train, cell, model_input_size=2048):
    """tokenizer.py: X_view_norm = X / n_counts * target_sum / norm_factor_vector, then
    rank_genes = argsort(-x) of the cell's nonzero genes; the medians are the nonzero
    medians of X / n_counts * target_sum per gene (linear space)."""
    counts, n_counts = np.asarray(counts, float), np.asarray(n_counts, float)
    normalised = counts / n_counts[:, None] * 10_000
    medians = np.array([np.median(g[g > 0]) for g in normalised[train].T])
    x = normalised[cell] / medians
    nonzero = np.flatnonzero(x)
    return nonzero[np.argsort(-x[nonzero])][:model_input_size].tolist(), medians


def test_geneformer_is_rank_value_encoding_over_linear_medians_of_whole_cell_totals():
    expected, medians = geneformer_reference(GF_COUNTS, GF_N_COUNTS, [0, 1, 2], 3)
    # B's two training values 1000 and 3000 average to 2000 (log space would give ~1732);
    # normalised by the panel's library size instead, B's median would be 3214.
    np.testing.assert_allclose(medians, [2000, 2000, 4000, 2000])
    assert expected == [0, 2, 1, 3]  # A 1.25 > C 1.125 > B 1.0 > D 0.75 (x 10000/26)
    data = from_counts(GF_COUNTS, n_counts=GF_N_COUNTS, split=GF_SPLIT)
    np.testing.assert_allclose(data.gene_median_normalised(), medians)
    s = tokenizer_for(data, "geneformer").sentences([3], 0)
    assert s.gene_tokens.tolist() == [[CLS] + G(0, 2, 1, 3)]
    # the plain log-expression preset ranks by value alone: C (9) > A (5) > B (4) > D (3)
    plain = tokenizer_for(data, "log_expression").sentences([3], 0)
    assert plain.gene_tokens.tolist() == [[CLS] + G(2, 0, 1, 3)]


def test_geneformer_truncates_at_2048():
    # Equal medians (every training value is 1 count of 2500); the test cell's counts are a
    # permutation of 1..2500, so every key is distinct and the reference order is unique.
    counts = np.ones((3, 2500))
    counts[2] = np.random.default_rng(0).permutation(2500) + 1
    data = from_counts(counts, split=[0, 0, 2])
    expected, _ = geneformer_reference(counts, counts.sum(1), [0, 1], 2)
    s = tokenizer_for(data, "geneformer").sentences([2], 0)
    assert s.gene_tokens.shape == (1, 1 + 2048)
    assert s.gene_tokens[0].tolist() == [CLS] + G(*expected)


# -- scBERT: TencentAILabHealthcare/scBERT, preprocess.py + finetune.py -------------------------


def scbert_reference_classes(counts, bin_num=5):
    """preprocess.py: normalize_total(1e4), log1p(base=2); finetune.py SCDataset:
    full_seq[full_seq > CLASS - 2] = CLASS - 2 with CLASS = bin_num + 2, then .long()."""
    adata = ad.AnnData(X=np.asarray(counts, dtype=np.float32))
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata, base=2)
    full_seq = np.asarray(adata.X).copy()
    full_seq[full_seq > bin_num] = bin_num
    return full_seq.astype(np.int64)


def test_scbert_classes_at_published_boundaries_and_every_panel_gene():
    # normalised counts 0, 1, 3, 7, 15, 31, 1000 (the cell's library size is exactly 1e4)
    counts = [[0, 1, 3, 7, 15, 31, 1000, 10_000 - 1057]]
    classes = scbert_reference_classes(counts)
    assert classes.tolist() == [[0, 1, 2, 3, 4, 5, 5, 5]]
    data = from_counts(counts)
    s = tokenizer_for(data, "scbert", "bin_scbert").sentences([0], 0)
    # every panel gene in gene-index order, the zero-expressed one included (class 0 = id 1)
    assert s.gene_tokens.tolist() == [[CLS] + G(0, 1, 2, 3, 4, 5, 6, 7)]
    assert s.expression_bins.tolist() == [[0, 1, 2, 3, 4, 5, 6, 6, 6]]
    assert s.expression_bins[0, 1:].tolist() == (classes[0] + 1).tolist()
    assert s.expression[0, 1].item() == 0.0 and not s.special[0, 1] and not s.padding_mask.any()


def test_scbert_sentence_is_the_same_on_both_paths_and_counts_the_panel():
    rng = np.random.default_rng(1)
    counts = rng.poisson(0.7, (6, 40))
    data = from_counts(counts)
    tokenizer = tokenizer_for(data, "scbert", "bin_scbert")
    fast = tokenizer.sentences(np.arange(6), 0)
    with kernels.force_torch():
        reference = tokenizer.sentences(np.arange(6), 0)
    for name in ("gene_tokens", "expression", "special", "padding_mask", "expression_bins"):
        assert (getattr(fast, name) == getattr(reference, name)).all()
    assert fast.gene_tokens.shape == (6, 41) and tokenizer.max_length == 41
    assert fast.expression_bins[:, 1:].tolist() == (scbert_reference_classes(counts) + 1).tolist()


def test_scbert_refuses_a_panel_longer_than_its_length():
    data = from_counts(np.ones((2, 30)))
    fc = load_component("fc", "scbert")
    fc.select.size = 20
    with pytest.raises(TokbenchError, match=r"all 30 genes of the panel.*fc.select.size=20.*dataset.n_top_genes=20"):
        build_tokenizer(load_component("fg", "learned"), load_component("fe", "bin_scbert"), fc, data, 8, 0)


# -- scGPT: bowang-lab/scGPT, scgpt/tokenizer/gene_tokenizer.py ------------------------------


def test_scgpt_max_len_counts_the_cls():
    # pad_batch with cls_appended: idx = np.random.choice(len(genes) - 1, max_len - 1) + 1,
    # then the CLS at index 0: max_len = 1200 tokens in all.
    counts = np.ones((2, 1500))
    counts[1, 600:] = 0
    data = from_counts(counts)
    s = tokenizer_for(data, "scgpt", "bin_scgpt").sentences([0, 1], 0)
    assert s.gene_tokens.shape == (2, 1200)
    genes = s.gene_tokens[0, 1:].tolist()
    assert len(set(genes)) == 1199 and min(genes) >= N_SPECIAL
    short = s.gene_tokens[1][~s.padding_mask[1]].tolist()
    assert sorted(short[1:]) == G(*range(600))  # fewer genes than max_len - 1: all of them


# -- UCE: snap-stanford/UCE, eval_data.py + data_proc/data_utils.py ---------------------------


def uce_reference_probabilities(counts):
    """eval_data.py, MultiDatasetSentences: weights = log1p(counts); weights / sum(weights)."""
    weights = np.log1p(np.asarray(counts, dtype=np.float64))
    return weights / weights.sum(1, keepdims=True)


def test_uce_weights_come_from_raw_counts_not_normalised_values():
    # Two cells with the same normalised values (1000, 2000, 7000) and library sizes 10 and 100.
    counts = [[1, 2, 7], [10, 20, 70]]
    data = from_counts(counts, chromosome=["1", "1", "1"], start=[10, 20, 30])
    assert np.array_equal(data.data[:3], data.data[3:])
    expected = uce_reference_probabilities(counts)
    np.testing.assert_allclose(expected, [[0.1791, 0.2838, 0.5372], [0.2471, 0.3137, 0.4392]], atol=1e-4)
    tokenizer = tokenizer_for(data, "uce")
    draws = np.zeros((2, 3))
    for epoch in range(20):
        tokens = tokenizer.sentences([0, 1], epoch).gene_tokens.numpy()
        for cell in range(2):
            draws[cell] += np.bincount(tokens[cell][tokens[cell] >= N_SPECIAL] - N_SPECIAL, minlength=4)[:3]
    np.testing.assert_allclose(draws / draws.sum(1, keepdims=True), expected, atol=0.015)


def uce_reference_order(drawn, chroms, starts, chromosome_order):
    """sample_cell_sentences: sort the draws by chromosome; for each chromosome in the
    (shuffled) order: its token, its draws by start, the shared end token."""
    sentence = ["CLS"]
    for chrom in chromosome_order:
        members = [g for g in drawn if chroms[g] == chrom]
        sentence += [f"chr{chrom}"] + sorted(members, key=lambda g: (starts[g], g)) + ["END"]
    return sentence


def test_uce_sentence_follows_uce_ordering_with_y_and_mt_groups():
    symbols = ["CD3E", "RPS4Y1", "MT-ND1", "XIST", "NOT_A_GENE", "MT-CO1", "CD8A", "GAPDH"]
    mapping = map_genes(symbols)
    assert list(mapping.chromosome) == ["11", "Y", "MT", "X", "", "MT", "2", "12"]
    counts = [[3, 5, 40, 2, 9, 25, 4, 8]]
    data = from_counts(counts, chromosome=list(mapping.chromosome), start=list(mapping.start), gene_ids=symbols)
    tokenizer = tokenizer_for(data, "uce")
    names = ["2", "11", "12", "X", "Y", "MT"]  # every chromosome present is a group; NOT_A_GENE is dropped
    assert tokenizer.builder.layout.group_names == names
    assert tokenizer.params()["fc.order.genes_without_chromosome"] == 1
    chrom_token = {N_SPECIAL + 8 + i: f"chr{c}" for i, c in enumerate(names)}
    for epoch in range(5):
        tokens = tokenizer.sentences([0], epoch).gene_tokens[0].tolist()
        readable = ["CLS" if t == CLS else "END" if t == CHROM_END else chrom_token.get(t, t - N_SPECIAL)
                    for t in tokens]
        drawn = [t for t in readable if isinstance(t, int)]
        assert len(drawn) == 1024 and 4 not in drawn
        order = [t[3:] for t in readable if isinstance(t, str) and t.startswith("chr")]
        assert readable == uce_reference_order(drawn, dict(enumerate(mapping.chromosome)),
                                               dict(enumerate(mapping.start)), order)
    # MT genes (no start in the table) sit in their own group, by gene index: MT-ND1 then MT-CO1
    mt = readable[readable.index("chrMT") + 1 : readable.index("END", readable.index("chrMT"))]
    assert mt == sorted(mt) and set(mt) <= {2, 5}


def test_panel_with_scgpt_bins_gives_zeros_the_zero_bin_and_bins_the_rest():
    # The cell's expressed values rank as its counts 1, 2, 2, 3; B=5 gives edges at those
    # values' quantiles (0, 1/3, 2/3, 1): 1 -> bin 1, 3 -> bin 4, each 2 -> 2 or 3 at random.
    counts = [[1, 0, 2, 2, 0, 3]]
    data = from_counts(counts)
    fc = load_component("fc", "scbert")
    fe = load_component("fe", "bin_scgpt")
    fe.n_bins = 5
    tokenizer = build_tokenizer(load_component("fg", "learned"), fe, fc, data, 8, 0)
    for epoch in range(6):
        bins = tokenizer.sentences([0], epoch).expression_bins[0].tolist()
        assert bins[0] == 0 and bins[2] == 0 and bins[5] == 0  # CLS, then the two zeros
        assert bins[1] == 1 and bins[6] == 4 and {bins[3], bins[4]} <= {2, 3}
        with kernels.force_torch():
            assert tokenizer.sentences([0], epoch).expression_bins[0].tolist() == bins
