"""Dense <-> block compressed sparse row (BSR), with the field's names.

BSR of a weight W [out, in] with blocks bs_r x bs_c:
- data: float32 [nnz_blocks, bs_r, bs_c], the stored blocks, row-major inside each block;
- indices: int32 [nnz_blocks], block-column index (in units of bs_c) of each stored block;
- indptr: int32 [out / bs_r + 1], block row i owns data[indptr[i]:indptr[i + 1]].
This is exactly `scipy.sparse.bsr_matrix`'s layout. A 1x1 BSR is CSR, which also has its own
class (`CSR`, no block axes), as does N:M (`NM`: fixed count per group, so no row pointers);
Which format a pattern's kernel reads is its kernel family's choice (kernels.families).
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class BSR:
    data: np.ndarray  # float32 [nnz_blocks, bs_r, bs_c]
    indices: np.ndarray  # int32 [nnz_blocks]
    indptr: np.ndarray  # int32 [out / bs_r + 1]
    shape: tuple[int, int]  # (out, in) of the dense weight

    @property
    def block(self) -> tuple[int, int]:
        return self.data.shape[1], self.data.shape[2]

    @property
    def nnz_blocks(self) -> int:
        return self.data.shape[0]

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.indices.nbytes + self.indptr.nbytes

    @property
    def density(self) -> float:
        """Fraction of W's entries stored (whole blocks, pruned zeros inside them included)."""
        return self.data.size / (self.shape[0] * self.shape[1])

    def to_dense(self) -> np.ndarray:
        """float32 [out, in]."""
        bs_r, bs_c = self.block
        out = np.zeros((self.shape[0] // bs_r, bs_r, self.shape[1] // bs_c, bs_c), np.float32)
        rows = np.repeat(np.arange(len(self.indptr) - 1), np.diff(self.indptr))
        out[rows, :, self.indices, :] = self.data
        return out.reshape(self.shape)


def to_bsr(weight: np.ndarray, mask: np.ndarray, block: tuple[int, int]) -> BSR:
    """Store the blocks of `weight * mask` that hold at least one kept weight.

    weight: float32 [out, in]; mask: bool [out, in]; block: (bs_r, bs_c) dividing (out, in).
    A kept block is stored whole (with its pruned entries as zeros), so a mask that is not
    aligned to the block costs storage and time, which is exactly what the tool should show.
    """
    out_f, in_f = weight.shape
    bs_r, bs_c = block
    tiles = (weight * mask).astype(np.float32).reshape(out_f // bs_r, bs_r, in_f // bs_c, bs_c)
    present = mask.reshape(out_f // bs_r, bs_r, in_f // bs_c, bs_c).any(axis=(1, 3))
    rows, cols = np.nonzero(present)  # row-major order: sorted by block row, then column
    indptr = np.zeros(out_f // bs_r + 1, np.int32)
    np.cumsum(present.sum(axis=1), out=indptr[1:])
    data = np.ascontiguousarray(tiles[rows, :, cols, :])
    return BSR(data=data, indices=cols.astype(np.int32), indptr=indptr, shape=(out_f, in_f))


@dataclasses.dataclass(frozen=True)
class CSR:
    """Compressed sparse row: W [out, in] as values float32 [nnz], indices int32 [nnz] (column of
    each value) and indptr int32 [out + 1] (row i owns values[indptr[i]:indptr[i + 1]]), as scipy."""

    values: np.ndarray
    indices: np.ndarray
    indptr: np.ndarray
    shape: tuple[int, int]

    @property
    def nnz(self) -> int:
        return self.values.shape[0]

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.indices.nbytes + self.indptr.nbytes

    @property
    def density(self) -> float:
        return self.nnz / (self.shape[0] * self.shape[1])

    def to_dense(self) -> np.ndarray:
        out = np.zeros(self.shape, np.float32)
        out[np.repeat(np.arange(self.shape[0]), np.diff(self.indptr)), self.indices] = self.values
        return out


def to_csr(weight: np.ndarray, mask: np.ndarray) -> CSR:
    """weight float32 [out, in], mask bool [out, in] -> CSR of the kept weights (zeros kept if masked in)."""
    rows, cols = np.nonzero(mask)
    indptr = np.zeros(weight.shape[0] + 1, np.int32)
    np.cumsum(mask.sum(axis=1), out=indptr[1:])
    return CSR(values=np.ascontiguousarray(weight[rows, cols], np.float32), indices=cols.astype(np.int32),
               indptr=indptr, shape=weight.shape)


@dataclasses.dataclass(frozen=True)
class NM:
    """N:M sparse: every group of M consecutive inputs of a row keeps exactly N weights, so no
    row pointers are needed. values: float32 [out, in / M * N], the kept weights group by group;
    offsets: uint8 [out, in / M * N], each value's position inside its group (0 <= offset < M)."""

    values: np.ndarray
    offsets: np.ndarray
    nm: tuple[int, int]
    shape: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.offsets.nbytes

    @property
    def density(self) -> float:
        return self.nm[0] / self.nm[1]

    def to_dense(self) -> np.ndarray:
        out_f, in_f = self.shape
        n, m = self.nm
        cols = (np.arange(self.values.shape[1]) // n * m)[None, :] + self.offsets
        out = np.zeros(self.shape, np.float32)
        np.put_along_axis(out, cols.astype(np.int64), self.values, axis=1)
        return out


def to_nm(weight: np.ndarray, mask: np.ndarray, nm: tuple[int, int]) -> NM:
    """weight float32 [out, in], mask bool [out, in] with exactly N kept per group of M inputs -> NM.

    Raises ValueError for a mask that is not N:M (e.g. from another pruning method).
    """
    n, m = nm
    out_f, in_f = weight.shape
    if not 1 <= n < m <= 256 or in_f % m:
        raise ValueError(f"N:M {n}:{m} does not fit a weight with {in_f} inputs")
    groups = mask.reshape(out_f, in_f // m, m)
    if not (groups.sum(axis=2) == n).all():
        raise ValueError(f"mask is not {n}:{m}: some group of {m} inputs does not keep exactly {n}")
    offsets = np.nonzero(groups)[2].reshape(out_f, -1)  # row-major nonzero: groups in order, offsets sorted
    cols = (np.arange(offsets.shape[1]) // n * m)[None, :] + offsets
    return NM(values=np.ascontiguousarray(np.take_along_axis(weight, cols, axis=1), np.float32),
              offsets=offsets.astype(np.uint8), nm=(n, m), shape=weight.shape)


def stacked_indptr(indptrs: list[np.ndarray], counts: list[int]) -> np.ndarray:
    """Row pointers int32 of compressed-row weights stacked by rows, given each one's indptr and stored
    entries (blocks for BSR): each next weight's pointers are offset by the entries stored before it."""
    offsets = np.cumsum([0] + counts[:-1])
    return np.concatenate([indptrs[0][:1]] + [p[1:] + o for p, o in zip(indptrs, offsets)]).astype(np.int32)
