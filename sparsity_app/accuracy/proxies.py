"""Accuracy proxies: how much a keep-mask changes the layer and the model, on real data.

A proxy is one `Proxy` in PROXIES: its label, its direction (higher is better) and its score, a
function of the pruned layer (`Case`: the dense weight W float32 [out, in], the keep-mask, the pruned
weight (W * mask, or a reconstructing method's new kept weights), the bias and the layer's real
calibration inputs). Adding a proxy is one function plus one line in PROXIES; a layer
run scores every registered proxy, and the pages, charts and tables list them from the registry.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import numpy as np

from sparsity_app.model import data
from sparsity_app.model.catalog import MiniLM, get_model


def retained_energy(weight: np.ndarray, mask: np.ndarray) -> float:
    """||W * mask||^2 / ||W||^2: the share of the dense weight's squared mass the mask keeps (needs no
    data; for a reconstructing method, of the weights before they moved)."""
    w = weight.astype(np.float64)
    total = float((w * w).sum())
    return float((w * w * mask).sum() / total) if total else 1.0


def output_error(x: np.ndarray, weight: np.ndarray, pruned: np.ndarray, bias: np.ndarray | None,
                 layer_output: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[float, float]:
    """(relative Frobenius error, mean cosine per token) of the pruned vs the dense layer output.

    x: float32 [tokens, in], the layer's real calibration inputs. Outputs include the bias, as in
    the model. layer_output: the pruned layer as its kernel computes it (x -> float32 [tokens, out],
    no bias; INT8 quantizes), None = X @ pruned^T.
    """
    b = 0.0 if bias is None else bias.astype(np.float64)
    x64 = x.astype(np.float64)
    y = x64 @ weight.astype(np.float64).T + b
    yp = (x64 @ pruned.astype(np.float64).T if layer_output is None else layer_output(x).astype(np.float64)) + b
    norm = np.linalg.norm(y)
    rel = float(np.linalg.norm(yp - y) / norm) if norm else 0.0
    dots = (y * yp).sum(axis=1)
    norms = np.linalg.norm(y, axis=1) * np.linalg.norm(yp, axis=1)
    cos = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), np.where(dots == 0, 1.0, 0.0))
    return rel, float(np.clip(cos, -1.0, 1.0).mean())


def _eval_texts() -> list[str]:
    return list(data.lee_documents()) + [s for s, _ in data.polarity_sentences()]


@functools.lru_cache(maxsize=2)
def _dense_embeddings(model_name: str) -> np.ndarray:
    return get_model(model_name).embed(_eval_texts())


def lee_pearson(lee_embeddings: np.ndarray) -> float:
    """Pearson correlation of embedding cosine similarity with the human Lee scores (50 documents)."""
    sim = lee_embeddings @ lee_embeddings.T
    iu = np.triu_indices(len(sim), 1)
    return float(np.corrcoef(sim[iu], data.lee_similarity()[iu])[0, 1])


def model_level(model_name: str, layer: str, pruned: np.ndarray,
                layer_output: Callable[[np.ndarray], np.ndarray] | None = None) -> dict[str, float | None]:
    """That one layer pruned inside the full model, on the Lee documents and polarity sentences
    (computed by `layer_output` if given, as in `output_error`).

    embedding_cosine: mean cosine of pruned vs dense sentence embeddings (1 = unchanged);
    lee_pearson: document-similarity correlation with human scores (dense MiniLM: 0.656).
    Models without real weights give None for both.
    """
    model = get_model(model_name)
    if not isinstance(model, MiniLM):
        return {"embedding_cosine": None, "lee_pearson": None}
    dense = _dense_embeddings(model_name)
    emb = model.embed(_eval_texts(), weights={layer: pruned}, outputs={layer: layer_output} if layer_output else None)
    n_lee = len(data.lee_documents())
    return {
        "embedding_cosine": float(np.clip((dense * emb).sum(axis=1), -1, 1).mean()),
        "lee_pearson": lee_pearson(emb[:n_lee]),
    }


def dense_lee_pearson(model_name: str) -> float | None:
    model = get_model(model_name)
    if not isinstance(model, MiniLM):
        return None
    return lee_pearson(_dense_embeddings(model_name)[: len(data.lee_documents())])


# ---- the registry ---------------------------------------------------------------------------------

@dataclasses.dataclass
class Case:
    """One pruned layer, as every proxy reads it; shared computations are done once, on first use."""

    model: str  # catalog name
    layer: str  # dotted name of the nn.Linear
    weight: np.ndarray  # float32 [out, in], dense
    mask: np.ndarray  # bool [out, in], True = kept
    pruned: np.ndarray  # float32 [out, in]: zero where mask drops; W * mask unless the method reconstructs
    bias: np.ndarray | None  # float32 [out]
    x: np.ndarray  # float32 [tokens, in]: the layer's real calibration inputs (every one)
    # the layer as its kernel computes it: x float32 [tokens, in] -> float32 [tokens, out], no bias (INT8:
    # quantized weights and activations, kernels.families.Family.reference); None = X @ pruned^T
    layer_output: Callable[[np.ndarray], np.ndarray] | None = None

    @functools.cached_property
    def output_error(self) -> tuple[float, float]:
        return output_error(self.x, self.weight, self.pruned, self.bias, self.layer_output)

    @functools.cached_property
    def model_level(self) -> dict[str, float | None]:
        return model_level(self.model, self.layer, self.pruned, self.layer_output)


@dataclasses.dataclass(frozen=True)
class Proxy:
    label: str  # what a reader sees (tables, charts, pages)
    higher_is_better: bool
    score: Callable[[Case], float | None]  # None: not defined here (e.g. a model-level proxy of random weights)


PROXIES: dict[str, Proxy] = {
    "output_cosine": Proxy("layer output cosine", True, lambda c: c.output_error[1]),
    "retained_energy": Proxy("retained weight energy", True, lambda c: retained_energy(c.weight, c.mask)),
    "lee_pearson": Proxy("Lee similarity Pearson (model)", True, lambda c: c.model_level["lee_pearson"]),
    "embedding_cosine": Proxy("sentence embedding cosine (model)", True, lambda c: c.model_level["embedding_cosine"]),
    "output_rel_error": Proxy("layer output relative error", False, lambda c: c.output_error[0]),
}


def score(case: Case) -> dict[str, float | None]:
    """Every registered proxy of the case, by name."""
    return {name: proxy.score(case) for name, proxy in PROXIES.items()}
