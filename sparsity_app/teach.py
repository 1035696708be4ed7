"""Small worked examples for the Learn page (pure, no TVM)."""
from __future__ import annotations

import numpy as np

from .formats import BSR, to_bsr
from .pruning import prune
from .spec import Spec


def bsr_example(block: tuple[int, int], shape: tuple[int, int] = (8, 16), sparsity: float = 0.75,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray, BSR]:
    """(weight, mask, bsr) of a small random weight pruned with `block` at `sparsity`.

    weight: float32 [8, 16] rounded to one decimal so it prints; mask: bool, same shape.
    """
    w = np.round(np.random.default_rng(seed).standard_normal(shape), 1).astype(np.float32)
    mask = prune(w, Spec(method="block", block=block, sparsity=sparsity).resolve())
    return w, mask, to_bsr(w, mask, block)


PAPER_CLAIMS = (  # arXiv 2106.08846, BERT attention on CPU, structured block sparsity
    ("speedup_vs_torch_dense", 4.0, "BSR kernel vs PyTorch dense: about 4x"),
    ("speedup_vs_tvm_dense", 2.2, "BSR kernel vs dense TVM: about 2.2x"),
)
