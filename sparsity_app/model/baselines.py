"""Whole-model dense peers: the encoder as PyTorch eager and as ONNX Runtime, callable for timing.

Each builder returns a zero-argument callable over fixed, preallocated inputs (`example_inputs`:
input_ids and attention_mask, int64 [batch, seq], real token ids), ready for `timing.measure`.
The output of every callable is last_hidden_state, float32 [batch, seq, hidden].

The model (a BertModel in eval mode, dense or a `model.hf.masked_copy`) is only read: the ONNX
export works on a deep copy, since the exporter switches the module it is given between train
and eval mode, and a wrapper left in train mode switched the shared model to train (dropout on).
PyTorch's thread count is the caller's (`kernels.set_threads` / `torch.set_num_threads`); ONNX
Runtime's is the `threads` argument.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import tempfile
import warnings
from typing import Callable

import numpy as np
import onnxruntime as ort
import torch

from sparsity_app.core.errors import UserError
from sparsity_app.core.requests import default_threads
from sparsity_app.model import data
from sparsity_app.model.catalog import get_model
from sparsity_app.model.tokens import TOKENIZER_LOCK

MAX_REL_ERROR = 1e-4  # ||ort - eager||_F / ||eager||_F allowed before a peer is refused


def _check(model, batch: int, seq: int, threads: int | None = None) -> None:
    """One-line errors for a request no peer can serve (before any export or allocation)."""
    if model.training:
        raise UserError("the model is in training mode (dropout on): pass a copy in eval mode")
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise UserError(f"batch must be a positive integer, got {batch!r}")
    max_seq = model.config.max_position_embeddings
    if isinstance(seq, bool) or not isinstance(seq, (int, np.integer)) or not 2 <= seq <= max_seq:
        raise UserError(f"seq must be an integer between 2 and {max_seq} (the model's positions), got {seq!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, (int, np.integer))
                                or not 1 <= threads <= default_threads()):
        raise UserError(f"threads must be between 1 and {default_threads()} on this machine, got {threads!r}")


def _shared_tokenizer():
    return get_model("minilm-l6")._hf[1]


def example_inputs(tokenizer, batch: int, seq: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), both int64 [batch, seq], from real text.

    Row i is text i of the Lee documents (50 news stories, ~100 tokens) then the polarity
    sentences (~28 tokens), cycling; each is truncated or right-padded to `seq`
    ([CLS] ... [SEP] [PAD]...), the mask 1 on real tokens and 0 on padding.
    """
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise UserError(f"batch must be a positive integer, got {batch!r}")
    if isinstance(seq, bool) or not isinstance(seq, (int, np.integer)) or seq < 2:
        raise UserError(f"seq must be an integer >= 2 ([CLS] and [SEP]), got {seq!r}")

    texts = list(data.lee_documents()) + [s for s, _ in data.polarity_sentences()]
    rows = [texts[i % len(texts)] for i in range(batch)]
    with TOKENIZER_LOCK:
        enc = tokenizer(rows, padding="max_length", truncation=True, max_length=int(seq), return_tensors="np")
    return (np.ascontiguousarray(enc["input_ids"], dtype=np.int64),
            np.ascontiguousarray(enc["attention_mask"], dtype=np.int64))


def torch_eager(model, batch: int, seq: int, tokenizer=None) -> Callable[[], "torch.Tensor"]:
    """PyTorch eager forward under inference_mode; returns last_hidden_state [batch, seq, hidden].

    tokenizer: for the example inputs; None = the shared all-MiniLM-L6-v2 tokenizer.
    """
    _check(model, batch, seq)
    ids, mask = (torch.from_numpy(a) for a in example_inputs(tokenizer or _shared_tokenizer(), batch, seq))

    def forward() -> torch.Tensor:
        with torch.inference_mode():
            return model(input_ids=ids, attention_mask=mask).last_hidden_state

    return forward


def _last_hidden(model):
    """The export's view of `model`: (input_ids, attention_mask) -> last_hidden_state, in eval mode."""
    class LastHidden(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    return LastHidden(model).eval()


def _export(model, ids: np.ndarray, mask: np.ndarray, path: str, dynamic: bool = False) -> None:
    """Write `model` (a private copy) as ONNX to `path`, weights inline; shapes static [batch, seq] as
    ids, or with dynamic=True any batch and length (what a user's export for serving would do)."""
    shapes = None
    if dynamic:
        batch, seq = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("seq", min=2, max=ids.shape[1] * 64)
        shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    # the exporter warns about torchvision ops it cannot register, the optimizer about every constant
    # it declines to fold, and torch.export about a deprecated pytree check: noise on every export,
    # so silenced for this call only
    with _quiet("torch.onnx", "onnxscript"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message=r".*axis name: \w+ will not be used")  # the input's two Dims
        torch.onnx.export(_last_hidden(model), (torch.from_numpy(ids), torch.from_numpy(mask)), path,
                          input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
                          dynamo=True, external_data=False, verbose=False, dynamic_shapes=shapes)


@contextlib.contextmanager
def _quiet(*names: str):
    """Raise the named loggers to ERROR inside the block; their levels are restored after."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _ort_options(threads: int) -> "ort.SessionOptions":
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return opts


def onnxruntime_dynamic(model, threads: int, tokenizer=None) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """ONNX Runtime running `model` exported once for any batch and length: (input_ids, attention_mask
    int64 [batch, seq]) -> last_hidden_state float32 [batch, seq, hidden]. Checked against PyTorch eager
    at two shapes before it is returned (RuntimeError above MAX_REL_ERROR)."""
    _check(model, 2, 16, threads)
    ids, mask = example_inputs(tokenizer or _shared_tokenizer(), 2, 16)
    with tempfile.TemporaryDirectory(prefix="sparsity-onnx-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        _export(copy.deepcopy(model).eval(), ids, mask, path, dynamic=True)
        session = ort.InferenceSession(path, sess_options=_ort_options(threads), providers=["CPUExecutionProvider"])

    def forward(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return session.run(["last_hidden_state"], {"input_ids": input_ids, "attention_mask": attention_mask})[0]

    for batch, seq in ((1, 7), (3, 40)):
        ids, mask = example_inputs(tokenizer or _shared_tokenizer(), batch, seq)
        with torch.inference_mode():
            want = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
        got = forward(ids, mask)
        rel = float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)) if got.shape == want.shape else np.inf
        if not rel <= MAX_REL_ERROR:
            raise RuntimeError(f"ONNX Runtime (dynamic shapes) differs from PyTorch eager at {batch}x{seq}: relative "
                               f"error {rel:.2e} > {MAX_REL_ERROR:.0e}")
    return forward


def onnxruntime_session(model, batch: int, seq: int, threads: int, tokenizer=None) -> Callable[[], np.ndarray]:
    """ONNX Runtime (CPU) running `model` exported by torch.onnx.export; returns last_hidden_state.

    Session: intra_op_num_threads=threads, sequential execution, ORT_ENABLE_ALL graph
    optimizations. The output is checked against PyTorch eager on the same inputs before the
    callable is returned; a relative error above MAX_REL_ERROR raises RuntimeError. Export and
    session creation take ~5-10 s on 2 cores. tokenizer: None = the shared MiniLM's.
    """
    _check(model, batch, seq, threads)
    ids, mask = example_inputs(tokenizer or _shared_tokenizer(), batch, seq)
    with tempfile.TemporaryDirectory(prefix="sparsity-onnx-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        _export(copy.deepcopy(model).eval(), ids, mask, path)
        session = ort.InferenceSession(path, sess_options=_ort_options(threads), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids, "attention_mask": mask}
    outputs = ["last_hidden_state"]

    def forward() -> np.ndarray:
        return session.run(outputs, feeds)[0]

    reference = torch_eager(model, batch, seq, tokenizer)().numpy()
    got = forward()
    rel = float(np.linalg.norm(got - reference) / max(np.linalg.norm(reference), 1e-30)) \
        if got.shape == reference.shape else float("inf")
    if not rel <= MAX_REL_ERROR:
        raise RuntimeError(f"ONNX Runtime output differs from PyTorch eager at {batch}x{seq}: relative error "
                           f"{rel:.2e} > {MAX_REL_ERROR:.0e} (shapes {list(got.shape)} vs {list(reference.shape)})")
    return forward


# INT8 peers: what a user gets from a one-line dynamic quantization. Their arithmetic is their own (per-tensor
# activations, fbgemm / MLAS kernels), so they are checked against the float32 model within quantization noise.
INT8_MAX_REL_ERROR = 0.5  # a sanity bound (a wrong model is ~1 or more): measured 0.16 (ONNX Runtime), 0.26 (PyTorch) on MiniLM


def _check_int8(name: str, got: np.ndarray, model, batch: int, seq: int, tokenizer) -> None:
    reference = torch_eager(model, batch, seq, tokenizer)().numpy()
    rel = float(np.linalg.norm(got - reference) / max(np.linalg.norm(reference), 1e-30)) \
        if got.shape == reference.shape else float("inf")
    if not rel <= INT8_MAX_REL_ERROR:
        raise RuntimeError(f"{name} output differs from float32 PyTorch eager at {batch}x{seq}: relative error "
                           f"{rel:.2e} > {INT8_MAX_REL_ERROR:.0e}")


def torch_dynamic_int8(model, batch: int, seq: int, tokenizer=None) -> Callable[[], "torch.Tensor"]:
    """PyTorch eager with every nn.Linear dynamically quantized (`torch.ao.quantization.quantize_dynamic`,
    per-channel INT8 weights, fbgemm); the model is copied, never changed."""
    _check(model, batch, seq)
    with warnings.catch_warnings():  # torch 2.13 deprecates the quantized tensor types it still uses
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(model).eval(), {torch.nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig},
            dtype=torch.qint8)
    forward = torch_eager(quantized, batch, seq, tokenizer)
    _check_int8("PyTorch dynamic INT8", forward().numpy(), model, batch, seq, tokenizer)
    return forward


def onnxruntime_int8_session(model, batch: int, seq: int, threads: int, tokenizer=None) -> Callable[[], np.ndarray]:
    """ONNX Runtime running the export quantized by `onnxruntime.quantization.quantize_dynamic` (per-channel
    INT8 weights, activations quantized at run time: the one-line INT8 of ONNX Runtime's docs)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic  # lazy: only INT8 plans time it

    _check(model, batch, seq, threads)
    ids, mask = example_inputs(tokenizer or _shared_tokenizer(), batch, seq)
    with tempfile.TemporaryDirectory(prefix="sparsity-onnx-int8-") as tmp:
        path, quantized = os.path.join(tmp, "model.onnx"), os.path.join(tmp, "model.int8.onnx")
        _export(copy.deepcopy(model).eval(), ids, mask, path)
        with _quiet("root", "onnxruntime"):
            quantize_dynamic(path, quantized, per_channel=True, weight_type=QuantType.QInt8)
        session = ort.InferenceSession(quantized, sess_options=_ort_options(threads), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids, "attention_mask": mask}

    def forward() -> np.ndarray:
        return session.run(["last_hidden_state"], feeds)[0]

    _check_int8("ONNX Runtime INT8", forward(), model, batch, seq, tokenizer)
    return forward
