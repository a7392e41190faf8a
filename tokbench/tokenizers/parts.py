"""The five kinds of tokenizer part and every built-in component, one class each.

A new part is one class here (or in the user's own module, named by ``module:Class`` or
registered by a module listed under ``plugins:``):

- :class:`GeneEncoder` (Fg): :meth:`~GeneEncoder.build` returns the module mapping token
  ids (B, T) to vectors (B, T, d_model), and optionally which genes may enter a sentence.
- :class:`ExpressionEncoder` (Fe): :meth:`~ExpressionEncoder.build` returns the module
  mapping a :class:`CellSentences` batch to (B, T, d_model) (or None for no expression
  vector). It reads ``sentences.expression`` (log-normalised values, 0 at special tokens).
- :class:`Order`: :meth:`~Order.rank` gives each expressed gene of each cell (an *entry*) an
  integer rank; a sentence lists its genes by ascending rank, ties by gene index.
- :class:`Select`: :meth:`~Select.key` gives each entry an integer key; the ``size`` entries
  with the smallest keys of each cell enter the sentence (all of them when fewer).
- :class:`Combine`: :meth:`~Combine.build` returns the module that joins the gene and
  expression vectors of each token.

Ranks and keys are int64 tensors in ``[0, 2**31 - 1)`` computed with torch operations on
whatever device the batch is on; :func:`ascending` and :func:`descending` turn float
scores into such ranks exactly. They see the batch through :class:`Entries`: gene, value,
cell, epoch, and counter-based random numbers that depend only on (seed, epoch, cell,
gene), so the CPU kernel and the GPU path produce the same sentences bit for bit. An
order or selection written this way runs on every device and gets the compiled CPU path
with no extra code: the kernel sorts the ranks the class computed.

Built-in orders and selections also carry the fast paths of :mod:`constructor` and
:mod:`compiled` (``kernel_code``); they produce what their ``rank``/``key`` define.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional

import numpy as np
import torch
from torch import nn

from tokbench.errors import TokbenchError
from tokbench.tokenizers import encoders, kernels
from tokbench.tokenizers.base import N_SPECIAL
from tokbench.tokenizers.registry import Component, NoParams, param, register

log = logging.getLogger(__name__)

RANK_LIMIT = 0x7FFFFFFF  # ranks and keys are below this (it marks "after everything")
_RANDOM_BITS = 30
_RANK_BITS = 24  # bits of the genomic rank inside a chromosome-order rank
USER_STREAM = 64  # first random stream of user components (the built-ins use 1..5)


# ----------------------------------------------------------------------------------------
# What components see


@dataclass
class BuildContext:
    """What a component may use when the tokenizer is built for a dataset.

    ``data`` is the :class:`~tokbench.data.prepared.PreparedData` (``gene_ids``,
    ``gene_symbols``, ``split_indices('train')``, ``rows(cells)``, ...); ``d_model`` the
    token vector size; ``vocab_size`` the number of token ids (N_SPECIAL specials, then one
    per gene, then chromosome tokens); ``seed`` the run's seed (the global torch RNG is
    seeded with it while the tokenizer is built, so initial weights depend on it alone).
    """

    data: Any
    d_model: int
    vocab_size: int
    seed: int

    @property
    def n_genes(self) -> int:
        return int(self.data.n_genes)

    def train_matrix(self):
        """The training cells' log-normalised values as a scipy CSR matrix (cells x genes)."""
        import scipy.sparse as sp

        cells = np.asarray(self.data.split_indices("train"), dtype=np.int64)
        indptr, indices, values = self.data.rows(cells)
        indptr = np.asarray(indptr, dtype=np.int64)
        return sp.csr_matrix((np.asarray(values, dtype=np.float32), np.asarray(indices), indptr - indptr[0]),
                             shape=(len(cells), self.n_genes))


@dataclass
class Entries:
    """The expressed genes of a batch, one element per entry, as torch tensors on one device.

    ``gene`` (int64): the gene's column in the dataset (its token is ``N_SPECIAL + gene``);
    ``value`` (float32): its log-normalised value (> 0); ``cell`` (int64): the global row of
    its cell; ``epoch`` and ``seed`` of the run. Shapes are equal and arbitrary (flat, or
    one row per cell).
    """

    gene: torch.Tensor
    value: torch.Tensor
    cell: torch.Tensor
    epoch: int
    seed: int
    _raw_counts: Optional[Callable[[], Optional[torch.Tensor]]] = None

    @property
    def device(self) -> torch.device:
        return self.gene.device

    def uniform(self, stream: int = 0) -> torch.Tensor:
        """float64 uniforms in (0, 1), one per entry, a pure function of (seed, stream, epoch,
        cell, gene): a new epoch draws anew, a cell draws the same in any batch or process.
        Different ``stream`` numbers (0..63) are independent."""
        if not 0 <= stream < 64:
            raise ValueError("stream must be in 0..63")
        key = kernels.stream_key(self.seed, USER_STREAM + stream, self.epoch)
        return kernels.uniform(kernels.item_bits(kernels.cell_keys(key, self.cell), self.gene))

    def raw_counts(self) -> Optional[torch.Tensor]:
        """float32 raw counts behind the values (UCE's, Geneformer's), or None when the data
        has no per-cell library sizes."""
        return None if self._raw_counts is None else self._raw_counts()


def ascending(score: torch.Tensor) -> torch.Tensor:
    """Ranks that list finite float scores in ascending order (exactly: the order of the
    float32 values; -0.0 and 0.0 tie). int64 in [0, 2**31 - 1)."""
    bits = score.to(torch.float32).contiguous().view(torch.int32).to(torch.int64)
    # IEEE floats sort like sign-magnitude integers: flip negatives, then move to >= 0.
    sortable = torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits) + (1 << 31)
    return sortable >> 1  # 32 -> 31 bits: scores one float32 step apart may tie


def descending(score: torch.Tensor) -> torch.Tensor:
    """Ranks that list finite float scores in descending order (see :func:`ascending`)."""
    return (RANK_LIMIT - 1) - ascending(score)


# ----------------------------------------------------------------------------------------
# The five bases


class GeneEncoder(Component):
    """Fg: token id -> vector. :meth:`build` returns ``(module, keep, n_mapped)``: the module
    maps int64 (B, T) token ids to float (B, T, d_model) and has a vector for every id below
    ``ctx.vocab_size``; ``keep`` (bool per gene, or None) marks the genes that may enter a
    sentence; ``n_mapped`` counts genes with a vector of their own (for the run's params)."""

    kind = "fg"

    def build(self, ctx: BuildContext) -> tuple[nn.Module, Optional[np.ndarray], int]:
        raise NotImplementedError


class ExpressionEncoder(Component):
    """Fe: the batch's values -> vectors. :meth:`build` returns a module with
    ``forward(sentences: CellSentences) -> float (B, T, d_model)``, or None for no expression
    vector. Its output is zeroed at special tokens by the embedder."""

    kind = "fe"

    def build(self, ctx: BuildContext) -> Optional[nn.Module]:
        raise NotImplementedError

    def sentence_bins(self) -> Optional[tuple[str, int]]:
        """Bins the sentence builder computes with the sentences (``("scbert", cap)`` or
        ``("scgpt", B)``, into ``CellSentences.expression_bins``); None for none."""
        return None

    @property
    def n_bin_ids(self) -> Optional[int]:
        """Rows of the bin embedding, for the run's params (None without bins)."""
        return None


class Order(Component):
    """The order of a sentence's genes: :meth:`rank` of each entry, ascending; ties go to the
    lower gene index. :meth:`setup` runs once when the tokenizer is built (e.g. to compute
    per-gene statistics over the training cells)."""

    kind = "order"
    kernel_code: ClassVar[int] = 5  # compiled.GIVEN: the kernel sorts the ranks of rank()
    needs_layout: ClassVar[bool] = False  # chromosome groups and their tokens
    keeps_csr_order: ClassVar[bool] = False
    uniform_random: ClassVar[bool] = False  # a uniform random permutation (sampling may reuse it)

    def setup(self, ctx: BuildContext) -> None:
        """Fit whatever the order needs on the dataset (default: nothing)."""

    def rank(self, entries: Entries) -> torch.Tensor:
        """int64 ranks in [0, 2**31 - 1), same shape as ``entries.gene``; smaller first."""
        raise NotImplementedError


class Select(Component):
    """Which genes enter: the ``params.size`` entries of each cell with the smallest
    :meth:`key` (all of them when a cell has fewer), then ordered by the order."""

    kind = "select"
    kernel_code: ClassVar[int] = 2  # compiled: keep the smallest given keys, then order

    @property
    def size(self) -> int:
        return int(self.params.size)

    def setup(self, ctx: BuildContext) -> None:
        """Fit whatever the selection needs on the dataset (default: nothing)."""

    def key(self, entries: Entries) -> torch.Tensor:
        """int64 keys in [0, 2**31 - 1), same shape as ``entries.gene``; smaller kept first."""
        raise NotImplementedError

    def check(self, where: str) -> None:
        if self.size < 1:
            raise TokbenchError(f"{where}.size must be >= 1 (got {self.size})")


class Combine(Component):
    """How a token's gene and expression vectors combine: :meth:`build` returns a module with
    ``forward(genes, expression) -> (B, T, d_model)``; ``expression`` is None when the Fe
    gives no vector. ``uses_expression = False`` refuses an Fe other than ``zero``."""

    kind = "combine"
    uses_expression: ClassVar[bool] = True

    def build(self, ctx: BuildContext) -> nn.Module:
        raise NotImplementedError


# ----------------------------------------------------------------------------------------
# Fg


@register
class Learned(GeneEncoder):
    name = "learned"
    description = "one trainable vector per gene of the dataset (random init)"
    reference = "nn.Embedding, as in every published scFM's gene-token table"

    def build(self, ctx: BuildContext):
        return encoders.LearnedGenes(ctx.vocab_size, ctx.d_model), None, ctx.n_genes


@dataclass
class PretrainedParams:
    path: str = param(help="gene-vector file: .pt, .txt, .csv, .tsv, .parquet or .npy")
    format: str = param("auto", "auto | torch | text | csv | tsv | parquet | npy",
                        choices=("auto", "torch", "text", "csv", "tsv", "parquet", "npy"))
    gene_column: Optional[str] = param(None, "gene-id column of a table (- = the first)")
    gene_list: Optional[str] = param(None, "file with one gene id per line, for .npy")
    frozen: bool = param(True, "keep the file's vectors fixed (a projection still trains)")
    pca: bool = param(False, "reduce to d_model by PCA fitted on the file's vectors")
    missing: str = param("drop", "genes the file lacks: drop | learn", choices=("drop", "learn"))
    min_fraction_mapped: float = param(0.5, "refuse when fewer dataset genes map", low=0.0, high=1.0)


@register
class Pretrained(GeneEncoder):
    name = "pretrained"
    description = "vectors from a file, matched by symbol or Ensembl id"
    reference = "gene-vector files of Gene2vec, GenePT, ESM2 (UCE); see docs/tokenizers.md"
    Params = PretrainedParams

    def build(self, ctx: BuildContext):
        from tokbench.tokenizers.gene_vectors import match_genes, pca, read_gene_vectors

        p, data = self.params, ctx.data
        table = read_gene_vectors(p.path, p.format, p.gene_column, p.gene_list)
        rows = match_genes(data.gene_ids, data.gene_symbols, table.ids)
        mapped = rows >= 0
        n_mapped, fraction = int(mapped.sum()), float(mapped.mean()) if len(rows) else 0.0
        log.info("pretrained gene vectors %s (dim %d): %d of %d dataset genes mapped (%.1f%%); the other %d "
                 "are %s", table.path, table.dim, n_mapped, len(rows), 100 * fraction, len(rows) - n_mapped,
                 "dropped" if p.missing == "drop" else "learned")
        if fraction < p.min_fraction_mapped or n_mapped == 0:
            examples = ", ".join(map(str, np.asarray(data.gene_ids)[~mapped][:5]))
            raise TokbenchError(
                f"fg.path: only {n_mapped} of {len(rows)} dataset genes ({fraction:.1%}) have a vector in "
                f"{table.path}, below fg.min_fraction_mapped={p.min_fraction_mapped}; unmatched examples: "
                f"{examples}. Check that the file and the dataset use symbols or Ensembl ids of the same species."
            )
        vectors = table.vectors
        if p.pca:
            vectors = pca(vectors, min(ctx.d_model, *vectors.shape), ctx.seed)
        full, has_vector = gene_table(ctx, np.flatnonzero(mapped), vectors[rows[mapped]])
        genes = encoders.PretrainedGenes(full, has_vector, ctx.d_model, frozen=p.frozen)
        return genes, (mapped if p.missing == "drop" else None), n_mapped


def gene_table(ctx: BuildContext, genes: np.ndarray, vectors: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """A (vocab_size, k) float32 table with ``vectors[i]`` at the token of gene ``genes[i]``
    (zeros elsewhere) and the bool mask of the tokens that got one: what
    :class:`encoders.PretrainedGenes` takes."""
    full = torch.zeros(ctx.vocab_size, vectors.shape[1], dtype=torch.float32)
    full[N_SPECIAL + np.asarray(genes)] = torch.as_tensor(np.asarray(vectors), dtype=torch.float32)
    has_vector = torch.zeros(ctx.vocab_size, dtype=torch.bool)
    has_vector[N_SPECIAL + np.asarray(genes)] = True
    return full, has_vector


# ----------------------------------------------------------------------------------------
# Fe


@register
class Zero(ExpressionEncoder):
    name = "zero"
    description = "no expression vector (expression acts via order/selection)"
    reference = "Geneformer and UCE: expression only through the sentence"

    def build(self, ctx):
        return None


@register
class Linear(ExpressionEncoder):
    name = "linear"
    description = "w*x + b"
    reference = "a baseline: the value's linear projection (no published model)"

    def build(self, ctx):
        return encoders.LinearExpression(ctx.d_model)


@dataclass
class MlpParams:
    hidden: Optional[int] = param(None, "width (default d_model)", low=1)


@register
class Mlp(ExpressionEncoder):
    name = "mlp"
    description = "Linear(1,hidden) > GELU > Linear(hidden,d_model)"
    reference = "like scGPT's ContinuousValueEncoder (scgpt/model/model.py), with GELU and no LayerNorm"
    Params = MlpParams

    def build(self, ctx):
        return encoders.MlpExpression(ctx.d_model, self.params.hidden or ctx.d_model)


@dataclass
class ScbertBinsParams:
    n_bins: int = param(5, "cap B (classes 0..B)", low=1)


@register
class BinScbert(ExpressionEncoder):
    """scBERT's bins: normalised count c (count / the cell's total over the kept genes x 1e4,
    as scBERT normalises over its panel) -> class ``min(floor(log2(1 + c)), n_bins)``.

    scBERT's preprocess.py normalises to 1e4 and takes log1p base 2; finetune.py sets
    ``bin_num`` 5 and ``CLASS = bin_num + 2`` (the zero class and the mask token). Ids here
    are class + 1 (0 is the special tokens'), so the zeros that ``fc=scbert`` keeps are id 1.
    """

    name = "bin_scbert"
    description = "scBERT: floor(log2(1 + normalised count)) capped at n_bins, embedded"
    reference = "TencentAILabHealthcare/scBERT, preprocess.py and performer_pytorch (CLASS = bin_num + 2)"
    Params = ScbertBinsParams

    def build(self, ctx):
        return encoders.BinnedExpression(self.params.n_bins + 2, ctx.d_model, layer_norm=False)

    def sentence_bins(self):
        return ("scbert", self.params.n_bins)

    @property
    def n_bin_ids(self):
        return self.params.n_bins + 2


@dataclass
class ScgptBinsParams:
    n_bins: int = param(51, "B, including the zero bin", low=3)


@register
class BinScgpt(ExpressionEncoder):
    name = "bin_scgpt"
    description = "per-cell quantile bins of the nonzero values, embedded + LayerNorm"
    reference = "bowang-lab/scGPT, scgpt/preprocess.py (binning) and scgpt/model/model.py (CategoryValueEncoder)"
    Params = ScgptBinsParams

    def build(self, ctx):
        return encoders.BinnedExpression(self.params.n_bins, ctx.d_model, layer_norm=True)

    def sentence_bins(self):
        return ("scgpt", self.params.n_bins)

    @property
    def n_bin_ids(self):
        return self.params.n_bins


@dataclass
class AutobinParams:
    n_bins: int = param(100, "number of bin vectors", low=1)
    alpha: float = param(1.0, "residual weight")


@register
class Autobin(ExpressionEncoder):
    name = "autobin"
    description = "soft binning: softmax over learned bin vectors (scFoundation)"
    reference = "biomap-research/scFoundation, model/pretrainmodels/mae_autobin.py (AutoDiscretizationEmbedding2)"
    Params = AutobinParams

    def build(self, ctx):
        return encoders.AutoBinExpression(ctx.d_model, self.params.n_bins, float(self.params.alpha))


# ----------------------------------------------------------------------------------------
# Orders. The built-in ones rank a whole batch with the constructor's tables
# (``batch_rank``) and have a branch of their own in the compiled kernel (``kernel_code``).


class BuiltinOrder(Order):
    """An order with its own code path in the constructor and the compiled kernel."""

    def batch_rank(self, builder, batch, gene, value, entry, epoch: int, row) -> torch.Tensor:
        """Ranks of a batch's entries (``row``: each entry's row of the batch, None for the
        batch's flat entries), with the constructor's own tables."""
        raise NotImplementedError


@dataclass
class ExpressionOrderParams:
    normalize_by_median: bool = param(False, "rank count/total/median of training cells (Geneformer)")


@register
class ExpressionOrder(BuiltinOrder):
    name = "expression"
    description = "descending expression; ties by gene index"
    reference = "ctheodoris/Geneformer, geneformer/tokenizer.py (rank_genes) with normalize_by_median"
    Params = ExpressionOrderParams
    kernel_code = 0

    def batch_rank(self, builder, batch, gene, value, entry, epoch, row):
        key = _take(batch.expression_keys(builder), entry)
        return RANK_LIMIT - key.contiguous().view(torch.int32).to(torch.int64)


@register
class RandomOrder(BuiltinOrder):
    name = "random"
    description = "random permutation, fresh each epoch"
    reference = "a control: no biological order"
    kernel_code = 1
    uniform_random = True

    def batch_rank(self, builder, batch, gene, value, entry, epoch, row):
        row = batch.row if row is None else row
        keys = builder._cell_keys(kernels.STREAM_ORDER, epoch, batch.cells)
        return kernels.top_bits(kernels.item_bits(_take(keys, row), gene), _RANDOM_BITS)


@register
class GeneIndexOrder(BuiltinOrder):
    name = "gene_index"
    description = "fixed gene order of the dataset"
    reference = "scBERT and scGPT: genes in the panel's fixed order"
    kernel_code = 2

    def batch_rank(self, builder, batch, gene, value, entry, epoch, row):
        return gene


@register
class CsrOrder(BuiltinOrder):
    name = "none"
    description = "keep the order of the data (CSR order)"
    reference = "no ordering: the stored order of the cell's values"
    kernel_code = 3
    keeps_csr_order = True

    def batch_rank(self, builder, batch, gene, value, entry, epoch, row):
        return entry


@register
class ChromosomeOrder(BuiltinOrder):
    name = "chromosome"
    description = "chromosome groups in random order, genes by start (UCE)"
    reference = "snap-stanford/UCE, data_proc/data_utils.py and eval_data.py (chromosome sentences)"
    kernel_code = 4
    needs_layout = True

    def batch_rank(self, builder, batch, gene, value, entry, epoch, row):
        # the cell's random position of the gene's group, then the genomic rank
        row = batch.row if row is None else row
        group = builder._table("group_of_gene", gene.device)[gene]
        positions = builder._group_positions(batch.cells, epoch)
        position = _take(positions.view(-1), row * positions.shape[1] + group)
        return position * (1 << _RANK_BITS) + builder._table("genomic_rank", gene.device)[gene]


# ----------------------------------------------------------------------------------------
# Selections


@dataclass
class TruncateParams:
    size: int = param(2048, "L", low=1)


@register
class Truncate(Select):
    name = "truncate"
    description = "the first `size` genes by the order's own key"
    reference = "Geneformer (first 2048 by rank value), scGPT (max_len)"
    Params = TruncateParams
    kernel_code = 0


@dataclass
class SampleParams:
    size: int = param(1200, "L", low=1)


@register
class Sample(Select):
    name = "sample"
    description = "`size` genes uniformly without replacement"
    reference = "bowang-lab/scGPT, scgpt/data_collator.py (DataCollator, sampling: max_length genes at random)"
    Params = SampleParams
    kernel_code = 1


@dataclass
class WeightedSampleParams:
    size: int = param(1024, "S draws", low=1)
    resample: bool = param(True, "with replacement (false: without)")


@register
class WeightedSample(Select):
    name = "weighted_sample"
    description = "`size` draws, p ~ log1p(raw count) (UCE)"
    reference = "snap-stanford/UCE, eval_data.py (sample_cell_sentences: weights log1p(counts), replace=True)"
    Params = WeightedSampleParams

    @property
    def kernel_code(self) -> int:  # compiled.RESAMPLE or the keys of Efraimidis-Spirakis
        return 3 if self.params.resample else 2


@dataclass
class PanelParams:
    size: int = param(2048, "L: a larger panel is refused", low=1)


@register
class Panel(Select):
    name = "panel"
    description = "every gene of the panel, zeros included (scBERT); order gene_index"
    reference = "TencentAILabHealthcare/scBERT, finetune.py (the whole 16,906-gene panel per cell)"
    Params = PanelParams
    kernel_code = -1  # built densely on every device


# ----------------------------------------------------------------------------------------
# Combine


class _Sum(nn.Module):
    def forward(self, genes, expression):
        return genes if expression is None else genes + expression


class _Concat(nn.Module):
    def __init__(self, d_model: int):
        super().__init__()
        self.project = nn.Linear(2 * d_model, d_model)

    def forward(self, genes, expression):
        return self.project(torch.cat([genes, torch.zeros_like(genes) if expression is None else expression], -1))


@register
class Sum(Combine):
    name = "sum"
    description = "gene vector + expression vector"
    reference = "scGPT, scFoundation: token = gene embedding + value embedding"

    def build(self, ctx):
        return _Sum()


@register
class GeneOnly(Combine):
    name = "gene_only"
    description = "gene vector only (needs fe=zero)"
    reference = "Geneformer, UCE: the gene token alone"
    uses_expression = False

    def build(self, ctx):
        return _Sum()


@register
class Concat(Combine):
    name = "concat"
    description = "Linear(concat(gene, expression)) to d_model"
    reference = "a learned fusion of the two vectors"

    def build(self, ctx):
        return _Concat(ctx.d_model)


def _take(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return values.index_select(0, index.reshape(-1)).view(index.shape)


__all__ = [
    "RANK_LIMIT", "BuildContext", "Combine", "Entries", "ExpressionEncoder", "GeneEncoder", "NoParams", "Order",
    "Select", "ascending", "descending", "gene_table", "param", "register",
]
