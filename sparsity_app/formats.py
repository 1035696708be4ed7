"""Dense <-> block compressed sparse row (BSR), with the field's names.

BSR of a weight W [out, in] with blocks bs_r x bs_c:
- data: float32 [nnz_blocks, bs_r, bs_c], the stored blocks, row-major inside each block;
- indices: int32 [nnz_blocks], block-column index (in units of bs_c) of each stored block;
- indptr: int32 [out / bs_r + 1], block row i owns data[indptr[i]:indptr[i + 1]].
This is exactly `scipy.sparse.bsr_matrix`'s layout. A 1x1 BSR is CSR.
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
