"""One-shot pruning of a catalog model's layers: masks and pruned weights (the shared weights are only read).

specs: layer -> its resolved Spec, or None for a layer left dense (`runs.resolve.plan`).
"""
from __future__ import annotations

import numpy as np

from sparsity_app.core.requests import Spec
from sparsity_app.model.catalog import get_model
from sparsity_app.prune.methods import METHODS, prune


def layer_input_norms(spec: Spec) -> np.ndarray | None:
    """The input norms an activation-aware method scores with (None for the others): float64 [in],
    measured on training text that no metric scores (`Model.pruning_input_norms`), never on the
    calibration set the proxies and metrics use, and independent of the timed token count."""
    return get_model(spec.model).pruning_input_norms(spec.layer) if METHODS[spec.method].activation_aware else None


def mask_of(spec: Spec) -> np.ndarray:
    """The keep-mask, bool [out, in], of the resolved spec's layer (pruning only: no TVM)."""
    weight, _ = get_model(spec.model).weight(spec.layer)
    return prune(weight, spec, layer_input_norms(spec))


def plan_masks(model_name: str, specs: dict[str, Spec | None]) -> dict[str, np.ndarray]:
    """layer -> its one-shot mask, bool [out, in] (True = kept; all True for a layer left dense).

    Deterministic for a plan: the same masks every call.
    """
    model = get_model(model_name)
    shapes = {info.name: info.shape for info in model.layers()}
    return {name: np.ones(shapes[name], bool) if spec is None else
            prune(model.weight(name)[0], spec, layer_input_norms(spec)) for name, spec in specs.items()}


def pruned_weights(model_name: str, specs: dict[str, Spec | None]
                   ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(masks, pruned weights) of every layer in specs, one-shot.

    masks: layer -> bool [out, in] (True = kept); weights: layer -> float32 [out, in] = W * mask.
    """
    model = get_model(model_name)
    masks = plan_masks(model_name, specs)
    return masks, {name: model.weight(name)[0] * masks[name] for name in specs}
