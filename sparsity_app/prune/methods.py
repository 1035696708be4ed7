"""Pruning methods: each turns a weight [out, in] into a boolean keep-mask of the same shape.

Scoring (which weights matter) is kept apart from the mask's shape (which pattern is allowed):
`_block_scores` scores bs_r x bs_c tiles, `_keep_top` keeps the best whole tiles, `_nm_mask` keeps
the best N of every M consecutive weights along the input dimension.

Every mask function has the signature of `magnitude`: (weight, spec, input_norms). input_norms is
float64 [in], the L2 norm of each input feature over the layer's calibration tokens (`input_norms`;
the engine measures them on training text, `Model.pruning_input_norms`), for the activation-aware
methods (`wanda`); the others ignore it. Adding a method is one function plus one `Method` line in
`METHODS`, which says which fields of a Spec it reads: resolving a request (runs.resolve), the
CLI's choices and the app's selectors all read the registry.

A method may also reconstruct: move the weights it keeps to make up for those it drops
(`Method.reconstruct`, SparseGPT: prune.sparsegpt.prune). Its one-shot result is then new kept
weights, not W * mask, from model.pruned, which hands it the Gram matrix X^T X of the layer's
calibration inputs; its `mask` function is what training re-masks with (the same pattern by
magnitude: starting from the reconstructed weights, whose dropped entries are zero, the first masks
are its own).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from sparsity_app.core.errors import UserError
from sparsity_app.core.requests import Spec
from sparsity_app.prune import sparsegpt

MaskFn = Callable[[np.ndarray, Spec, "np.ndarray | None"], np.ndarray]
# (weight float32 [out, in], gram float64 [in, in] = X^T X of the calibration inputs, spec, damp) -> (keep-mask
# bool [out, in], new weights float32 [out, in], zero where dropped)
ReconstructFn = Callable[[np.ndarray, np.ndarray, Spec, float], "tuple[np.ndarray, np.ndarray]"]


@dataclasses.dataclass(frozen=True)
class Method:
    """A pruning method: its mask function and which fields of a Spec it reads (the rest are
    canonicalised away when a request is resolved, so they never split the cache)."""

    mask: MaskFn  # (weight float32 [out, in], spec, input_norms float64 [in] | None) -> bool [out, in]
    label: str  # one line for a reader: what it keeps
    takes_block: bool = False  # prunes whole bs_r x bs_c blocks (else 1x1)
    takes_nm: bool = False  # may follow an N:M pattern instead of a sparsity
    needs_nm: bool = False  # follows an N:M pattern only
    takes_norm: bool = False  # scores a block by its l1 or l2 norm
    takes_seed: bool = False  # draws at random from Spec.seed
    unstructured: bool = False  # scores single weights (1x1) itself: a plain sparsity keeps this method
    activation_aware: bool = False  # reads the layer's input norms (calibration activations)
    reconstruct: ReconstructFn | None = None  # one-shot, it returns new kept weights (model.pruned), not W * mask

    @property
    def reconstructs(self) -> bool:
        return self.reconstruct is not None


def _block_scores(weight: np.ndarray, bs_r: int, bs_c: int, norm: str) -> np.ndarray:
    """Score of each tile: float64 [out / bs_r, in / bs_c], the tile's L1 or L2 norm."""
    out_f, in_f = weight.shape
    tiles = np.abs(weight.astype(np.float64)).reshape(out_f // bs_r, bs_r, in_f // bs_c, bs_c)
    if norm == "l1":
        return tiles.sum(axis=(1, 3))
    return np.sqrt((tiles**2).sum(axis=(1, 3)))


def _keep_top(scores: np.ndarray, sparsity: float) -> np.ndarray:
    """Keep-mask of the grid of `scores`: drops the round(sparsity * n) lowest-scoring cells.

    Rounding to whole cells keeps the achieved sparsity within half a block of the target.
    Ties are broken by position (stable sort), so the result is deterministic.
    """
    flat = scores.ravel()
    drop = int(round(sparsity * flat.size))
    keep = np.ones(flat.size, dtype=bool)
    keep[np.argsort(flat, kind="stable")[:drop]] = False
    return keep.reshape(scores.shape)


def _expand(block_mask: np.ndarray, bs_r: int, bs_c: int) -> np.ndarray:
    """Tile mask [out / bs_r, in / bs_c] -> element mask [out, in]."""
    return np.repeat(np.repeat(block_mask, bs_r, axis=0), bs_c, axis=1)


def _nm_mask(scores: np.ndarray, n: int, m: int) -> np.ndarray:
    """Keep the n highest scores of every m consecutive entries along the input dimension."""
    out_f, in_f = scores.shape
    groups = scores.reshape(out_f, in_f // m, m)
    order = np.argsort(-groups, axis=-1, kind="stable")
    keep = np.zeros_like(groups, dtype=bool)
    np.put_along_axis(keep, order[..., :n], True, axis=-1)
    return keep.reshape(out_f, in_f)


def input_norms(x: np.ndarray) -> np.ndarray:
    """||X_j||_2 over the tokens: float64 [in] from calibration inputs x float32 [tokens, in]."""
    return np.sqrt((x.astype(np.float64) ** 2).sum(axis=0))


def _keep_top_per_row(scores: np.ndarray, sparsity: float) -> np.ndarray:
    """Keep-mask of `scores` [rows, cols] dropping round(sparsity * cols) lowest of every row (stable)."""
    drop = int(round(sparsity * scores.shape[1]))
    order = np.argsort(scores, axis=1, kind="stable")
    keep = np.ones(scores.shape, bool)
    np.put_along_axis(keep, order[:, :drop], False, axis=1)
    return keep


def magnitude(weight: np.ndarray, spec: Spec, input_norms: np.ndarray | None = None) -> np.ndarray:
    """Unstructured: drop the smallest |w| (a 1x1 block)."""
    return _keep_top(np.abs(weight), spec.sparsity)


def block(weight: np.ndarray, spec: Spec, input_norms: np.ndarray | None = None) -> np.ndarray:
    """Whole bs_r x bs_c tiles, ranked by their L1 or L2 norm."""
    bs_r, bs_c = spec.block
    return _expand(_keep_top(_block_scores(weight, bs_r, bs_c, spec.norm), spec.sparsity), bs_r, bs_c)


def nm(weight: np.ndarray, spec: Spec, input_norms: np.ndarray | None = None) -> np.ndarray:
    """N:M: the N largest |w| of every M consecutive weights along the input dimension."""
    n, m = spec.nm
    return _nm_mask(np.abs(weight), n, m)


def random(weight: np.ndarray, spec: Spec, input_norms: np.ndarray | None = None) -> np.ndarray:
    """The naive baseline: the same pattern as `nm` (if N:M is set) or `block`, chosen at random."""
    scores = np.random.default_rng(spec.seed).random(weight.shape)
    if spec.nm is not None:
        return _nm_mask(scores, *spec.nm)
    bs_r, bs_c = spec.block
    tile_scores = scores[::bs_r, ::bs_c]  # one random score per tile
    return _expand(_keep_top(tile_scores, spec.sparsity), bs_r, bs_c)


def pattern_magnitude(weight: np.ndarray, spec: Spec, input_norms: np.ndarray | None = None) -> np.ndarray:
    """The spec's pattern (N:M, or bs_r x bs_c blocks by their L2 norm, 1x1 = unstructured) by |w|."""
    return nm(weight, spec) if spec.nm is not None else block(weight, spec)


def wanda(weight: np.ndarray, spec: Spec, input_norms: np.ndarray | None = None) -> np.ndarray:
    """Activation-aware (Sun et al. 2023, "Wanda"): score |W_ij| * ||X_j||, so a small weight on a
    loud input outranks a large weight on a quiet one. Unstructured (1x1): compared within each
    output row; bs_r x bs_c blocks: the block's L1/L2 norm of scores, compared within each block row;
    N:M: within each group of M."""
    if input_norms is None:
        raise ValueError("wanda needs the layer's input norms (methods.input_norms of its calibration inputs)")
    scores = np.abs(weight.astype(np.float64)) * np.asarray(input_norms, np.float64)[None, :]
    if spec.nm is not None:
        return _nm_mask(scores, *spec.nm)
    bs_r, bs_c = spec.block
    tiles = _block_scores(scores, bs_r, bs_c, spec.norm) if (bs_r, bs_c) != (1, 1) else scores
    return _expand(_keep_top_per_row(tiles, spec.sparsity), bs_r, bs_c)


METHODS: dict[str, Method] = {
    "magnitude": Method(magnitude, "unstructured: the smallest |w| go", unstructured=True),
    "block": Method(block, "whole blocks, ranked by their norm", takes_block=True, takes_norm=True),
    "nm": Method(nm, "N:M: the N largest of every M inputs", needs_nm=True),
    "random": Method(random, "a random pattern of the same shape (the naive baseline)", takes_block=True,
                     takes_nm=True, takes_seed=True),
    "wanda": Method(wanda, "activation-aware: |w| times its input's norm (Sun et al. 2023)", takes_block=True,
                    takes_nm=True, takes_norm=True, activation_aware=True, unstructured=True),
    "sparsegpt": Method(pattern_magnitude, "second-order: drops what the layer's inputs miss least, and "
                        "updates the kept weights to make up for it (Frantar & Alistarh 2023)", takes_block=True,
                        takes_nm=True, takes_seed=True, unstructured=True, reconstruct=sparsegpt.prune),
}
ACTIVATION_AWARE = frozenset(name for name, m in METHODS.items() if m.activation_aware)  # read input_norms


def prune(weight: np.ndarray, spec: Spec, input_norms: np.ndarray | None = None) -> np.ndarray:
    """Keep-mask, bool [out, in], for `weight` float32 [out, in] under `spec` (already validated).

    input_norms: float64 [in] (see `input_norms`), required by the ACTIVATION_AWARE methods. For a
    method that reconstructs, this is only the mask training re-masks with: its one-shot result
    (mask and new weights) is model.pruned's.
    """
    try:
        method = METHODS[spec.method]
    except KeyError:
        raise UserError(f"unknown pruning method {spec.method!r}; valid methods: {', '.join(METHODS)}") from None
    mask = method.mask(weight, spec, input_norms)
    assert mask.shape == weight.shape and mask.dtype == bool
    return mask
