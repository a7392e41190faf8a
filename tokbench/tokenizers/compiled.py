"""Compiled CPU kernel of the sentence builder: one pass per cell, sorts by radix.

The array path of :class:`~tokbench.tokenizers.constructor.SentenceBuilder` scatters the
whole batch into a (B, W) block of 64-bit keys and sorts every row; on a CPU that costs
several full passes over the batch per step. This kernel (numba, compiled on first use and
cached on disk) walks the cells instead: for each cell it lists the expressed genes, ranks
them, sorts the ranks with a stable least-significant-digit radix sort (ties keep the CSR
order, which is the array path's tie-break by entry), and writes the padded sentence and
its bins straight into the output arrays. The scGPT bins need each value's rank among the
cell's values; log-normalised counts take few distinct values per cell, so the kernel
counts them in a hash table and sorts only the distinct ones.

It covers every order and selection of the catalogue and the bins of ``bin_scbert`` and
``bin_scgpt``. The result is the array path's, bit for bit: the random bits are the same
splitmix64 counters of :mod:`kernels`, every rank is the same integer (the ``chromosome``
order's random group positions included), the scGPT bins use the same exact float64
operations in the same order, and the only draws that need logarithms (``weighted_sample``'s
Efraimidis-Spirakis keys and its exponential spacings) are computed by the caller with the
array path's own torch operations. Tests compare both paths on random batches.
"""

from __future__ import annotations

import numba
import numpy as np

from tokbench.tokenizers.base import CHROM_END, CLS, N_SPECIAL, PAD

# Order codes (``Order.kernel_code``): the built-in orders, and GIVEN, ranks computed by the
# caller (an order of the user's). Select codes (``Select.kernel_code``): truncate, uniform
# sample, keep the smallest given keys (Efraimidis-Spirakis keys, or a user's selection),
# weighted draws with replacement.
EXPRESSION, GIVEN = 0, 5
_EXPRESSION, _RANDOM, _GENE_INDEX, _NONE, _CHROMOSOME, _GIVEN = 0, 1, 2, 3, 4, GIVEN
_SAMPLE, _WEIGHTED, _RESAMPLE = 1, 2, 3
BIN_CODES = {None: 0, "scbert": 1, "scgpt": 2}
_RANK_BITS = 24  # genomic rank bits of a chromosome-order rank, as in the array path

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)
_S11, _S30, _S27, _S31, _S34 = np.uint64(11), np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(34)
_LAST = 0x7FFFFFFF
_DIGIT_BITS, _DIGITS, _PASSES = 8, 256, 4  # radix digits of non-negative int32 ranks
_SMALL = 48  # rows this short are sorted by insertion


@numba.njit(inline="always")
def _mix(z):
    z = (z ^ (z >> _S30)) * _MUL1
    z = (z ^ (z >> _S27)) * _MUL2
    return z ^ (z >> _S31)


@numba.njit(inline="always")
def _bits(cell_key, item):
    """kernels.item_bits for one item: 64 random bits (uint64)."""
    return _mix(np.uint64(item) * _GOLDEN + cell_key)


@numba.njit(cache=True, nogil=True)
def _sort_by_rank(rank, item, n, spare_rank, spare_item, count):
    """Stable sort of ``item[:n]`` by ``rank[:n]`` (non-negative int32), in place."""
    if n < _SMALL:
        for i in range(1, n):
            r, it = rank[i], item[i]
            j = i - 1
            while j >= 0 and rank[j] > r:
                rank[j + 1], item[j + 1] = rank[j], item[j]
                j -= 1
            rank[j + 1], item[j + 1] = r, it
        return
    count[:, :] = 0
    for i in range(n):
        r = rank[i]
        for digit in range(_PASSES):
            count[digit, (r >> (digit * _DIGIT_BITS)) & (_DIGITS - 1)] += 1
    src_rank, src_item, dst_rank, dst_item = rank, item, spare_rank, spare_item
    moved = False
    for digit in range(_PASSES):
        shift = digit * _DIGIT_BITS
        if count[digit, (rank[0] >> shift) & (_DIGITS - 1)] == n:
            continue  # every rank has this digit: the pass would not move anything
        total = 0
        for d in range(_DIGITS):
            c = count[digit, d]
            count[digit, d] = total
            total += c
        for i in range(n):
            d = (src_rank[i] >> shift) & (_DIGITS - 1)
            at = count[digit, d]
            count[digit, d] = at + 1
            dst_rank[at] = src_rank[i]
            dst_item[at] = src_item[i]
        src_rank, dst_rank = dst_rank, src_rank
        src_item, dst_item = dst_item, src_item
        moved = not moved
    if moved:
        rank[:n] = src_rank[:n]
        item[:n] = src_item[:n]


@numba.njit(inline="always")
def _put_special(tokens, expression, special, padding, bins, has_bins, r, c, token):
    """A special token (CLS, a chromosome's, CHROM_END) at row r, column c: no value, bin 0."""
    tokens[r, c] = token
    expression[r, c] = 0.0
    special[r, c] = True
    padding[r, c] = False
    if has_bins:
        bins[r, c] = 0


@numba.njit(cache=True, nogil=True)
def count_expressed(indptr, indices, values, keep):
    """Expressed genes (value > 0 and, when ``keep`` is not empty, ``keep[gene]``) per row."""
    n_rows = len(indptr) - 1
    out = np.zeros(n_rows, dtype=np.int64)
    use_keep = len(keep) > 0
    for r in range(n_rows):
        m = 0
        for p in range(indptr[r], indptr[r + 1]):
            if values[p] > 0 and (not use_keep or keep[indices[p]]):
                m += 1
        out[r] = m
    return out


@numba.njit(cache=True, nogil=True)
def fill_sentences(
    indptr, indices, values, order_bits, select_bits, draw_u, weights, keep, cells, n_expressed,
    select, order, size, keys, bin_kind, n_bins, scbert_edges, group_of_gene, genomic_rank, n_placed, n_genes,
    tokens, expression, special, padding, bins,
):
    """Write each row's sentence into the (B, T) outputs; return the longest sentence.

    ``order_bits`` are the int32 bit patterns of the values the expression order ranks
    (the values themselves, or Geneformer's median-normalised ones). The array path's
    floating-point draws come in computed by torch, so both paths share them bit for bit:
    ``select_bits`` (weighted sampling without replacement) are the int32 patterns of each
    entry's Efraimidis-Spirakis key, ``draw_u`` (B, size) the sorted uniforms and
    ``weights`` the fixed-point weights of the inverse-CDF draws with replacement. ``keep``
    is empty when every gene may enter; ``keys`` are the epoch's stream keys of
    :mod:`kernels` (select, order, bin, chromosome) as uint64; ``group_of_gene`` and
    ``genomic_rank`` are the chromosome layout (empty for other orders); ``scbert_edges``
    the float32 class edges of ``binning.scbert_edges`` (empty for other bins).
    """
    n_rows, length = tokens.shape
    value_bits = values.view(np.int32)
    use_keep = len(keep) > 0
    key_select, key_order, key_bin, key_chromosome = keys[0], keys[1], keys[2], keys[3]
    width = 1
    for r in range(n_rows):
        width = max(width, indptr[r + 1] - indptr[r])
    n_groups = n_placed + 1
    capacity = max(width, size if select == _RESAMPLE else 0, n_groups)
    # Ranks are below 2**31 and items are places in a row: 32 bits halve the memory traffic.
    rank = np.empty(capacity, dtype=np.int32)
    item = np.empty(capacity, dtype=np.int32)
    spare_rank = np.empty(capacity, dtype=np.int32)
    spare_item = np.empty(capacity, dtype=np.int32)
    count = np.empty((_PASSES, _DIGITS), dtype=np.int32)
    chosen = np.zeros(width, dtype=np.bool_)
    # chromosome order: each placed group's position in this cell's random group order
    position = np.empty(n_groups, dtype=np.int64)
    group_rank = np.empty(n_groups, dtype=np.int32)
    group_item = np.empty(n_groups, dtype=np.int32)
    # scGPT bins: the cell's distinct expressed values in an open-addressing hash table whose
    # slots are stamped with their row (never cleared); a cell has few distinct values.
    table_bits = 1
    while (1 << table_bits) < 2 * width:
        table_bits += 1
    table_mask, table_shift = (1 << table_bits) - 1, np.uint64(64 - table_bits)
    slot_row = np.full(1 << table_bits, -1, dtype=np.int64)
    slot_value = np.empty(1 << table_bits, dtype=np.int32)
    slot_count = np.empty(1 << table_bits, dtype=np.int64)  # expressed values equal to it
    slot_below = np.empty(1 << table_bits, dtype=np.int64)  # expressed values below it
    slot_of = np.empty(width, dtype=np.int64)  # the slot of each place of the row
    distinct_value = np.empty(width, dtype=np.int32)
    distinct_slot = np.empty(width, dtype=np.int32)
    m_edges = n_bins - 2
    longest = 1

    for r in range(n_rows):
        start, n = indptr[r], indptr[r + 1] - indptr[r]
        m = 0
        for j in range(n):
            p = start + j
            if values[p] > 0 and (not use_keep or keep[indices[p]]):
                item[m] = j
                m += 1
        cell = np.uint64(cells[r])

        if bin_kind == 2:
            # How many of the cell's expressed values lie below / at each value: count the
            # distinct values, sort them, accumulate.
            d = 0
            for i in range(m):
                v = value_bits[start + item[i]]
                h = np.int64((np.uint64(v) * _GOLDEN) >> table_shift)
                while slot_row[h] == r and slot_value[h] != v:
                    h = (h + 1) & table_mask
                if slot_row[h] != r:
                    slot_row[h], slot_value[h], slot_count[h] = r, v, 0
                    distinct_value[d], distinct_slot[d] = v, h
                    d += 1
                slot_count[h] += 1
                slot_of[item[i]] = h
            _sort_by_rank(distinct_value, distinct_slot, d, spare_rank, spare_item, count)
            total = 0
            for i in range(d):
                slot_below[distinct_slot[i]] = total
                total += slot_count[distinct_slot[i]]

        listed = m
        if select == _RESAMPLE:
            # `size` inverse-CDF draws in ascending order: walk the row's cumulative weights.
            listed = size if m > 0 else 0
            if m > 0:
                total = 0
                for j in range(n):
                    total += weights[start + j]
                at, reached = 0, weights[start]
                for i in range(size):
                    offset = np.int64(np.floor(draw_u[r, i] * np.float64(total)))
                    while reached <= offset:
                        at += 1
                        reached += weights[start + at]
                    item[i] = at
        elif (select == _SAMPLE and order != _RANDOM or select == _WEIGHTED) and m > size:
            # Sample `size` genes (the smallest random or Efraimidis-Spirakis ranks), then
            # order them.
            if select == _SAMPLE:
                cell_key = _mix(cell * _GOLDEN + key_select)
                for i in range(m):
                    rank[i] = np.int64(_bits(cell_key, indices[start + item[i]]) >> _S34)
            else:
                for i in range(m):
                    rank[i] = select_bits[start + item[i]]
            _sort_by_rank(rank, item, m, spare_rank, spare_item, count)
            for i in range(size):
                chosen[item[i]] = True
            listed = 0
            for j in range(n):
                if chosen[j]:
                    chosen[j] = False
                    item[listed] = j
                    listed += 1
        k = listed if select == _RESAMPLE else min(size, m)

        if order == _CHROMOSOME:
            cell_key = _mix(cell * _GOLDEN + key_chromosome)
            for g in range(n_placed):
                group_rank[g] = np.int64(_bits(cell_key, g) >> _S34)
                group_item[g] = g
            _sort_by_rank(group_rank, group_item, n_placed, spare_rank, spare_item, count)
            for i in range(n_placed):
                position[group_item[i]] = i
            position[n_placed] = n_placed
        if order != _NONE and listed > 1:
            if order == _EXPRESSION:
                for i in range(listed):
                    rank[i] = _LAST - np.int64(order_bits[start + item[i]])
            elif order == _RANDOM:
                cell_key = _mix(cell * _GOLDEN + key_order)
                for i in range(listed):
                    rank[i] = np.int64(_bits(cell_key, indices[start + item[i]]) >> _S34)
            elif order == _GENE_INDEX:
                for i in range(listed):
                    rank[i] = np.int64(indices[start + item[i]])
            elif order == _GIVEN:
                for i in range(listed):
                    rank[i] = order_bits[start + item[i]]
            else:
                for i in range(listed):
                    gene = indices[start + item[i]]
                    rank[i] = (position[group_of_gene[gene]] << _RANK_BITS) + genomic_rank[gene]
            _sort_by_rank(rank, item, listed, spare_rank, spare_item, count)

        _put_special(tokens, expression, special, padding, bins, bin_kind > 0, r, 0, CLS)
        bin_cell_key = _mix(cell * _GOLDEN + key_bin)
        spread = float(max(n_expressed[r] - 1, 1))
        at, group = 1, -1
        for i in range(k):
            p = start + item[i]
            gene, value = indices[p], values[p]
            if order == _CHROMOSOME and group_of_gene[gene] != group:
                # close the previous chromosome group, open this gene's
                if group >= 0:
                    _put_special(tokens, expression, special, padding, bins, bin_kind > 0, r, at, CHROM_END)
                    at += 1
                group = group_of_gene[gene]
                _put_special(tokens, expression, special, padding, bins, bin_kind > 0, r, at,
                             N_SPECIAL + n_genes + group)
                at += 1
            tokens[r, at] = gene + N_SPECIAL
            expression[r, at] = value
            special[r, at] = False
            padding[r, at] = False
            if bin_kind == 1:
                b = 1
                for e in range(len(scbert_edges)):
                    if value >= scbert_edges[e]:
                        b += 1
                bins[r, at] = b
            elif bin_kind == 2:
                # binning.scgpt_bins, with the same float64 operations in the same order
                slot = slot_of[item[i]]
                left = np.floor((slot_below[slot] + slot_count[slot] - 1.0) * m_edges / spread)
                left += 1.0 if n_expressed[r] > 1 else m_edges + 1.0
                right = np.ceil(slot_below[slot] * float(m_edges) / spread)
                u = (np.float64(_bits(bin_cell_key, gene) >> _S11) + 0.5) * 2.0**-53
                bins[r, at] = np.int64(left - np.floor(u * (left - right)))
            at += 1
        if group >= 0:
            _put_special(tokens, expression, special, padding, bins, bin_kind > 0, r, at, CHROM_END)
            at += 1
        longest = max(longest, at)
        for c in range(at, length):
            tokens[r, c] = PAD
            expression[r, c] = 0.0
            special[r, c] = True
            padding[r, c] = True
            if bin_kind > 0:
                bins[r, c] = 0
    return longest

