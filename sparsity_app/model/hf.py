"""The Hugging Face half of the models: everything that needs torch and transformers.

Loading a model folder, sentence embeddings (mean pooling over the attention mask, then L2
normalisation: what every real-label metric reads), copies with other linear weights, and the
inputs each linear sees on a text. model.catalog reaches this module on first use only, so
listing layers, reading weights and resolving requests never import torch (~3 s).
"""
from __future__ import annotations

import copy
import re
from typing import Callable

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel
from transformers.utils import logging as hf_logging

from sparsity_app.core.errors import UserError
from sparsity_app.model.tokens import MAX_LENGTH, TOKENIZER_LOCK

_BATCH_TOKENS = 1024  # padded tokens per forward pass; bigger batches ran slower (3x at 8192) on 2 cores
_BATCH_MAX = 64  # ... and at most this many texts (single words: 64 x ~3 tokens)


def load_pretrained(path: str):
    """(model in eval mode, tokenizer) of a Hugging Face folder (config, safetensors weights, tokenizer)."""
    hf_logging.disable_progress_bar()
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


def synthetic_bert(layers: list, weight: Callable[[str], tuple[np.ndarray, np.ndarray | None]]):
    """A BERT-base BertModel whose linears (`layers`, LayerInfo) carry `weight(name)` = (W float32
    [out, in], bias float32 [out]); every other parameter is torch's seeded init."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = BertModel(BertConfig(num_hidden_layers=12, hidden_size=768, num_attention_heads=12,
                                     intermediate_size=3072), add_pooling_layer=False).eval()
    with torch.no_grad():
        for info in layers:
            w, b = weight(info.name)
            module = model.get_submodule(info.name)
            module.weight.copy_(torch.from_numpy(w))
            module.bias.copy_(torch.from_numpy(b))
    return model


def token_counts(tokenizer, texts: list[str], batch: int) -> list[int]:
    """Real tokens in the first 1, 2, ... batches of `texts` (cumulative; the last is the total), each
    text cut at 128 tokens."""
    counts: list[int] = []
    for start in range(0, len(texts), batch):
        with TOKENIZER_LOCK:
            enc = tokenizer(texts[start:start + batch], truncation=True, max_length=128)
        counts.append((counts[-1] if counts else 0) + sum(len(ids) for ids in enc["input_ids"]))
    return counts


def each_linear_input(shared, tokenizer, layers: list[str], texts: list[str], batch: int,
                      seen: Callable[[str, np.ndarray, np.ndarray], None]) -> None:
    """Run `texts` (batches of `batch`, cut at 128 tokens, padded) through a private copy of `shared`
    and call seen(layer, x, keep) for the input of every linear in `layers`: x float32 [batch, seq,
    in], keep bool [batch, seq] (False on padding), both NumPy. The hooks go on the copy: other
    callers' forwards stay unseen."""
    model = copy.deepcopy(shared)
    keep = None
    for name in layers:
        model.get_submodule(name).register_forward_hook(
            lambda _module, inputs, _output, name=name: seen(name, inputs[0].numpy(), keep))
    with torch.inference_mode():
        for start in range(0, len(texts), batch):
            with TOKENIZER_LOCK:
                enc = tokenizer(texts[start:start + batch], padding=True, truncation=True, max_length=128,
                                return_tensors="pt")
            keep = enc["attention_mask"].bool().numpy()
            model(**enc)


class _Seen(Exception):
    """Raised by the last hook a Gram pass needs: the rest of the forward is not run."""


def _grams(root, prefix: str, names: list[str], inputs, forward) -> dict[str, np.ndarray]:
    """layer -> X^T X, float64 [in, in], of the inputs the linears `names` (full paths; `root` is the
    module at `prefix`, "" for the whole model) see while forward(root, x) runs for each x of `inputs`,
    summed over every token. Each pass stops once the last of them (in module order) has seen its input."""
    if not names:
        return {}
    grams = {name: 0.0 for name in names}
    full = {sub: f"{prefix}.{sub}" if prefix else sub for sub, _ in root.named_modules()}
    last = [full[sub] for sub in full if full[sub] in grams][-1]

    def hook(name):
        def seen(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            grams[name] = grams[name] + (x.T @ x).numpy()
            if name == last:
                raise _Seen
        return seen

    handles = [root.get_submodule(sub).register_forward_pre_hook(hook(full[sub])) for sub in full if full[sub] in grams]
    try:
        with torch.inference_mode():
            for x in inputs:
                try:
                    forward(root, x)
                except _Seen:
                    pass
    finally:
        for handle in handles:
            handle.remove()
    return grams


def _id_batches(ids: np.ndarray, batch: int):
    return (torch.from_numpy(np.ascontiguousarray(ids[start:start + batch])) for start in range(0, len(ids), batch))


def input_grams(private, layers: list[str], ids: np.ndarray, batch: int = 32) -> dict[str, np.ndarray]:
    """layer -> X^T X, float64 [in, in], of the inputs each of `layers` (nn.Linear paths) sees on `ids`
    (int64 [n, seq], no padding), summed over every token. `private` is the caller's own copy (hooks go
    on it for the call and are removed after); each forward stops after the last of `layers`."""
    return _grams(private, "", layers, _id_batches(ids, batch), lambda model, x: model(input_ids=x))


def prune_in_order(private, stages: list[list[str]], wanted: list[list[str]], ids: np.ndarray,
                   prune_stage: Callable[[int, dict[str, np.ndarray]], dict[str, np.ndarray]], batch: int = 32) -> None:
    """Sequential pruning's forwards: for each stage in order, the Gram matrices X^T X (float64 [in, in],
    summed over every token of `ids`, int64 [n, seq], no padding) of the inputs its `wanted` linears see
    with every earlier stage's new weights in place; then `prune_stage(stage index, grams)` returns the
    stage's weights (layer -> float32 [out, in]), which are written into `private` (the caller's copy).

    Stages are runs of linears inside the encoder's blocks (`...layer.N.`). Each block's input is kept
    (float32 [n, seq, hidden]), so a stage runs only its own block, up to its last wanted linear, and a
    block runs once more when its stages are done to make the next block's input."""
    block_of = [re.match(r"^(.*\.layer\.\d+)\.", stage[0]) for stage in stages]
    if not all(block_of) or any(not name.startswith(b.group(1) + ".") for b, stage in zip(block_of, stages)
                                for name in stage):
        raise ValueError("sequential pruning needs every linear inside an encoder block (...layer.N.)")
    blocks = [b.group(1) for b in block_of]
    hidden: list[torch.Tensor] = []

    def keep_input(_module, args, kwargs):
        hidden.append(kwargs.get("hidden_states", args[0] if args else None))
        raise _Seen

    handle = private.get_submodule(blocks[0]).register_forward_pre_hook(keep_input, with_kwargs=True)
    try:
        with torch.inference_mode():
            for x in _id_batches(ids, batch):
                try:
                    private(input_ids=x)
                except _Seen:
                    pass
    finally:
        handle.remove()
    for i, names in enumerate(wanted):
        block = private.get_submodule(blocks[i])
        grams = _grams(block, blocks[i], names, hidden, lambda b, h: b(h))
        set_linear_weights(private, prune_stage(i, grams))
        if i + 1 == len(stages) or blocks[i + 1] != blocks[i]:  # the block is done: its output feeds the next
            with torch.inference_mode():
                hidden = [_first(block(h)) for h in hidden]


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def set_linear_weights(private, weights: dict[str, np.ndarray]) -> None:
    """Write `weights` (layer -> float32 [out, in]) into the named nn.Linear layers of `private`, the
    caller's own copy (masked_copy's; never a shared model)."""
    with torch.no_grad():
        for name, w in weights.items():
            private.get_submodule(name).weight.copy_(torch.from_numpy(np.asarray(w, dtype=np.float32)))


def masked_copy(hf_model, weights: dict[str, np.ndarray], outputs: dict | None = None):
    """A deep copy of `hf_model` whose named nn.Linear layers carry the given weights.

    weights: layer name (e.g. "encoder.layer.0.attention.self.query") -> float32 [out, in], the
    pruned weight (W * mask). Biases and every other layer are copied unchanged; `hf_model` is
    never touched. The copy is in eval mode with gradients off.
    outputs: layer name -> a function x float32 [tokens, in] -> float32 [tokens, out] (no bias) that
    computes the layer instead of its weights (an INT8 layer's quantized arithmetic); its bias is added.
    """
    for name, w in weights.items():
        try:
            module = hf_model.get_submodule(name)
        except AttributeError:
            raise UserError(f"unknown layer {name!r}; layers are nn.Linear paths such as "
                            f"encoder.layer.0.attention.self.query") from None
        if not isinstance(module, torch.nn.Linear):
            raise UserError(f"{name!r} is a {type(module).__name__}, not an nn.Linear")
        if tuple(np.shape(w)) != tuple(module.weight.shape):
            raise UserError(f"weight for {name} must be [out, in] = {list(module.weight.shape)}, got {list(np.shape(w))}")
    pruned = copy.deepcopy(hf_model).eval()
    set_linear_weights(pruned, weights)
    pruned.requires_grad_(False)
    for name, compute in (outputs or {}).items():
        pruned.get_submodule(name).register_forward_hook(_computed_by(compute))
    return pruned


def _computed_by(compute):
    """A forward hook that replaces an nn.Linear's output by compute(x) + bias."""
    def hook(module, inputs, output):
        x = inputs[0].detach().reshape(-1, module.in_features).numpy().astype(np.float32)
        y = torch.from_numpy(np.ascontiguousarray(compute(x), dtype=np.float32)).reshape(output.shape)
        return y + module.bias if module.bias is not None else y
    return hook


def embed(model, tokenizer, texts: tuple[str, ...] | list[str]) -> np.ndarray:
    """Sentence embeddings of `texts` by `model` (a BertModel in eval mode): float32 [len(texts), hidden].

    Mean pooling over the attention mask, then L2 normalisation. Texts are sorted by length and
    packed into batches of about _BATCH_TOKENS padded tokens, so little compute goes to padding.
    The model is only read (inference_mode); it is safe to call from several threads at once.
    """
    if model.training:
        raise UserError("the model is in training mode (dropout on): evaluate a copy in eval mode")
    texts = list(texts)
    with TOKENIZER_LOCK:
        ids = tokenizer(texts, truncation=True, max_length=MAX_LENGTH)["input_ids"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = np.zeros((len(texts), model.config.hidden_size), np.float32)
    with torch.inference_mode():
        for batch in _length_batches([len(i) for i in ids]):
            width = len(ids[batch[-1]])  # batches are sorted by length: the last is the longest
            input_ids = np.full((len(batch), width), pad, dtype=np.int64)
            mask = np.zeros((len(batch), width), dtype=np.int64)
            for row, i in enumerate(batch):
                input_ids[row, :len(ids[i])] = ids[i]
                mask[row, :len(ids[i])] = 1
            input_ids, mask = torch.from_numpy(input_ids), torch.from_numpy(mask)
            hidden = model(input_ids=input_ids, attention_mask=mask).last_hidden_state
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
            out[batch] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
    return out


def _length_batches(lengths: list[int]) -> list[list[int]]:
    """Indices grouped into batches, shortest first, each at most _BATCH_TOKENS padded tokens."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < _BATCH_MAX and (len(batches[-1]) + 1) * lengths[i] <= _BATCH_TOKENS:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def mean_pooled_cosine(student, teacher, ids: np.ndarray, batch: int = 32) -> float:
    """Mean cosine between two models' mean-pooled last hidden states on `ids` (int64 [n, seq], no
    padding): how alike two models embed the same inputs."""
    ids_t = torch.from_numpy(ids)

    def pooled(m):
        with torch.inference_mode():
            return torch.cat([m(input_ids=ids_t[i:i + batch]).last_hidden_state.mean(1)
                              for i in range(0, len(ids_t), batch)])

    return float(torch.nn.functional.cosine_similarity(pooled(student), pooled(teacher)).mean())
