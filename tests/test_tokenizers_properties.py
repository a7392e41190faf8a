"""Properties of cell sentences on random sparse batches, and reproducibility of the draws."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_tokenizers import make_prepared

from tokbench.tokenizers import CHROM_END, CLS, N_SPECIAL, PAD, FcConfig, FeConfig, FgConfig, build_tokenizer
from tokbench.tokenizers import kernels
from tokbench.tokenizers.config import CombineConfig, OrderConfig, SelectConfig

ORDERS = ["expression", "random", "chromosome", "gene_index", "none"]
SELECTS = ["truncate", "sample", "weighted_sample"]
CHROMOSOMES = ["1", "2", "3", "X", ""]


def random_data(seed: int, n_cells: int, n_genes: int, density: float):
    """Integer-valued log values 1..5 (many ties), some genes without a chromosome and some
    on a chromosome without a start (as the table's MT genes)."""
    rng = np.random.default_rng(seed)
    matrix = sp.random(n_cells, n_genes, density=density, format="csr", random_state=rng,
                       data_rvs=lambda k: rng.integers(1, 6, k).astype(np.float32))
    chromosome = rng.choice(CHROMOSOMES, n_genes)
    start = np.where((chromosome == "") | (rng.random(n_genes) < 0.2), -1, rng.integers(0, 50, n_genes))
    chromosome[0] = "1"  # at least one placed gene
    start[0] = max(start[0], 0)
    return make_prepared(matrix, chromosome=list(chromosome), start=list(start))


def strip(s, i) -> tuple[list, list, list | None]:
    """One cell's sentence without its padding."""
    keep = ~s.padding_mask[i]
    bins = None if s.expression_bins is None else s.expression_bins[i][keep].tolist()
    return s.gene_tokens[i][keep].tolist(), s.expression[i][keep].tolist(), bins


def check_sentences(s, data, cells, order, select, size, resample, max_length):
    n_genes = data.n_genes
    tokens = s.gene_tokens
    assert tokens.dtype == torch.int64 and s.expression.dtype == torch.float32
    assert torch.equal(s.padding_mask, tokens == PAD)
    assert torch.equal(s.special, (tokens < N_SPECIAL) | (tokens >= N_SPECIAL + n_genes))
    assert (tokens[:, 0] == CLS).all()
    assert tokens.shape[1] <= max_length
    for i, cell in enumerate(cells):
        row = slice(data.indptr[cell], data.indptr[cell + 1])
        expressed = dict(zip(data.indices[row].tolist(), data.data[row].tolist()))
        if order == "chromosome":  # genes without a chromosome never enter (UCE drops them)
            expressed = {g: v for g, v in expressed.items() if data.gene_chromosome[g] != ""}
        n = len(expressed)
        ids, values, bins = strip(s, i)
        # no PAD inside a sentence: padding is a suffix
        padding = s.padding_mask[i].tolist()
        assert padding == sorted(padding)
        is_gene = [N_SPECIAL <= t < N_SPECIAL + n_genes for t in ids]
        genes = [t - N_SPECIAL for t, g in zip(ids, is_gene) if g]
        gene_values = [v for v, g in zip(values, is_gene) if g]
        # only expressed genes, each with its own value; nothing at special tokens
        assert all(g in expressed for g in genes)
        assert gene_values == [expressed[g] for g in genes]
        assert all(v == 0.0 for v, g in zip(values, is_gene) if not g)
        with_replacement = select == "weighted_sample" and resample
        assert len(genes) == ((size if n else 0) if with_replacement else min(n, size))
        if not with_replacement:
            assert len(set(genes)) == len(genes)
        if order == "expression":
            assert gene_values == sorted(gene_values, reverse=True)
        if order == "gene_index":
            assert genes == sorted(genes)
        if select == "truncate" and order in ("expression", "gene_index", "none"):
            # truncate keeps the first `size` by the order's own key
            full = sorted(expressed, key=lambda g: (-expressed[g], g) if order == "expression" else g)
            assert genes == full[:size]
        specials = len(ids) - len(genes) - 1
        if order == "chromosome":
            check_groups(ids, data)
        else:
            assert specials == 0
        if bins is not None:
            check_bins(genes, bins, is_gene, expressed, s.expression_bins)


def check_groups(ids, data):
    n_genes = data.n_genes
    groups, i = [], 1
    names = sorted({c for c in data.gene_chromosome if c}, key=lambda c: ("123X".index(c), c))
    while i < len(ids):
        opener = ids[i]
        assert opener >= N_SPECIAL + n_genes, "every group opens with its chromosome token"
        end = ids.index(CHROM_END, i)
        members = [t - N_SPECIAL for t in ids[i + 1 : end]]
        assert members, "no empty group"
        name = names[opener - N_SPECIAL - n_genes]
        assert all(data.gene_chromosome[g] == name for g in members)
        # by genomic start, genes without a start after the others, then by gene index
        keys = [(data.gene_start[g] < 0, data.gene_start[g], g) for g in members]
        assert keys == sorted(keys), "genes inside a group by genomic start"
        groups.append(opener)
        i = end + 1
    assert len(groups) == len(set(groups)), "each chromosome forms one contiguous group"


def check_bins(genes, bins, is_gene, expressed, all_bins):
    gene_bins = [b for b, g in zip(bins, is_gene) if g]
    assert all(b == 0 for b, g in zip(bins, is_gene) if not g)
    assert all(1 <= b for b in gene_bins)
    # monotone in the value within the cell
    pairs = sorted(zip((expressed[g] for g in genes), gene_bins))
    assert [b for _, b in pairs] == sorted(b for _, b in pairs)


FEW_EXAMPLES = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FEW_EXAMPLES
@given(
    seed=st.integers(0, 2**31),
    n_cells=st.integers(1, 8),
    n_genes=st.integers(1, 24),
    density=st.floats(0.0, 1.0),
    order=st.sampled_from(ORDERS),
    select=st.sampled_from(SELECTS),
    size=st.integers(1, 9),
    resample=st.booleans(),
    fe=st.sampled_from(["zero", "bin_scgpt", "bin_scbert"]),
    epoch=st.integers(0, 3),
)
def test_sentences_hold_their_invariants(seed, n_cells, n_genes, density, order, select, size, resample, fe, epoch):
    data = random_data(seed, n_cells, n_genes, density)
    cfg = FcConfig(order=OrderConfig(name=order), select=SelectConfig(name=select, size=size,
                   resample=resample if select == "weighted_sample" else None), combine=CombineConfig())
    tokenizer = build_tokenizer(FgConfig(), FeConfig(name=fe), cfg, data, 4, seed)
    cells = np.random.default_rng(seed).permutation(n_cells)
    s = tokenizer.sentences(cells, epoch)
    check_sentences(s, data, cells, order, select, size, resample, tokenizer.max_length)
    # the same sentences whatever the batch: one cell at a time, and through the torch path
    for i, cell in enumerate(cells):
        assert strip(tokenizer.sentences([cell], epoch), 0) == strip(s, i)
    with kernels.force_torch():
        assert all(strip(tokenizer.sentences(cells, epoch), i) == strip(s, i) for i in range(n_cells))
    if s.expression_bins is not None and fe == "bin_scgpt":
        assert int(s.expression_bins.max()) <= 50


def scgpt_reference_range(values: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """scGPT's ``_digitize(side='both')`` bounds: a bin lies in right+1..left (left if equal).

    The edges are ``np.quantile(values, linspace(0, 1, n_bins - 1))`` evaluated in exact
    rational arithmetic: numpy's own levels round (``linspace(0, 1, 11)[6]`` is
    0.6000000000000001), which can move an edge a hair above a data value it equals.
    """
    from fractions import Fraction

    ordered = sorted(Fraction(float(v)) for v in values)
    n, m = len(ordered), n_bins - 2
    edges = []
    for k in range(m + 1):
        h = Fraction((n - 1) * k, m)
        lo = int(h)
        hi = min(lo + 1, n - 1)
        edges.append(ordered[lo] + (h - lo) * (ordered[hi] - ordered[lo]))
    left = np.array([sum(e <= Fraction(float(v)) for e in edges) for v in values])
    right = np.array([sum(e < Fraction(float(v)) for e in edges) for v in values])
    return np.minimum(right + 1, left), left


@FEW_EXAMPLES
@given(seed=st.integers(0, 2**31), n_genes=st.integers(1, 40), n_bins=st.integers(3, 60))
def test_bin_scgpt_agrees_with_scgpt_quantile_binning(seed, n_genes, n_bins):
    rng = np.random.default_rng(seed)
    matrix = rng.integers(0, 7, (3, n_genes)).astype(np.float32)
    data = make_prepared(matrix)
    cfg = FcConfig(order=OrderConfig(name="gene_index"), select=SelectConfig(name="truncate", size=100))
    tokenizer = build_tokenizer(FgConfig(), FeConfig(name="bin_scgpt", n_bins=n_bins), cfg, data, 4, seed)
    s = tokenizer.sentences(np.arange(3), 0)
    for i in range(3):
        values = matrix[i][matrix[i] > 0]
        if not len(values):
            continue
        low, high = scgpt_reference_range(values, n_bins)
        bins = s.expression_bins[i, 1 : 1 + len(values)].numpy()
        assert np.all((low <= bins) & (bins <= high)), (values, bins, low, high)


def test_bin_ties_are_split_evenly_at_random():
    # 40 equal values: every edge equals them, so each draws uniformly from 1..B-1.
    data = make_prepared(np.full((1, 40), 2.0, np.float32))
    cfg = FcConfig(order=OrderConfig(name="gene_index"), select=SelectConfig(name="truncate", size=40))
    tokenizer = build_tokenizer(FgConfig(), FeConfig(name="bin_scgpt", n_bins=5), cfg, data, 4, 0)
    bins = torch.cat([tokenizer.sentences([0], e).expression_bins[0, 1:] for e in range(50)])
    counts = torch.bincount(bins, minlength=5)[1:]
    assert counts.sum() == 2000 and counts.min() > 400


RANDOM_FCS = {
    "random": ("truncate", "random", True),
    "sample": ("sample", "gene_index", True),
    "weighted": ("weighted_sample", "gene_index", True),
    "weighted_noresample": ("weighted_sample", "expression", False),
    "chromosome": ("truncate", "chromosome", True),
}


def random_fc(name: str, size: int = 12) -> FcConfig:
    select, order, resample = RANDOM_FCS[name]
    return FcConfig(order=OrderConfig(name=order), select=SelectConfig(
        name=select, size=size, resample=resample if select == "weighted_sample" else None))


@pytest.mark.parametrize("name", list(RANDOM_FCS))
def test_random_parts_are_fresh_each_epoch_and_fixed_by_seed(name):
    data = random_data(3, 6, 40, 0.8)
    tokenizer = build_tokenizer(FgConfig(), FeConfig(name="bin_scgpt"), random_fc(name), data, 4, seed=7)
    same_seed = build_tokenizer(FgConfig(), FeConfig(name="bin_scgpt"), random_fc(name), data, 4, seed=7)
    other_seed = build_tokenizer(FgConfig(), FeConfig(name="bin_scgpt"), random_fc(name), data, 4, seed=8)
    cells = np.arange(6)
    epoch0, epoch1 = tokenizer.sentences(cells, 0), tokenizer.sentences(cells, 1)
    assert not torch.equal(epoch0.gene_tokens, epoch1.gene_tokens)
    assert torch.equal(epoch0.gene_tokens, same_seed.sentences(cells, 0).gene_tokens)
    assert not torch.equal(epoch0.gene_tokens, other_seed.sentences(cells, 0).gene_tokens)


def collate(tokenizer, epoch, cells):
    return cells, tokenizer.sentences(np.asarray(cells), epoch)


def per_cell(batches) -> dict[int, tuple]:
    out = {}
    for cells, s in batches:
        for i, cell in enumerate(cells):
            out[int(cell)] = strip(s, i)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["chromosome", "weighted"])
def test_data_loader_workers_and_batching_give_identical_sentences(name):
    data = random_data(11, 30, 40, 0.6)
    tokenizer = build_tokenizer(FgConfig(), FeConfig(name="bin_scgpt"), random_fc(name), data, 4, seed=5)
    reference = per_cell([collate(tokenizer, 2, list(range(30)))])
    for workers, batch_size, shuffle in ((0, 4, False), (1, 7, True), (2, 5, True)):
        loader = torch.utils.data.DataLoader(
            list(range(30)), batch_size=batch_size, shuffle=shuffle, num_workers=workers,
            collate_fn=functools.partial(collate, tokenizer, 2), generator=torch.Generator().manual_seed(workers),
        )
        assert per_cell(loader) == reference


def test_random_bits_agree_between_numpy_and_torch_paths():
    cells = torch.tensor([0, 5, 2**40])
    items = torch.arange(12).view(3, 4) * 977
    key = kernels.stream_key(123, kernels.STREAM_ORDER, 4)
    fast = kernels.item_bits(kernels.cell_keys(key, cells)[:, None], items)
    with kernels.force_torch():
        slow = kernels.item_bits(kernels.cell_keys(key, cells)[:, None], items)
    assert torch.equal(fast, slow)
    u = kernels.uniform(kernels.item_bits(kernels.cell_keys(key, torch.arange(100)), torch.arange(100)))
    assert 0 < float(u.min()) and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.1
    assert kernels.stream_key(1, 2, 3) != kernels.stream_key(1, 2, 4) != kernels.stream_key(1, 3, 3)


@pytest.mark.parametrize("order", ORDERS)
def test_a_cell_gets_the_same_sentence_in_any_batch(order):
    # Cell 0 has tied values and fewer genes than L; cell 1 is longer than L, so the batch
    # takes the sampling path while cell 0 alone would not need it.
    data = make_prepared([[1, 2, 2, 2, 1, 0, 0, 0, 0, 0], [3, 3, 1, 1, 2, 2, 1, 1, 2, 2]],
                         chromosome=["1", "2"] * 5, start=list(range(10)))
    for select in SELECTS:
        cfg = FcConfig(order=OrderConfig(name=order), select=SelectConfig(name=select, size=6))
        tokenizer = build_tokenizer(FgConfig(), FeConfig(name="bin_scgpt"), cfg, data, 4, 0)
        for epoch in range(5):
            together = tokenizer.sentences([0, 1], epoch)
            assert strip(tokenizer.sentences([0], epoch), 0) == strip(together, 0)
            assert strip(tokenizer.sentences([1], epoch), 0) == strip(together, 1)


def test_stored_zeros_and_dropped_genes_never_enter():
    # A stored (explicit) zero is not an expressed gene.
    data = make_prepared([[1.0, 2.0, 3.0]])
    data.data[1] = 0.0
    for select in SELECTS:
        cfg = FcConfig(order=OrderConfig(name="expression"), select=SelectConfig(name=select, size=4))
        s = build_tokenizer(FgConfig(), FeConfig(name="bin_scgpt"), cfg, data, 4, 0).sentences([0], 0)
        assert N_SPECIAL + 1 not in s.gene_tokens.tolist()[0]


def long_rows(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR rows of 0 to 4,000 stored values over 6,000 genes: ties, stored zeros, a long tail,
    and a last row of values k * 2**-20 (weighted_sample weights of exactly 1-3, so draws
    land on the boundaries between genes)."""
    rng = np.random.default_rng(seed)
    lengths = np.array([0, 1, 30, 47, 48, 200, 1_300, 2_500, 4_000, 700])
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    indices = np.concatenate([np.sort(rng.choice(6_000, n, replace=False)) for n in lengths]).astype(np.int32)
    values = np.where(rng.random(len(indices)) < 0.5, rng.integers(0, 6, len(indices)),
                      rng.lognormal(0, 1, len(indices))).astype(np.float32)
    values[-lengths[-1]:] = rng.integers(0, 4, lengths[-1]) * 2.0**-20
    return indptr, indices, values


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("select", ["truncate", "sample", "weighted_sample", "weighted_resample"])
def test_compiled_kernel_gives_the_array_path_sentences(order, select):
    # Rows long enough for every radix-sort pass, sizes above and below the row lengths,
    # Geneformer's medians (on the stored values, and on raw counts over each cell's total),
    # UCE's raw-count weights, genes a pretrained file lacks, and 70 chromosomes (more
    # groups than the insertion sort handles) plus genes without a chromosome.
    from tokbench.tokenizers.constructor import SentenceBuilder, chromosome_layout

    indptr, indices, values = long_rows(7)
    cells = np.arange(len(indptr) - 1, dtype=np.int64) * 1_000_003
    rng = np.random.default_rng(1)
    chromosome = rng.choice([str(c) for c in range(1, 71)] + [""], 6_000)
    start = np.where(chromosome == "", -1, rng.integers(0, 10_000, 6_000))
    layout = chromosome_layout(chromosome, start, np.arange(6_000))
    n_cells = len(indptr) - 1
    # per-cell scales index global cells: those options use small cell ids
    few = np.arange(n_cells, dtype=np.int64) * 7 + 3
    scales = {"count_scale": rng.uniform(0.05, 30, few[-1] + 1), "total_scale": rng.uniform(0.2, 1.0, few[-1] + 1)}
    options = [({}, cells), ({"gene_keep": rng.random(6_000) < 0.8}, cells)]
    # The per-cell scales only change the keys and weights (bins and sizes are covered above).
    scaled = []
    if order == "expression":
        median = rng.uniform(0.1, 300, 6_000)
        options[1] = ({"gene_median": median, "gene_keep": rng.random(6_000) < 0.8}, cells)
        scaled = [({"gene_median": median, **scales}, few)]
    if select.startswith("weighted"):
        scaled = [({**scales, "gene_keep": rng.random(6_000) < 0.8}, few)]
    for size in (40, 1_200, 5_000):
        for bins in (None, ("scbert", 5), ("scgpt", 51)):
            for extra, cells in options + (scaled if bins is None and size == 1_200 else []):
                builder = SentenceBuilder(order=order, select=select.replace("_resample", "_sample"), size=size,
                                          n_genes=6_000, seed=3, bins=bins, resample=select == "weighted_resample",
                                          layout=layout if order == "chromosome" else None, **extra)
                assert builder._compiled_applies("cpu")
                for epoch in (0, 1):
                    fast = builder.build(indptr, indices, values, cells, epoch)
                    with kernels.force_torch():
                        reference = builder.build(indptr, indices, values, cells, epoch)
                    for name in ("gene_tokens", "expression", "special", "padding_mask", "expression_bins"):
                        a, b = getattr(fast, name), getattr(reference, name)
                        assert (a is None and b is None) or torch.equal(a, b), (name, size, bins, extra.keys(), epoch)

