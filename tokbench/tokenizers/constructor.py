"""Fc, the cell constructor: CSR rows in, a padded batch of cell sentences out.

The whole batch is processed with array operations, never a loop over cells. Each stored
value of the batch is an *entry* p (its position in the batch's CSR arrays). An entry gets
a 64-bit key ``rank * 2**32 + p``; the keys are scattered into a (B, W) block (W = longest
row of the batch) and one row-wise sort both picks and orders the genes; p then gives the
gene and the value back.

Semantics, exactly:

- A gene is *expressed* in a cell when its log-normalised value is > 0 (and, with a
  pretrained Fg under ``missing: drop``, the file has a vector for it). Nothing else ever
  enters a sentence, except under ``panel`` (below).
- **Selection happens before ordering.** ``truncate`` keeps the ``size`` genes that come
  first under the order's own key (so ``truncate`` + ``expression`` is the top-L by
  expression, ``truncate`` + ``random`` a uniform sample of L in random order, ``truncate``
  + ``none`` the first L in CSR order). ``sample`` picks ``size`` genes uniformly without
  replacement, then orders them; with ``order: random`` the sample's own random keys give
  the order, which is the same distribution. ``weighted_sample`` makes ``size`` draws with
  probability proportional to a weight w (below) of the stored value x: with
  replacement (inverse CDF, a gene may appear several times, always side by side under a
  deterministic order) or without (Efraimidis-Spirakis keys ``-log(u)/w``). The weight w
  is UCE's ``log1p(raw count)``, the raw count being ``round(expm1(x) * count_scale)``
  with the cell's ``library_size / target_sum`` (without ``count_scale``: w = x). Cells
  with fewer expressed genes than ``size`` keep all of them (without replacement).
  ``panel`` is every gene of the panel (all genes, or those a pretrained Fg keeps),
  zero-expressed ones included with value 0, in gene-index order: scBERT's sentence.
- Ties between equal ranks always go to the entry stored first in the row (the lower gene
  index, as the rows of a PreparedData are sorted).
- Orders: ``expression`` descending (with a ``gene_median`` the key is Geneformer's
  ``count / total_counts * target_sum / median_g``, the raw count recovered as above and
  ``total_scale`` = ``target_sum / total_counts``; without the per-cell scales it is
  ``expm1(x) / median_g``); ``random``; ``gene_index`` ascending; ``none`` keeps the CSR
  order; ``chromosome`` (UCE): one group per chromosome present (X, Y and MT included),
  groups in a random order per cell and epoch, genes within a group by genomic start
  (genes of a chromosome without a start after the others), then gene index. Genes
  without a chromosome never enter a ``chromosome`` sentence (the tokenizer drops them
  through ``gene_keep``, as UCE drops genes missing from its chromosome file). Each group
  is opened by its own chromosome token and closed by ``CHROM_END``.
- Sentence: ``[CLS, ...]`` padded with PAD to the longest sentence of the batch. Length of
  a sentence is ``1 + k`` genes, plus ``2 * groups`` under ``chromosome`` order, where k
  is ``min(size, expressed)`` (or ``size`` draws with replacement, 0 for an empty cell).
- Token ids: specials below ``N_SPECIAL``, gene j is ``N_SPECIAL + j``, chromosome group g
  is ``N_SPECIAL + n_genes + g`` (groups sorted by chromosome: 1..22, X, Y, MT).
- ``bin_scbert`` bins: scBERT's class ``min(floor(log2(1 + normalised count)), n_bins)``,
  as the number of edges ``log1p(2**k - 1)`` (k = 1..n_bins, float32 like the stored
  values) at or below x, plus one (id 0 stays the special tokens'; a zero is id 1).
- Random choices use the counter-based streams of :mod:`kernels`: a pure function of
  (seed, epoch, cell index, gene or draw number).

On a CPU, the compiled kernel of :mod:`compiled` builds the same sentences cell by cell;
the array path below runs on GPUs (and on a CPU under ``kernels.force_torch``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tokbench.data.genes import chromosome_rank
from tokbench.errors import TokbenchError
from tokbench.tokenizers import compiled, kernels, registry
from tokbench.tokenizers.base import CHROM_END, CLS, N_SPECIAL, PAD, CellSentences
from tokbench.tokenizers.binning import scbert_bins, scbert_edges, scgpt_bins
from tokbench.tokenizers.parts import (
    RANK_LIMIT,
    BuiltinOrder,
    Entries,
    Order,
    Panel,
    Sample,
    Select,
    Truncate,
    WeightedSample,
)

_LOW32 = 0xFFFFFFFF
_LAST = RANK_LIMIT  # rank of entries that must sort after every real one (real ranks are smaller)
_RANDOM_BITS = 30  # random ranks stay below _LAST
_RANK_BITS = 24  # bits of the genomic rank inside a chromosome-order key


@dataclass(frozen=True)
class ChromosomeLayout:
    """Chromosome groups of the dataset's genes for the ``chromosome`` order.

    ``group_of_gene[j]`` is gene j's group (groups sorted by chromosome; ``n_placed`` for a
    gene without a chromosome); ``genomic_rank[j]`` sorts genes by (group, start, index),
    genes of a chromosome without a start after that chromosome's others; ``placed`` marks
    the genes with a chromosome (the others never enter a sentence).
    """

    group_names: list[str]
    n_placed: int
    group_of_gene: np.ndarray
    genomic_rank: np.ndarray
    placed: np.ndarray

    @property
    def n_groups(self) -> int:
        """Number of chromosome groups (= chromosome tokens)."""
        return len(self.group_names)

    @property
    def n_unplaced(self) -> int:
        """Genes without a chromosome, which ``chromosome`` sentences leave out."""
        return int((~self.placed).sum())


def chromosome_layout(chromosome: np.ndarray, start: np.ndarray, gene_ids: np.ndarray) -> ChromosomeLayout:
    """Group genes by chromosome; raise :class:`TokbenchError` when no gene has a chromosome."""
    chromosome = np.asarray(chromosome, dtype=object).astype(str)
    start = np.asarray(start, dtype=np.int64)
    placed = chromosome != ""
    if not placed.any():
        examples = ", ".join(map(str, np.asarray(gene_ids)[:5]))
        raise TokbenchError(
            f"fc.order=chromosome needs genomic positions, but none of the dataset's {len(start)} genes "
            f"has a chromosome and start (gene ids look like: {examples}). Map the genes to human symbols "
            "or Ensembl ids (data.gene_key) or choose another order."
        )
    names = sorted(set(chromosome[placed]), key=lambda c: (chromosome_rank(c), c))
    group = np.full(len(start), len(names), dtype=np.int64)
    index = {name: i for i, name in enumerate(names)}
    group[placed] = [index[c] for c in chromosome[placed]]
    genomic_rank = np.empty(len(start), dtype=np.int64)
    no_start = start < 0
    keys = (np.arange(len(start)), np.where(no_start, 0, start), no_start, group)
    genomic_rank[np.lexsort(keys)] = np.arange(len(start))
    if len(start) >= 1 << _RANK_BITS or len(names) >= (1 << (31 - _RANK_BITS)) - 1:
        raise TokbenchError(f"chromosome order supports < {1 << _RANK_BITS} genes and < 127 chromosomes")
    return ChromosomeLayout(names, len(index), group, genomic_rank, placed)


class SentenceBuilder:
    """Turns CSR rows into :class:`CellSentences` for one Fc (and the bins of one Fe).

    Holds only small per-gene arrays, no model weights, so data-loader workers can use it.
    """

    def __init__(
        self,
        *,
        order: Order | str,
        select: Select | str,
        n_genes: int,
        seed: int,
        size: int | None = None,
        resample: bool | None = None,
        gene_median: np.ndarray | None = None,
        count_scale: np.ndarray | None = None,
        total_scale: np.ndarray | None = None,
        layout: ChromosomeLayout | None = None,
        gene_keep: np.ndarray | None = None,
        bins: tuple[str, int] | None = None,
    ):
        """``gene_median`` (per gene, > 0): Geneformer's medians for the ``expression`` order.
        ``count_scale`` (per dataset cell: ``library_size / target_sum``) turns stored values
        back into raw counts for UCE's weights and Geneformer's key; ``total_scale`` (per
        cell: ``target_sum / total_counts``) is Geneformer's normalisation by the whole cell.
        ``bins``: ``("scbert", cap)`` or ``("scgpt", B)``.

        ``order`` and ``select`` are components (:mod:`parts`), or registered names with
        default parameters besides ``size`` and ``resample`` (for tests and benchmarks)."""
        if isinstance(order, str):
            order = registry.build("order", {"name": order})
        if isinstance(select, str):
            section = {"name": select, "size": size}
            if select == "weighted_sample":
                section["resample"] = resample
            select = registry.build("select", section)
        if order.needs_layout and layout is None:
            raise ValueError(f"order {order.label()} needs a ChromosomeLayout")
        if isinstance(select, Panel) and order.label() != "gene_index":
            raise ValueError("select 'panel' lists the genes in gene-index order")
        self.order, self.select, self.size = order, select, select.size
        self.resample = isinstance(select, WeightedSample) and bool(select.params.resample)
        self.n_genes, self.seed, self.layout, self.bins = n_genes, int(seed), layout, bins
        if order.needs_layout and not layout.placed.all():
            # genes without a chromosome never enter (UCE drops genes missing from its chromosome file)
            gene_keep = layout.placed if gene_keep is None else np.asarray(gene_keep, dtype=bool) & layout.placed
        keep = np.ones(n_genes, dtype=bool) if gene_keep is None else np.asarray(gene_keep, dtype=bool)
        self.panel = np.flatnonzero(keep)
        tables = {"panel": torch.as_tensor(self.panel, dtype=torch.int64)}
        if gene_median is not None:
            factor = 1.0 / np.asarray(gene_median, dtype=np.float64)
            tables["median_factor"] = torch.as_tensor(factor, dtype=torch.float32)
        if count_scale is not None:
            tables["count_scale"] = torch.as_tensor(np.asarray(count_scale), dtype=torch.float32)
        if total_scale is not None:
            tables["total_scale"] = torch.as_tensor(np.asarray(total_scale), dtype=torch.float32)
        if bins is not None and bins[0] == "scbert":
            tables["scbert_edges"] = torch.from_numpy(scbert_edges(bins[1]))
        if layout is not None:
            tables["group_of_gene"] = torch.as_tensor(layout.group_of_gene)
            tables["genomic_rank"] = torch.as_tensor(layout.genomic_rank)
        if gene_keep is not None and not np.all(gene_keep):
            tables["gene_keep"] = torch.as_tensor(gene_keep, dtype=torch.bool)
        self._tables = {torch.device("cpu"): tables}

    @property
    def max_length(self) -> int:
        """Longest sentence this builder can produce: CLS + genes (+ chromosome tokens)."""
        if isinstance(self.select, Panel):
            return 1 + len(self.panel)
        groups = min(self.size, self.layout.n_groups) if self.layout is not None else 0
        return 1 + self.size + 2 * groups

    def _table(self, name: str, device: torch.device) -> torch.Tensor | None:
        if device not in self._tables:
            self._tables[device] = {k: v.to(device) for k, v in self._tables[torch.device("cpu")].items()}
        return self._tables[device].get(name)

    def _cell_keys(self, stream: int, epoch: int, cells: torch.Tensor) -> torch.Tensor:
        return kernels.cell_keys(kernels.stream_key(self.seed, stream, epoch), cells)

    # -- per-entry values: both paths call these on flat arrays, elementwise, so they agree bit for bit

    # float32 throughout: exact for the integer counts (< 2**24) and cheaper than float64 on
    # the hot path; the keys are float32 anyway.

    def _raw_counts(self, value: torch.Tensor, cell: torch.Tensor) -> torch.Tensor | None:
        """float32 raw counts behind stored values (None without ``count_scale``); at least 1,
        since only expressed genes use them (and a zero key would read as padding)."""
        scale = self._table("count_scale", value.device)
        if scale is None:
            return None
        return (torch.expm1(value) * _take(scale, cell)).round_().clamp_(min=1.0)

    def _expression_key(self, value: torch.Tensor, gene: torch.Tensor, cell) -> torch.Tensor:
        """float32 key of the ``expression`` order: the value, or Geneformer's normalised one
        (count / total_counts * target_sum / median, as a product with the reciprocals)."""
        factor = self._table("median_factor", value.device)
        if factor is None:
            return value
        linear = self._raw_counts(value, cell())
        if linear is None:
            linear = torch.expm1(value)
        else:
            linear = linear * _take(self._table("total_scale", value.device), cell())
        return linear * _take(factor, gene)

    def _sampling_weight(self, value: torch.Tensor, cell) -> torch.Tensor:
        """float64 ``weighted_sample`` weight: UCE's log1p(raw count), or the stored value."""
        raw = self._raw_counts(value, cell())
        return (value if raw is None else torch.log1p(raw)).to(torch.float64)

    # -- order ranks: non-negative int64 below _LAST, smaller comes first ----------------------

    def _order_rank(self, batch: "_Batch", gene, value, entry, epoch: int, row=None) -> torch.Tensor:
        """Rank of each entry under the order.

        ``row`` (broadcastable to ``gene``) names each entry's cell; None means ``gene`` etc.
        are the batch's flat entries.
        """
        if isinstance(self.order, BuiltinOrder):
            return self.order.batch_rank(self, batch, gene, value, entry, epoch, row)
        if row is None:
            row = batch.row
        cell = _take(batch.cells, torch.broadcast_to(row, gene.shape))
        return checked(self.order, "rank", self.order.rank(self._entries(gene, value, cell, epoch)), gene)

    def _entries(self, gene: torch.Tensor, value: torch.Tensor, cell: torch.Tensor, epoch: int) -> Entries:
        """What a user order or selection sees of these entries."""
        return Entries(gene, value, cell, epoch, self.seed, lambda: self._raw_counts(value, cell))

    def _group_positions(self, cells: torch.Tensor, epoch: int) -> torch.Tensor:
        """(B, n_groups + 1) position of each chromosome group in each cell's order."""
        layout, device = self.layout, cells.device
        placed = torch.arange(layout.n_placed, device=device).expand(len(cells), -1)
        bits = kernels.item_bits(self._cell_keys(kernels.STREAM_CHROMOSOME, epoch, cells)[:, None], placed)
        order = kernels.sort_rows(kernels.top_bits(bits, _RANDOM_BITS) * (1 << 32) + placed) & _LOW32
        # one more column for genes without a chromosome: ranked (then masked out), never emitted
        position = torch.full((len(cells), layout.n_placed + 1), layout.n_placed, dtype=torch.int64, device=device)
        return position.scatter_(1, order, placed.contiguous())

    # -- the batch ------------------------------------------------------------------------

    def build(
        self,
        indptr: np.ndarray,
        indices: np.ndarray,
        values: np.ndarray,
        cells: np.ndarray,
        epoch: int,
        device: torch.device | str = "cpu",
    ) -> CellSentences:
        """Cell sentences of the CSR rows ``(indptr, indices, values)`` of cells ``cells``.

        ``cells`` are the global row indices (they seed the random choices); ``values`` are
        log-normalised (float32); ``indices`` are gene columns. Runs on ``device``.
        """
        if isinstance(self.select, Panel):
            return self._build_panel(indptr, indices, values, cells, epoch, torch.device(device))
        if self._compiled_applies(device):
            return self._build_compiled(indptr, indices, values, cells, epoch)
        batch = _Batch.from_csr(indptr, indices, values, cells, torch.device(device),
                                self._table("gene_keep", torch.device(device)))
        entry, real = self._choose(batch, epoch)
        gene, value = _take(batch.gene, entry), _take(batch.value, entry)
        bins = None
        if self.bins is not None:
            kind, n_bins = self.bins
            if kind == "scbert":
                bins = scbert_bins(value, self._table("scbert_edges", value.device))
            else:
                tie_bits = kernels.item_bits(self._cell_keys(kernels.STREAM_BIN, epoch, batch.cells)[:, None], gene)
                value_bits = torch.where(batch.expressed, batch.value[:-1].view(torch.int32).to(torch.int64), _LAST)
                value_keys = batch.dense(value_bits * (1 << 32) + batch.entries)
                bins = scgpt_bins(value_keys, batch.n_entries + 1, batch.n_expressed, entry, tie_bits, n_bins)
        return self._assemble(gene, value, bins, real, self._count(batch))

    def _compiled_applies(self, device) -> bool:
        return kernels.compiled_enabled(torch.device(device))

    def _build_panel(self, indptr, indices, values, cells, epoch: int, device: torch.device) -> CellSentences:
        """``select: panel``: CLS then every panel gene in gene-index order, zeros included.

        One dense (B, n_genes) scatter, the same torch operations on every device (so the
        CPU needs no separate kernel). The scBERT bin of a zero is class 0 (id 1); scGPT's
        bins of the expressed genes are the usual per-cell quantile bins, a zero gets bin 0,
        scGPT's zero bin (``include_zero_gene=True``).
        """
        indptr = np.asarray(indptr, dtype=np.int64)
        first, last = (int(indptr[0]), int(indptr[-1])) if len(indptr) > 1 else (0, 0)
        n_cells, panel = len(indptr) - 1, self._table("panel", device)
        row = torch.as_tensor(np.repeat(np.arange(n_cells), np.diff(indptr))).to(device)
        gene = torch.as_tensor(np.asarray(indices)[first:last]).to(device=device, dtype=torch.int64)
        value = torch.as_tensor(np.asarray(values, dtype=np.float32)[first:last]).to(device)
        dense = torch.zeros(n_cells, self.n_genes, dtype=torch.float32, device=device)
        dense.index_put_((row, gene), value)
        length = 1 + len(self.panel)
        tokens = torch.empty(n_cells, length, dtype=torch.int64, device=device)
        tokens[:, 0] = CLS
        tokens[:, 1:] = panel + N_SPECIAL
        expression = torch.zeros(n_cells, length, dtype=torch.float32, device=device)
        expression[:, 1:] = dense.index_select(1, panel)
        special = torch.zeros(n_cells, length, dtype=torch.bool, device=device)
        special[:, 0] = True
        bins = None
        if self.bins is not None and self.bins[0] == "scbert":
            bins = scbert_bins(expression, self._table("scbert_edges", device))
            bins[:, 0] = 0
        elif self.bins is not None:
            batch = _Batch.from_csr(indptr, indices, values, cells, device, self._table("gene_keep", device))
            entry = batch.dense(batch.entries) & _LOW32  # each row's own entries; the sentinel where none
            gene_of = _take(batch.gene, entry)
            tie_bits = kernels.item_bits(self._cell_keys(kernels.STREAM_BIN, epoch, batch.cells)[:, None], gene_of)
            value_bits = torch.where(batch.expressed, batch.value[:-1].view(torch.int32).to(torch.int64), _LAST)
            value_keys = batch.dense(value_bits * (1 << 32) + batch.entries)
            binned = scgpt_bins(value_keys, batch.n_entries + 1, batch.n_expressed, entry, tie_bits, self.bins[1])
            expressed = torch.cat([batch.expressed, batch.expressed.new_zeros(1)])
            binned = torch.where(_take(expressed, entry), binned, 0)
            dense_bins = torch.zeros(n_cells, self.n_genes + 1, dtype=torch.int64, device=device)
            # places without an expressed entry write bin 0 into a spare last column
            column = torch.where(_take(expressed, entry), gene_of, self.n_genes)
            dense_bins.scatter_(1, column, binned)
            bins = torch.zeros(n_cells, length, dtype=torch.int64, device=device)
            bins[:, 1:] = dense_bins.index_select(1, panel)
        return CellSentences(tokens, expression, special, torch.zeros_like(special), bins)

    def _build_compiled(self, indptr, indices, values, cells, epoch: int) -> CellSentences:
        """The CPU kernel of :mod:`compiled`: the same sentences as the array path below."""
        indptr = np.asarray(indptr, dtype=np.int64)
        first, last = (int(indptr[0]), int(indptr[-1])) if len(indptr) > 1 else (0, 0)
        indptr = indptr - first
        indices = np.ascontiguousarray(np.asarray(indices)[first:last])
        if indices.dtype not in (np.int32, np.int64):
            indices = indices.astype(np.int64)
        values = np.ascontiguousarray(np.asarray(values, dtype=np.float32)[first:last])
        cells = np.ascontiguousarray(cells, dtype=np.int64)
        cpu = torch.device("cpu")
        keep = self._table("gene_keep", cpu)
        keep = np.zeros(0, dtype=np.bool_) if keep is None else keep.numpy()
        value = torch.from_numpy(values)

        def gene() -> torch.Tensor:
            return torch.from_numpy(indices).to(torch.int64)

        entry_cells = _entry_cells(indptr, cells)
        order_bits = values.view(np.int32)
        if self.order.kernel_code == compiled.EXPRESSION:
            order_bits = self._expression_key(value, gene(), entry_cells).numpy().view(np.int32)
        elif self.order.kernel_code == compiled.GIVEN:
            order_bits = self._given_ranks(self.order, "rank", gene(), value, entry_cells(), epoch)
        n_expressed = compiled.count_expressed(indptr, indices, values, keep)
        n_cells, size, resample = len(cells), self.size, self.resample
        select = self.select.kernel_code
        if isinstance(self.select, WeightedSample):
            select_bits, draw_u, weights = self._weighted_draws(indptr, cells, value, gene, keep, epoch, entry_cells)
        else:
            select_bits, draw_u, weights = (np.zeros(0, dtype=np.int32), np.zeros((0, 0), dtype=np.float64),
                                            np.zeros(0, dtype=np.int64))
            if not isinstance(self.select, (Truncate, Sample)):
                select_bits = self._given_ranks(self.select, "key", gene(), value, entry_cells(), epoch)
        count = np.where(n_expressed > 0, size, 0) if resample else np.minimum(n_expressed, size)
        longest = int(count.max()) if n_cells else 0
        layout = self.layout
        if layout is not None:
            longest += 2 * min(longest, layout.n_groups)
            group_of_gene, genomic_rank = layout.group_of_gene, layout.genomic_rank
        else:
            group_of_gene = genomic_rank = np.zeros(0, dtype=np.int64)
        kind, n_bins = self.bins if self.bins is not None else (None, 0)
        edges = self._table("scbert_edges", cpu)
        edges = np.zeros(0, dtype=np.float32) if edges is None else edges.numpy()
        shape = (n_cells, 1 + longest)
        tokens = np.empty(shape, dtype=np.int64)
        expression = np.empty(shape, dtype=np.float32)
        special = np.empty(shape, dtype=np.bool_)
        padding = np.empty(shape, dtype=np.bool_)
        bins = np.empty(shape if kind else (0, 0), dtype=np.int64)
        streams = (kernels.STREAM_SELECT, kernels.STREAM_ORDER, kernels.STREAM_BIN, kernels.STREAM_CHROMOSOME)
        keys = np.array([kernels.stream_key(self.seed, s, epoch) & kernels.MASK64 for s in streams], dtype=np.uint64)
        length = compiled.fill_sentences(
            indptr, indices, values, np.ascontiguousarray(order_bits), select_bits, draw_u, weights,
            keep, cells, n_expressed, select, self.order.kernel_code, size, keys, compiled.BIN_CODES[kind],
            n_bins, edges, group_of_gene, genomic_rank, layout.n_placed if layout else 0, self.n_genes,
            tokens, expression, special, padding, bins,
        )
        out = [tokens, expression, special, padding, bins]
        if length < shape[1]:  # chromosome order: fewer groups than the bound allowed for
            out = [np.ascontiguousarray(a[:, :length]) if kind or i < 4 else a for i, a in enumerate(out)]
        tensors = [torch.from_numpy(a) for a in out]
        return CellSentences(*tensors[:4], tensors[4] if kind else None)

    def _given_ranks(self, component, method: str, gene, value, cell, epoch: int) -> np.ndarray:
        """int32 ranks (keys) of a user order (selection) for every stored entry, for the kernel."""
        entries = self._entries(gene, value, cell, epoch)
        ranks = checked(component, method, getattr(component, method)(entries), gene)
        return np.ascontiguousarray(ranks.to(torch.int32).numpy())

    def _weighted_draws(self, indptr, cells, value, gene, keep, epoch: int, entry_cells):
        """The floating-point draws of ``weighted_sample`` for the compiled kernel, computed
        with the array path's torch operations on arrays of the same shapes (so both paths
        share them bit for bit): the int32 patterns of each entry's Efraimidis-Spirakis key
        (without replacement), or the (B, size) sorted uniforms and the fixed-point weights of
        the inverse-CDF draws (with replacement). Empty arrays for the other selections."""
        select_bits = np.zeros(0, dtype=np.int32)
        draw_u = np.zeros((0, 0), dtype=np.float64)
        weights = np.zeros(0, dtype=np.int64)
        cells = torch.from_numpy(cells)
        weight = self._sampling_weight(value, entry_cells)
        if not self.resample:  # as in _choose
            row = torch.from_numpy(np.repeat(np.arange(len(cells)), np.diff(indptr)))
            keys = self._cell_keys(kernels.STREAM_SELECT, epoch, cells)
            u = kernels.uniform(kernels.item_bits(_take(keys, row), gene()))
            select_bits = (-torch.log(u) / weight).to(torch.float32).view(torch.int32).numpy()
            return select_bits, draw_u, weights
        # as in _draw
        draws = torch.arange(self.size + 1).expand(len(cells), -1)
        bits = kernels.item_bits(self._cell_keys(kernels.STREAM_DRAW, epoch, cells)[:, None], draws)
        spacing = (-torch.log(kernels.uniform(bits))).cumsum(1)
        draw_u = (spacing[:, : self.size] / spacing[:, self.size :]).contiguous().numpy()
        weight = (weight * (1 << 20)).round_().to(torch.int64).clamp_(min=1)
        valid = value > 0
        if len(keep):
            valid &= torch.from_numpy(keep)[gene()]
        return select_bits, draw_u, torch.where(valid, weight, 0).numpy()

    def _count(self, batch: "_Batch") -> torch.Tensor:
        """Genes in each cell's sentence."""
        if self.resample:
            return torch.where(batch.n_expressed > 0, self.size, 0)
        return batch.n_expressed.clamp(max=self.size)

    def _choose(self, batch: "_Batch", epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, K) entries of the chosen genes in sentence order, and which places are real."""
        size, order, select = self.size, self.order, self.select
        if isinstance(select, Truncate) or (isinstance(select, Sample) and (batch.width <= size or order.uniform_random)):
            if order.keeps_csr_order and batch.valid is None:
                columns = torch.arange(min(size, batch.width), device=batch.device)
                real = columns < batch.lengths[:, None]
                return torch.where(real, batch.starts[:, None] + columns, batch.n_entries), real
            rank = self._order_rank(batch, batch.gene[:-1], batch.value[:-1], batch.entries, epoch)
            return _smallest(batch.dense(_compose(rank, batch.valid, batch.entries)), size)

        if isinstance(select, Sample):
            keys = self._cell_keys(kernels.STREAM_SELECT, epoch, batch.cells)
            rank = kernels.top_bits(kernels.item_bits(_take(keys, batch.row), batch.gene[:-1]), _RANDOM_BITS)
            entry, real = _smallest(batch.dense(_compose(rank, batch.valid, batch.entries)), size)
        elif self.resample:
            entry, real = self._draw(batch, epoch)
        elif not isinstance(select, WeightedSample):
            # a selection of the user's: the `size` smallest keys
            cell = batch.entry_cells()[:-1]
            key = checked(select, "key", select.key(self._entries(batch.gene[:-1], batch.value[:-1], cell, epoch)),
                          batch.gene[:-1])
            entry, real = _smallest(batch.dense(_compose(key, batch.valid, batch.entries)), size)
        else:
            # Efraimidis-Spirakis: the `size` smallest -log(u)/x are a weighted sample without replacement.
            keys = self._cell_keys(kernels.STREAM_SELECT, epoch, batch.cells)
            u = kernels.uniform(kernels.item_bits(_take(keys, batch.row), batch.gene[:-1]))
            weight = self._sampling_weight(batch.value[:-1], lambda: batch.entry_cells()[:-1])
            rank = (-torch.log(u) / weight).to(torch.float32).view(torch.int32)
            entry, real = _smallest(batch.dense(_compose(rank.to(torch.int64), batch.valid, batch.entries)), size)

        # Order the chosen entries. Ties go to the earlier entry, as on the truncate path, so
        # a cell's sentence does not depend on which path its batch took; repeated draws of
        # one entry are equal keys and end up side by side.
        rows = torch.arange(len(entry), device=batch.device)[:, None]
        rank = self._order_rank(batch, _take(batch.gene, entry), _take(batch.value, entry), entry, epoch, rows)
        return _smallest(_compose(rank, real, entry), entry.shape[1])

    def _draw(self, batch: "_Batch", epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``size`` draws with replacement per cell, p ~ weight, by inverse CDF (in CSR order).

        Weights are fixed point (value * 2**20, at least 1 for an expressed gene), so the
        prefix sums are exact integers: a cell's draws cannot depend on the rows before it
        in the batch, as floating-point prefix sums would.
        """
        size, device, n_cells = self.size, batch.device, len(batch.cells)
        weight = self._sampling_weight(batch.value[:-1], lambda: batch.entry_cells()[:-1])
        weight = (weight * (1 << 20)).round_().to(torch.int64).clamp_(min=1)
        if batch.valid is not None:
            weight = torch.where(batch.valid, weight, 0)
        cumulative = torch.cat([weight.new_zeros(1), weight.cumsum(0)])
        row_start = cumulative[batch.starts]
        total = cumulative[batch.starts + batch.lengths] - row_start
        # Sorted uniforms from exponential spacings, so the flat search sees sorted queries.
        draws = torch.arange(size + 1, device=device).expand(n_cells, -1)
        bits = kernels.item_bits(self._cell_keys(kernels.STREAM_DRAW, epoch, batch.cells)[:, None], draws)
        spacing = (-torch.log(kernels.uniform(bits))).cumsum(1)
        u = spacing[:, :size] / spacing[:, size:]
        offset = (u * total[:, None].to(torch.float64)).floor_().to(torch.int64)  # 0 .. total-1
        target = row_start[:, None] + offset
        entry = kernels.searchsorted_right(cumulative[1:], target.reshape(-1)).view(n_cells, size)
        real = (batch.n_expressed > 0)[:, None].expand(n_cells, size)
        return torch.where(real, entry, batch.n_entries), real.contiguous()

    def _assemble(self, gene, value, bins, real, count) -> CellSentences:
        n_cells, device = gene.shape[0], gene.device
        length = 1 + (int(count.max()) if n_cells else 0)
        if self.layout is None:
            width = length - 1
            absent = ~real[:, :width]
            tokens = torch.empty(n_cells, length, dtype=torch.int64, device=device)
            tokens[:, 0] = CLS
            torch.add(gene[:, :width], N_SPECIAL, out=tokens[:, 1:]).masked_fill_(absent, PAD)
            expression = torch.empty(n_cells, length, dtype=torch.float32, device=device)
            expression[:, 0] = 0.0
            expression[:, 1:] = value[:, :width]
            expression[:, 1:].masked_fill_(absent, 0.0)
            out_bins = None
            if bins is not None:
                out_bins = torch.empty(n_cells, length, dtype=torch.int64, device=device)
                out_bins[:, 0] = 0
                out_bins[:, 1:] = bins[:, :width]
                out_bins[:, 1:].masked_fill_(absent, 0)
            padding = torch.zeros_like(tokens, dtype=torch.bool)
            padding[:, 1:] = absent
            special = padding.clone()
            special[:, 0] = True
            return CellSentences(tokens, expression, special, padding, out_bins)

        # Chromosome groups: gene j of a row moves right by 2 per group opened up to it.
        k = gene.shape[1]
        group = self._table("group_of_gene", device)[gene]
        differs = torch.ones_like(real)
        differs[:, 1:] = group[:, 1:] != group[:, :-1]
        opens = real & differs
        closes = real & torch.cat([~real[:, 1:] | differs[:, 1:], torch.ones_like(real[:, :1])], 1)
        position = torch.arange(k, device=device) + 2 * opens.cumsum(1)
        length = 1 + (int((count + 2 * opens.sum(1)).max()) if n_cells else 0)
        spill = length  # masked writes land in one extra column that is cut off
        at_gene = torch.where(real, position, spill)
        tokens = torch.full((n_cells, length + 1), PAD, dtype=torch.int64, device=device)
        tokens[:, 0] = CLS
        tokens.scatter_(1, at_gene, gene + N_SPECIAL)
        tokens.scatter_(1, torch.where(opens, position - 1, spill), N_SPECIAL + self.n_genes + group)
        tokens.scatter_(1, torch.where(closes, position + 1, spill), torch.full_like(group, CHROM_END))
        expression = torch.zeros(n_cells, length + 1, dtype=torch.float32, device=device)
        expression.scatter_(1, at_gene, value)
        out_bins = None
        if bins is not None:
            out_bins = torch.zeros(n_cells, length + 1, dtype=torch.int64, device=device)
            out_bins = out_bins.scatter_(1, at_gene, bins)[:, :length]
        tokens = tokens[:, :length]
        special = (tokens < N_SPECIAL) | (tokens >= N_SPECIAL + self.n_genes)
        return CellSentences(tokens, expression[:, :length], special, tokens == PAD, out_bins)


class _Batch:
    """One batch as flat arrays over its entries (stored values), p = 0..n_entries-1.

    ``gene``/``value`` carry one extra sentinel entry at index ``n_entries`` (gene 0,
    value 0) that padding points at. ``valid`` is None when every entry is expressed.
    """

    def __init__(self, cells, starts, lengths, width, gene, value, valid, device):
        self.cells, self.starts, self.lengths, self.width = cells, starts, lengths, width
        self.gene, self.value, self.valid, self.device = gene, value, valid, device
        self.n_entries = len(gene) - 1
        self.entries = torch.arange(self.n_entries, device=device)
        self._row = self._dest = self._expression_keys = None
        if valid is None:
            self.n_expressed = lengths
        else:
            counts = torch.cat([lengths.new_zeros(1), valid.cumsum(0)])
            self.n_expressed = counts[starts + lengths] - counts[starts]

    @classmethod
    def from_csr(cls, indptr, indices, values, cells, device, gene_keep) -> "_Batch":
        indptr = np.asarray(indptr, dtype=np.int64)
        first, n_entries = (int(indptr[0]), int(indptr[-1] - indptr[0])) if len(indptr) > 1 else (0, 0)
        lengths = np.diff(indptr)
        gene = torch.zeros(n_entries + 1, dtype=torch.int64, device=device)
        value = torch.zeros(n_entries + 1, dtype=torch.float32, device=device)
        gene[:-1] = torch.as_tensor(np.asarray(indices)[first : first + n_entries]).to(device)
        value[:-1] = torch.as_tensor(np.asarray(values, dtype=np.float32)[first : first + n_entries]).to(device)
        valid = value[:-1] > 0
        if gene_keep is not None:
            valid &= gene_keep[gene[:-1]]
        if bool(valid.all()):
            valid = None
        return cls(
            torch.as_tensor(np.asarray(cells, dtype=np.int64)).to(device),
            torch.as_tensor(indptr[:-1] - first).to(device),
            torch.as_tensor(lengths).to(device),
            int(lengths.max(initial=0)), gene, value, valid, device,
        )

    @property
    def expressed(self) -> torch.Tensor:
        """Bool per entry: the gene is expressed (and allowed)."""
        return torch.ones_like(self.entries, dtype=torch.bool) if self.valid is None else self.valid

    def entry_cells(self) -> torch.Tensor:
        """Global cell index of each entry (the sentinel entry included, as cell 0's)."""
        cells = torch.cat([self.cells, self.cells.new_zeros(1)])
        return cells.index_select(0, torch.cat([self.row, self.row.new_full((1,), len(self.cells))]))

    def expression_keys(self, builder: "SentenceBuilder") -> torch.Tensor:
        """The ``expression`` order's float32 key of every entry (sentinel included)."""
        if self._expression_keys is None:
            self._expression_keys = builder._expression_key(self.value, self.gene, self.entry_cells)
        return self._expression_keys

    @property
    def row(self) -> torch.Tensor:
        """Cell (row of the batch) of each entry."""
        if self._row is None:
            rows = torch.arange(len(self.lengths), device=self.device)
            self._row = kernels.repeat(rows, self.lengths, self.n_entries)
        return self._row

    def dense(self, flat: torch.Tensor) -> torch.Tensor:
        """Scatter one sort key per entry into a (B, W) block.

        Places without an entry get a key that sorts after every real one and points at
        the sentinel entry.
        """
        if self._dest is None:
            shift = torch.arange(len(self.lengths), device=self.device) * self.width - self.starts
            self._dest = self.entries + kernels.repeat(shift, self.lengths, self.n_entries)
        padding = (_LAST << 32) | self.n_entries
        block = torch.full((len(self.lengths) * self.width,), padding, dtype=torch.int64, device=self.device)
        return block.scatter_(0, self._dest, flat).view(len(self.lengths), self.width)


def checked(component, method: str, ranks: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A user order's ranks or selection's keys, checked: integer, the entries' shape, in
    [0, 2**31 - 1). Raises TokbenchError naming the class otherwise."""
    where = f"{component.label()}.{method}()"
    if not isinstance(ranks, torch.Tensor) or ranks.shape != like.shape:
        shape = tuple(ranks.shape) if isinstance(ranks, torch.Tensor) else type(ranks).__name__
        raise TokbenchError(f"{where} must return a tensor shaped like entries.gene {tuple(like.shape)}, got {shape}")
    if ranks.dtype.is_floating_point or ranks.dtype == torch.bool:
        raise TokbenchError(f"{where} returned {ranks.dtype}; return int64 ranks (tokbench.tokenizers.parts."
                            "ascending/descending turn float scores into ranks)")
    ranks = ranks.to(torch.int64)
    if ranks.numel() and (int(ranks.min()) < 0 or int(ranks.max()) >= _LAST):
        raise TokbenchError(f"{where} returned values in [{int(ranks.min())}, {int(ranks.max())}]; "
                            f"ranks must lie in [0, {_LAST})")
    return ranks


def _entry_cells(indptr: np.ndarray, cells: np.ndarray):
    """A function giving the global cell index of each entry of CSR rows (computed on demand)."""
    return lambda: torch.from_numpy(np.repeat(np.asarray(cells, dtype=np.int64), np.diff(indptr)))


def _take(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values[index]`` for a 1-D ``values`` and an index of any shape (a fast gather)."""
    return values.index_select(0, index.reshape(-1)).view(index.shape)


def _compose(rank: torch.Tensor, real: torch.Tensor | None, low: torch.Tensor) -> torch.Tensor:
    """Sort keys ``rank * 2**32 + low``, with rank _LAST where ``real`` is False."""
    if real is not None:
        rank = torch.where(real, rank, _LAST)
    return rank * (1 << 32) + low


def _smallest(keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Entries (low 32 bits) of the ``k`` smallest keys of each row, and which are real."""
    keys = kernels.sort_rows(keys)[:, :k]
    return keys & _LOW32, keys < (_LAST << 32)


def compile_kernels() -> None:
    """Compile the CPU kernel of :mod:`compiled` now (or load it from numba's disk cache).

    The first sentences of a process would otherwise pay for it; the sweep calls this once
    per node before trials start, so trials load the cached machine code.
    """
    builder = SentenceBuilder(order="expression", select="truncate", size=1, n_genes=1, seed=0)
    for indices in (np.zeros(1, dtype=np.int32), np.zeros(1, dtype=np.int64)):
        builder.build(np.array([0, 1]), indices, np.ones(1, dtype=np.float32), np.zeros(1, dtype=np.int64), 0)
