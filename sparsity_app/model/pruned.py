"""One-shot pruning of a catalog model's layers: masks and pruned weights (the shared weights are only read).

specs: layer -> its resolved Spec, or None for a layer left dense (`runs.resolve.plan`).

Most methods only choose a mask, and the pruned weight is W * mask. A method that reconstructs
(`Method.reconstruct`: sparsegpt) returns new kept weights, computed from the inputs the layer sees
on a calibration draw of training text (`corpus.calibration_draw(spec.seed, SPARSEGPT_SAMPLES)`):
- one layer alone (layer mode, sensitivity): the dense model's inputs;
- a whole plan: layer after layer in the model's order, each on the inputs produced by the layers
  before it as already pruned (SparseGPT's sequential protocol); the linears that read one input
  (Q, K and V) are pruned together.
"""
from __future__ import annotations

import functools
import re
from typing import Callable

import numpy as np

from sparsity_app.core.requests import Spec
from sparsity_app.model import corpus
from sparsity_app.model.catalog import get_model, hf
from sparsity_app.prune.methods import METHODS, prune

# A reconstructing method's knobs (SparseGPT's), chosen by fidelity (`bench-oneshot --probe-*`), never by a label.
SPARSEGPT_SAMPLES = 512  # calibration sequences of 128 tokens (~65k tokens)
SPARSEGPT_DAMP = 0.001  # lambda, as a fraction of the Hessian's mean diagonal (the paper: 0.01)


def reconstructs(spec: Spec | None) -> bool:
    return spec is not None and METHODS[spec.method].reconstructs


def layer_input_norms(spec: Spec) -> np.ndarray | None:
    """The input norms an activation-aware method scores with (None for the others): float64 [in],
    measured on training text that no metric scores (`Model.pruning_input_norms`), never on the
    calibration set the proxies and metrics use, and independent of the timed token count."""
    return get_model(spec.model).pruning_input_norms(spec.layer) if METHODS[spec.method].activation_aware else None


def pruned_layer(spec: Spec, samples: int = SPARSEGPT_SAMPLES, damp: float = SPARSEGPT_DAMP
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(keep-mask bool [out, in], pruned weight float32 [out, in]) of the resolved spec's layer pruned
    alone in the dense model (no TVM). samples, damp: a reconstructing method's knobs (`bench-oneshot --probe`)."""
    weight, _ = get_model(spec.model).weight(spec.layer)
    if reconstructs(spec):
        return METHODS[spec.method].reconstruct(weight, _dense_gram(spec.model, spec.layer, spec.seed, samples), spec,
                                                damp)
    mask = prune(weight, spec, layer_input_norms(spec))
    return mask, weight * mask


def mask_of(spec: Spec) -> np.ndarray:
    """The keep-mask, bool [out, in], of the resolved spec's layer (pruning only: no TVM)."""
    return pruned_layer(spec)[0]


def pruned_weights(model_name: str, specs: dict[str, Spec | None], progress: Callable[[str], None] | None = None,
                   samples: int = SPARSEGPT_SAMPLES, damp: float = SPARSEGPT_DAMP
                   ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(masks, pruned weights) of every layer in specs, one-shot. Deterministic for a plan.

    masks: layer -> bool [out, in] (True = kept; all True for a layer left dense); weights: layer ->
    float32 [out, in], zero where the mask drops (W * mask, or a reconstructing method's new weights).
    progress: called with one line per reconstructed stage (the calibration forwards take seconds).
    """
    model = get_model(model_name)
    masks, weights = {}, {}

    def prune_stage(stage: list[str], grams: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name in stage:
            spec, weight = specs[name], model.weight(name)[0]
            if spec is None:
                masks[name], weights[name] = np.ones(weight.shape, bool), weight
            elif reconstructs(spec):
                masks[name], weights[name] = METHODS[spec.method].reconstruct(weight, grams[name], spec, damp)
            else:
                masks[name] = prune(weight, spec, layer_input_norms(spec))
                weights[name] = weight * masks[name]
        return {name: weights[name] for name in stage}

    draws = {spec.seed for spec in specs.values() if reconstructs(spec)}
    if not draws:
        prune_stage(list(specs), {})
        return masks, weights
    if len(draws) > 1:  # a plan has one seed; overrides never set it
        raise ValueError(f"one calibration draw per plan, got {sorted(draws)}")
    stages = _stages(list(specs))
    wanted = [[n for n in stage if reconstructs(specs[n])] for stage in stages]

    def reconstruct(i: int, grams: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if progress is not None and wanted[i]:
            progress(f"{specs[wanted[i][0]].method}: {', '.join(wanted[i])} on the inputs of the layers before, pruned "
                     f"(stage {i + 1} of {len(stages)})")
        return prune_stage(stages[i], grams)

    hf().prune_in_order(model.pruned_copy({}), stages, wanted, corpus.calibration_draw(draws.pop(), samples),
                        reconstruct)
    return masks, weights


def _stages(layers: list[str]) -> list[list[str]]:
    """The layers (in the model's order) as runs of consecutive linears under one parent module: those
    read one input (a BERT layer's Q, K and V under attention.self), so they are pruned together."""
    stages: list[list[str]] = []
    for name in layers:
        parent = re.sub(r"\.[^.]+$", "", name)
        if stages and re.sub(r"\.[^.]+$", "", stages[-1][-1]) == parent:
            stages[-1].append(name)
        else:
            stages.append([name])
    return stages


@functools.lru_cache(maxsize=8)
def _dense_gram(model_name: str, layer: str, seed: int, samples: int) -> np.ndarray:
    """X^T X, float64 [in, in], of the layer's inputs in the dense model on calibration draw `seed`
    (read-only: a sensitivity sweep prunes one layer at many sparsities)."""
    model = get_model(model_name)
    gram = hf().input_grams(model.pruned_copy({}), [layer], corpus.calibration_draw(seed, samples))[layer]
    gram.setflags(write=False)
    return gram
