"""The sparse kernel families: name -> everything the engine needs of one (`Family`).

A family says which pruned layers it serves, stores their kept weights in its format, packs them for
its kernel (the compiled source and the arguments in order, `kernels.Packed`), stacks several weights
into one (Q, K and V as one call in the whole-model graph) and offers the tuner its schedules. The
tuner, the layer runner and the whole-model graph ask the registry, never a family's module: adding a
family is one module plus one line in FAMILIES (the first family that serves a Spec takes it).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from sparsity_app.core.requests import Spec
from sparsity_app.kernels import Kernel, Packed, bsr, csr, int8, nm
from sparsity_app.prune import formats, quantize


@dataclasses.dataclass(frozen=True)
class Family:
    title: str  # the format as a reader names it, e.g. "BSR"
    serves: Callable[[Spec], bool]  # whether this family's kernel runs a layer pruned by the (resolved) spec
    to_format: Callable[[np.ndarray, np.ndarray, Spec], object]  # (weight float32 [out, in], keep-mask, spec) -> format
    knobs: type  # frozen dataclass of schedule knobs
    pack: Callable[..., Packed]  # (format, tokens, knobs, n_parts=None) -> Packed: source and arguments
    stack_rows: Callable[[list], object | None]  # formats of one input size -> one format stacked by rows, or None
    default: Callable  # (tokens, format) -> knobs: the untuned schedule
    candidates: Callable  # (tokens, format) -> [knobs]: the tuner's first round
    variants: Callable  # (knobs, format) -> [knobs]: its second round, around a winner
    # (format, x float32 [tokens, in]) -> Y [tokens, out], the NumPy reference of the kernel's own arithmetic
    # (INT8: the quantized one, to the bit); None: X @ W^T in float64 of the pruned float32 weights
    reference: Callable[[object, np.ndarray], np.ndarray] | None = None

    def kernel(self, weight, x: np.ndarray, knobs=None, n_parts: int | None = None) -> Kernel:
        """The compiled kernel of `weight` (this family's format) bound to x float32 [tokens, in]."""
        tokens = x.shape[0]
        return Kernel(self.pack(weight, tokens, knobs or self.default(tokens, weight), n_parts)).bind(x)


def _int8_reference(weight, x: np.ndarray) -> np.ndarray:
    return quantize.int8_linear(x, weight.rows(), int8.host_dot())


FAMILIES: dict[str, Family] = {
    "bsr_int8": Family("BSR INT8", lambda s: s.precision == "int8",
                       lambda w, m, s: quantize.to_quantized_bsr(w, m, s.block), int8.Int8Knobs, int8.pack,
                       int8.stack_rows, int8.default_knobs, int8.candidates, int8.variants, _int8_reference),
    "nm": Family("N:M", lambda s: s.nm is not None, lambda w, m, s: formats.to_nm(w, m, s.nm), nm.NMKnobs, nm.pack,
                 nm.stack_rows, nm.default_knobs, nm.candidates, nm.variants),
    "csr": Family("CSR", lambda s: s.block == (1, 1), lambda w, m, s: formats.to_csr(w, m), csr.CSRKnobs, csr.pack,
                  csr.stack_rows, csr.default_knobs, csr.candidates, csr.variants),
    "bsr": Family("BSR", lambda s: True, lambda w, m, s: formats.to_bsr(w, m, s.block), bsr.BSRKnobs, bsr.pack,
                  bsr.stack_rows, bsr.default_knobs, bsr.candidates, bsr.variants),
}


def family_of(spec: Spec) -> str:
    """The name of the first registered family that serves the resolved spec."""
    return next(name for name, family in FAMILIES.items() if family.serves(spec))


def sparse_format(weight: np.ndarray, mask: np.ndarray, spec: Spec) -> tuple[str, object]:
    """(family name, the kept weights in its format) of a layer pruned by the resolved spec.

    weight: float32 [out, in]; mask: bool [out, in], True = kept.
    """
    name = family_of(spec)
    return name, FAMILIES[name].to_format(weight, mask, spec)
