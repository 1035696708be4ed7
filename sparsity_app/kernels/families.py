"""The sparse kernel families: name -> everything the engine needs of one (`Family`).

Adding a kernel family is one module (its Knobs, its Kernel class, default_knobs, candidates,
variants) plus one line in FAMILIES; the tuner, the layer runner and the whole-model graph ask
the registry, never the module.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from sparsity_app.kernels import bsr, csr, nm


@dataclasses.dataclass(frozen=True)
class Family:
    knobs: type  # frozen dataclass of schedule knobs
    kernel: type  # kernels.Kernel subclass: kernel(weight_format, x, knobs, n_parts=)
    default: Callable  # (tokens, weight_format) -> knobs: the untuned schedule
    candidates: Callable  # (tokens, weight_format) -> [knobs]: first round
    variants: Callable  # (knobs, weight_format) -> [knobs]: second round, around a winner


FAMILIES: dict[str, Family] = {
    "bsr": Family(bsr.BSRKnobs, bsr.TVMBSR, bsr.default_knobs, bsr.candidates, bsr.variants),
    "csr": Family(csr.CSRKnobs, csr.TVMCSR, csr.default_knobs, csr.candidates, csr.variants),
    "nm": Family(nm.NMKnobs, nm.TVMNM, nm.default_knobs, nm.candidates, nm.variants),
}
