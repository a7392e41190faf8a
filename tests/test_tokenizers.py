"""Tokenizer parts on hand-made cells whose sentences are written out in full."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from omegaconf import OmegaConf

from tokbench.data.prepared import PreparedData
from tokbench.errors import TokbenchError
from tokbench.tokenizers import (
    CHROM_END,
    CLS,
    N_SPECIAL,
    PAD,
    FcConfig,
    FeConfig,
    FgConfig,
    OrderConfig,
    SelectConfig,
    build_tokenizer,
    catalogue,
    load_component,
)
from tokbench.tokenizers import registry
from tokbench.tokenizers.config import CombineConfig, preset_names


def make_prepared(matrix, *, chromosome=None, start=None, split=None, gene_ids=None) -> PreparedData:
    """A PreparedData built by hand from a dense or scipy matrix of log-normalised values."""
    csr = sp.csr_matrix(np.asarray(matrix, dtype=np.float32)) if not sp.issparse(matrix) else matrix.tocsr()
    csr.sort_indices()
    n_cells, n_genes = csr.shape
    ids = np.array(gene_ids if gene_ids is not None else [f"GENE{j}" for j in range(n_genes)], dtype=object)
    return PreparedData(
        indptr=csr.indptr.astype(np.int64),
        indices=csr.indices.astype(np.int32),
        data=csr.data.astype(np.float32),
        gene_ids=ids,
        gene_symbols=ids,
        gene_chromosome=np.array(chromosome if chromosome is not None else [""] * n_genes, dtype=object),
        gene_start=np.array(start if start is not None else [-1] * n_genes, dtype=np.int64),
        labels=np.zeros(n_cells, dtype=np.int64),
        class_names=["cell"],
        split=np.array(split if split is not None else [0] * n_cells, dtype=np.int8),
        obs=pd.DataFrame(index=pd.RangeIndex(n_cells)),
    )


# Six genes; cell 0 expresses G1=3, G2=1, G4=2, G5=2; cell 1 nothing; cell 2 G0=5, G3=0.5.
# Positions: G0 chr1:100, G1 chr2:50, G2 chr1:10, G3 chrX:5, G4 no chromosome, G5 chr2:20.
MATRIX = [[0, 3.0, 1.0, 0, 2.0, 2.0], [0, 0, 0, 0, 0, 0], [5.0, 0, 0, 0.5, 0, 0]]
CHROMOSOME = ["1", "2", "1", "X", "", "2"]
START = [100, 50, 10, 5, -1, 20]
G = [N_SPECIAL + j for j in range(6)]  # token of gene j
CHR1, CHR2, CHRX = (N_SPECIAL + 6 + g for g in range(3))


@pytest.fixture(scope="module")
def cells6() -> PreparedData:
    return make_prepared(MATRIX, chromosome=CHROMOSOME, start=START)


def fc(select="truncate", size=10, order="expression", combine="sum", **extra) -> FcConfig:
    select_extra = {k: v for k, v in extra.items() if k == "resample"}
    order_extra = {k: v for k, v in extra.items() if k == "normalize_by_median"}
    return FcConfig(
        order=OrderConfig(name=order, **order_extra),
        select=SelectConfig(name=select, size=size, **select_extra),
        combine=CombineConfig(name=combine),
    )


def tokenize(data, fc_cfg, fe="zero", cells=None, epoch=0, seed=0, d_model=8, **fe_params):
    tokenizer = build_tokenizer(FgConfig(), FeConfig(name=fe, **fe_params), fc_cfg, data, d_model, seed)
    cells = np.arange(data.n_cells) if cells is None else np.asarray(cells)
    return tokenizer, tokenizer.sentences(cells, epoch)


def rows(tensor: torch.Tensor) -> list[list]:
    return tensor.tolist()


# -- orders -----------------------------------------------------------------------------


def test_expression_order_descending_ties_by_gene_index(cells6):
    _, s = tokenize(cells6, fc(order="expression"))
    assert rows(s.gene_tokens) == [
        [CLS, G[1], G[4], G[5], G[2]],
        [CLS, PAD, PAD, PAD, PAD],
        [CLS, G[0], G[3], PAD, PAD],
    ]
    assert rows(s.expression) == [[0, 3, 2, 2, 1], [0, 0, 0, 0, 0], [0, 5, 0.5, 0, 0]]
    assert rows(s.padding_mask) == [[False] * 5, [False] + [True] * 4, [False] * 3 + [True] * 2]
    assert rows(s.special) == [[True] + [False] * 4, [True] * 5, [True, False, False, True, True]]
    assert s.expression_bins is None


def test_expression_order_normalised_by_training_median():
    # Training cells 0-1: median of A is 2, of B 0.5. Test cell 2: A=2.5 > B=1.0, but
    # expm1(1.0)/expm1(0.5) = 2.65 beats expm1(2.5)/expm1(2) = 1.75.
    data = make_prepared([[1.0, 0.5], [3.0, 0.5], [2.5, 1.0]], split=[0, 0, 2])
    _, plain = tokenize(data, fc(order="expression"), cells=[2])
    _, normalised = tokenize(data, fc(order="expression", normalize_by_median=True), cells=[2])
    assert rows(plain.gene_tokens) == [[CLS, G[0], G[1]]]
    assert rows(normalised.gene_tokens) == [[CLS, G[1], G[0]]]


def test_gene_index_and_none_orders_differ_on_unsorted_rows(cells6):
    # One cell stored with its columns out of order: 5, 1, 2, 4.
    indptr, indices, values = np.array([0, 4]), np.array([5, 1, 2, 4]), np.array([2.0, 3.0, 1.0, 2.0], np.float32)
    by_index = build_tokenizer(FgConfig(), FeConfig(), fc(order="gene_index"), cells6, 8, 0)
    as_stored = build_tokenizer(FgConfig(), FeConfig(), fc(order="none"), cells6, 8, 0)
    assert rows(by_index.sentences_from_csr(indptr, indices, values, [0], 0).gene_tokens) == [
        [CLS, G[1], G[2], G[4], G[5]]
    ]
    assert rows(as_stored.sentences_from_csr(indptr, indices, values, [0], 0).gene_tokens) == [
        [CLS, G[5], G[1], G[2], G[4]]
    ]


def test_random_order_is_a_permutation_that_changes_with_epoch():
    data = make_prepared(np.arange(1, 41, dtype=np.float32)[None, :])
    tokenizer = build_tokenizer(FgConfig(), FeConfig(), fc(order="random", size=100), data, 8, 0)
    first, again = tokenizer.sentences([0], 0), tokenizer.sentences([0], 0)
    other = tokenizer.sentences([0], 1)
    assert sorted(first.gene_tokens[0, 1:].tolist()) == G[:0] + list(range(N_SPECIAL, N_SPECIAL + 40))
    assert torch.equal(first.gene_tokens, again.gene_tokens)
    assert not torch.equal(first.gene_tokens, other.gene_tokens)
    # the value travels with its gene
    assert torch.equal(first.expression[0, 1:], (first.gene_tokens[0, 1:] - N_SPECIAL + 1).float())


def test_chromosome_order_groups_with_open_and_end_tokens(cells6):
    tokenizer, _ = tokenize(cells6, fc(order="chromosome"))
    chr1 = [CHR1, G[2], CHROM_END]
    chr2 = [CHR2, G[5], G[1], CHROM_END]  # by start: G5 at 20, G1 at 50
    seen = set()
    for epoch in range(12):
        s = tokenizer.sentences(np.arange(3), epoch)
        cell0 = [t for t in s.gene_tokens[0].tolist() if t != PAD]
        # G4 has no chromosome: left out, as UCE drops genes missing from its chromosome file
        assert cell0 in ([CLS] + chr1 + chr2, [CLS] + chr2 + chr1)
        seen.add(cell0[1])
        cell2 = s.gene_tokens[2].tolist()
        assert [t for t in cell2 if t != PAD] in ([CLS, CHR1, G[0], CHROM_END, CHRX, G[3], CHROM_END],
                                                 [CLS, CHRX, G[3], CHROM_END, CHR1, G[0], CHROM_END])
        assert set(s.gene_tokens[1].tolist()[1:]) <= {PAD}
        # chromosome tokens are special and carry no expression
        assert s.special[0].tolist() == [t < N_SPECIAL or t >= N_SPECIAL + 6 for t in s.gene_tokens[0].tolist()]
        assert s.expression[0][s.special[0]].abs().sum() == 0
    assert seen == {CHR1, CHR2}  # the chromosome order is drawn, not fixed
    assert tokenizer.max_length == 1 + 10 + 2 * 3
    assert tokenizer.vocab_size == N_SPECIAL + 6 + 3
    assert tokenizer.params()["fc.order.genes_without_chromosome"] == 1


def test_chromosome_order_without_positions_is_refused():
    data = make_prepared(MATRIX)
    with pytest.raises(TokbenchError, match="none of the dataset's 6 genes has a chromosome"):
        tokenize(data, fc(order="chromosome"))


# -- selection ----------------------------------------------------------------------------


def test_truncate_keeps_the_first_genes_of_the_order(cells6):
    _, s = tokenize(cells6, fc(size=2))
    assert rows(s.gene_tokens) == [[CLS, G[1], G[4]], [CLS, PAD, PAD], [CLS, G[0], G[3]]]
    _, s = tokenize(cells6, fc(size=2, order="gene_index"))
    assert rows(s.gene_tokens) == [[CLS, G[1], G[2]], [CLS, PAD, PAD], [CLS, G[0], G[3]]]


def test_sample_is_uniform_and_ordered_after_selection(cells6):
    tokenizer = build_tokenizer(FgConfig(), FeConfig(), fc(select="sample", size=2, order="gene_index"), cells6, 8, 0)
    pairs = {}
    for epoch in range(600):
        tokens = tokenizer.sentences([0, 2], epoch).gene_tokens
        assert tokens[1].tolist() == [CLS, G[0], G[3]]  # fewer genes than L: all of them
        pair = tuple(tokens[0, 1:].tolist())
        assert pair[0] < pair[1]  # ordered by gene index after sampling
        pairs[pair] = pairs.get(pair, 0) + 1
    assert set(pairs) == {(a, b) for a in (G[1], G[2], G[4], G[5]) for b in (G[1], G[2], G[4], G[5]) if a < b}
    assert min(pairs.values()) > 60  # 100 expected for each of the 6 pairs


def test_weighted_sample_with_replacement_draws_in_proportion_to_value(cells6):
    tokenizer = build_tokenizer(FgConfig(), FeConfig(), fc(select="weighted_sample", size=5, order="gene_index"),
                                cells6, 8, 0)
    draws = torch.cat([tokenizer.sentences([2], epoch).gene_tokens[0, 1:] for epoch in range(400)])
    assert set(draws.tolist()) == {G[0], G[3]}
    assert abs(float((draws == G[3]).float().mean()) - 0.5 / 5.5) < 0.02
    s = tokenizer.sentences([0, 1, 2], 0)
    assert s.gene_tokens.shape == (3, 6)  # S draws even for a cell with fewer genes
    assert s.gene_tokens[1].tolist() == [CLS] + [PAD] * 5


def test_weighted_sample_without_replacement_never_repeats(cells6):
    cfg = fc(select="weighted_sample", size=1, order="gene_index", resample=False)
    tokenizer = build_tokenizer(FgConfig(), FeConfig(), cfg, cells6, 8, 0)
    first = [tokenizer.sentences([2], epoch).gene_tokens[0, 1].item() for epoch in range(400)]
    assert abs(np.mean(np.array(first) == G[0]) - 5 / 5.5) < 0.04
    big = build_tokenizer(FgConfig(), FeConfig(), fc(select="weighted_sample", size=3, resample=False), cells6, 8, 0)
    assert rows(big.sentences([0, 2], 0).gene_tokens[1]) == [CLS, G[0], G[3], PAD]
    genes = big.sentences([0], 0).gene_tokens[0, 1:].tolist()
    assert len(set(genes)) == 3


def test_uce_preset_reproduces_its_recipe(cells6):
    tokenizer, s = tokenize(cells6, load_component("fc", "uce"))
    assert s.gene_tokens.shape[1] == 1 + 1024 + 2 * 2  # cells 0 and 2: two groups each
    cell2 = s.gene_tokens[2]
    genes = cell2[(cell2 >= N_SPECIAL) & (cell2 < N_SPECIAL + 6)]
    assert len(genes) == 1024 and set(genes.tolist()) <= {G[0], G[3]}
    assert tokenizer.describe() == {"fg": "learned", "fe": "zero", "fc": "uce", "order": "chromosome",
                                    "select": "weighted_sample", "combine": "gene_only", "preset": "uce",
                                    "tokenizer": "learned/zero/uce"}


# -- expression encoders and combine ----------------------------------------------------------


def test_bin_scbert_is_the_capped_log2_class_shifted_by_one():
    data = make_prepared([[0.5, 1.0, 2.7, 6.99, 9.5]])
    _, s = tokenize(data, fc(order="gene_index"), fe="bin_scbert")
    # ids 1 + min(floor(log2(1 + expm1(x))), 5) = 1 + min(floor(x / ln 2), 5); 0 is kept for special tokens
    assert rows(s.expression_bins) == [[0, 1, 2, 4, 6, 6]]


def test_bin_scgpt_matches_scgpt_digitize_with_tie_breaks(cells6):
    # Cell 0 sorted values 1, 2, 2, 3; B=5 gives edges quantile(0, 1/3, 2/3, 1) = 1, 2, 2, 3:
    # 1 -> bin 1, 3 -> bin 4, and each 2 (equal to two edges) -> 2 or 3 at random.
    tokenizer = build_tokenizer(FgConfig(), FeConfig(name="bin_scgpt", n_bins=5), fc(order="gene_index"),
                                cells6, 8, 0)
    seen = set()
    for epoch in range(20):
        s = tokenizer.sentences([0], epoch)
        bins = dict(zip(s.gene_tokens[0].tolist(), s.expression_bins[0].tolist()))
        assert bins[CLS] == 0 and bins[G[2]] == 1 and bins[G[1]] == 4
        assert bins[G[4]] in (2, 3) and bins[G[5]] in (2, 3)
        seen.update((bins[G[4]], bins[G[5]]))
    assert seen == {2, 3}
    assert tokenizer.n_expression_bins == 5


def test_combine_rules_and_expression_encoders(cells6):
    d = 8
    for fe_name in ("linear", "mlp", "autobin", "bin_scbert", "bin_scgpt"):
        for combine in ("sum", "concat"):
            tokenizer, s = tokenize(cells6, fc(combine=combine), fe=fe_name, d_model=d)
            embedder = tokenizer.embedder
            genes = embedder.genes(s.gene_tokens)
            expression = embedder.expression(s).masked_fill(s.special[..., None], 0.0)
            out = embedder(s)
            assert out.shape == (3, 5, d)
            if combine == "sum":
                torch.testing.assert_close(out, genes + expression)
            else:
                torch.testing.assert_close(out, embedder.combine.project(torch.cat([genes, expression], -1)))
    tokenizer, s = tokenize(cells6, fc(combine="gene_only"))
    torch.testing.assert_close(tokenizer.embedder(s), tokenizer.embedder.genes(s.gene_tokens))
    # linear is w*x + b at gene tokens and nothing at special tokens
    tokenizer, s = tokenize(cells6, fc(), fe="linear")
    linear = tokenizer.embedder.expression.linear
    expected = s.expression[..., None] * linear.weight[:, 0] + linear.bias
    expected = expected.masked_fill(s.special[..., None], 0.0) + tokenizer.embedder.genes(s.gene_tokens)
    torch.testing.assert_close(tokenizer.embedder(s), expected)
    assert torch.all(tokenizer.embedder(s)[1, 1:] == 0)  # PAD rows: zero gene vector, no expression


def test_autobin_is_a_softmax_mixture_of_bin_vectors(cells6):
    tokenizer, s = tokenize(cells6, fc(), fe="autobin", n_bins=4, alpha=0.5)
    module = tokenizer.embedder.expression
    x = s.expression[..., None]
    h = torch.nn.functional.leaky_relu(module.lift(x), 0.1)
    weights = torch.softmax(0.5 * h + module.mix(h), -1)
    torch.testing.assert_close(module(s), weights @ module.bins)
    assert module.bins.shape == (4, 8)


def test_empty_cells_are_counted_and_get_cls_only(cells6):
    tokenizer, s = tokenize(cells6, fc())
    assert tokenizer.n_empty_cells == 1
    assert tokenizer.empty_cells().tolist() == [False, True, False]
    assert s.gene_tokens[1, 0] == CLS and s.padding_mask[1, 1:].all()


# -- configs and errors -----------------------------------------------------------------------


def test_every_preset_loads_and_builds(cells6):
    for group in ("fg", "fe", "fc"):
        assert preset_names(group)
    assert set(preset_names("fc")) >= {"geneformer", "geneformer_random", "scgpt", "scbert", "uce",
                                      "uce_noresample", "uce_sum"}
    assert set(preset_names("fe")) == {"zero", "linear", "mlp", "bin_scbert", "bin_scgpt", "autobin"}
    assert set(preset_names("fg")) == {"learned", "pretrained"}
    for name in preset_names("fc"):
        cfg = load_component("fc", name)
        fe = "zero" if cfg.combine.name == "gene_only" else "bin_scbert" if name == "scbert" else "bin_scgpt"
        tokenizer = build_tokenizer(load_component("fg", "learned"), load_component("fe", fe), cfg, cells6, 8, 1)
        assert tokenizer.describe()["preset"] == name
        assert set(tokenizer.describe()) == {"fg", "fe", "fc", "order", "select", "combine", "preset", "tokenizer"}
    assert load_component("fc", "geneformer").select.size == 2048
    assert load_component("fc", "scgpt").select.size == 1199  # + CLS = scGPT's max_len 1200
    assert registry.parse("fe", load_component("fe", "bin_scgpt"))[1].n_bins == 51
    assert registry.parse("fe", load_component("fe", "bin_scbert"))[1].n_bins == 5
    assert load_component("fc", "geneformer").order.normalize_by_median
    assert not load_component("fc", "log_expression").order.normalize_by_median


def test_overrides_merge_into_presets(cells6):
    cfg = OmegaConf.merge(load_component("fc", "uce"), OmegaConf.from_dotlist(["select.size=512"]))
    tokenizer = build_tokenizer(FgConfig(), load_component("fe", "zero"), cfg, cells6, 8, 0)
    assert tokenizer.max_length == 1 + 512 + 2 * 3
    assert tokenizer.describe()["preset"] == "custom" and tokenizer.describe()["fc"] == "uce"
    assert tokenizer.params()["fc.select.size"] == 512


@pytest.mark.parametrize(
    ("fg", "fe", "fc_cfg", "message"),
    [
        ({}, {"name": "bogus"}, {}, r"fe.name='bogus': no such expression encoder \(Fe\); valid: zero, linear, mlp, bin_scbert"),
        ({}, {}, {"order": {"name": "sorted"}}, r"valid: expression, random, gene_index, none, chromosome"),
        ({}, {"name": "linear", "n_bins": 5}, {}, r"fe: 'linear' does not take 'n_bins'.*no parameters"),
        ({}, {}, {"select": {"name": "sample", "resample": False}}, r"'sample' does not take 'resample'.*: size"),
        ({}, {}, {"max_length": 5}, r"max_length.*valid keys here: name, order, select, combine"),
        ({}, {}, {"select": {"size": 0}}, r"fc.select.size must be >= 1"),
        ({}, {}, {"select": {"name": "weighted_sample", "size": -3}}, r"size must be >= 1"),
        ({}, {"name": "linear"}, {"combine": {"name": "gene_only"}}, r"gene_only ignores the expression encoder"),
        ({"name": "learned", "pca": True}, {}, {}, r"fg: 'learned' does not take 'pca'"),
        ({"name": "pretrained"}, {}, {}, r"needs fg.path"),
        ({}, {"name": "bin_scgpt", "n_bins": 2}, {}, r"n_bins must be >= 3"),
    ],
)
def test_bad_configs_are_refused_with_the_valid_choices(cells6, fg, fe, fc_cfg, message):
    with pytest.raises(TokbenchError, match=message):
        build_tokenizer(fg, fe, fc_cfg, cells6, 8, 0)


def test_unknown_presets_are_refused_with_the_list():
    with pytest.raises(TokbenchError, match="unknown fc preset 'geneformr'; valid: geneformer, geneformer_random"):
        load_component("fc", "geneformr")
    with pytest.raises(TokbenchError, match="unknown tokenizer part 'fx'; valid: fg, fe, fc"):
        load_component("fx", "zero")
    with pytest.raises(TokbenchError, match="needs fg.path"):
        build_tokenizer(load_component("fg", "pretrained"), FeConfig(), FcConfig(), make_prepared(MATRIX), 8, 0)


def test_catalogue_lists_every_part_and_preset_on_one_screen():
    text = catalogue()
    for group in ("fg", "fe", "fc"):
        for name in preset_names(group):
            assert name in text
    for name in ("truncate", "sample", "weighted_sample", "expression", "random", "chromosome", "gene_index",
                 "none", "sum", "gene_only", "concat", "normalize_by_median", "min_fraction_mapped"):
        assert name in text
    lines = text.splitlines()
    assert len(lines) <= 50 and max(map(len, lines)) <= 100
