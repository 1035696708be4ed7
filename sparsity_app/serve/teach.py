"""Small worked examples for the Learn page (pure, no TVM)."""
from __future__ import annotations

import numpy as np

from sparsity_app.core.requests import Spec
from sparsity_app.prune.formats import BSR, to_bsr
from sparsity_app.prune.methods import prune
from sparsity_app.runs import resolve


def bsr_example(block: tuple[int, int], shape: tuple[int, int] = (8, 16), sparsity: float = 0.75,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray, BSR]:
    """(weight, mask, bsr) of a small random weight pruned with `block` at `sparsity`.

    weight: float32 [8, 16] rounded to one decimal so it prints; mask: bool, same shape.
    """
    w = np.round(np.random.default_rng(seed).standard_normal(shape), 1).astype(np.float32)
    mask = prune(w, resolve.spec(Spec(method="block", block=block, sparsity=sparsity)))
    return w, mask, to_bsr(w, mask, block)


def weight_table(weight: np.ndarray, mask: np.ndarray) -> list[list[str]]:
    """The weight as strings for reading: one decimal where kept, blank where pruned."""
    return [[f"{v:.1f}" if keep else "" for v, keep in zip(row, keep_row)] for row, keep_row in zip(weight, mask)]


def rounded(values: np.ndarray, decimals: int = 2) -> list:
    """float32 values as nested lists of plain decimals (float32 -1.3 prints as -1.3, not -1.2999999523)."""
    return np.round(values.astype(np.float64), decimals).tolist()
