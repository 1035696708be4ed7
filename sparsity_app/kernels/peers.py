"""The dense peers every sparse kernel is compared with, in both activation layouts and, for an INT8
layer, at INT8 too.

`run` (one layer), the app and the benchmark all take their "best dense" from here: the fastest of
TVM dense and PyTorch dense with X row-major, and PyTorch dense feature-major (Y^T = W @ X^T, the
layout our fastest sparse schedules read and write). A sparse kernel that wins only against the
slower layout has not won. An INT8 sparse kernel also meets the dense INT8 a user would deploy
instead: our TVM dense INT8 and PyTorch's dynamic quantization; the best dense is the fastest of all.

A peer whose arithmetic is not X @ W^T in float32 says what it should be checked against:
`expected() -> (Y float32/float64 [tokens, out], tolerance relative to Y's scale)`.
"""
from __future__ import annotations

import numpy as np
import torch
from tvm import te

import warnings

from sparsity_app.core.results import DENSE_PEERS, INT8_PEERS
from sparsity_app.kernels import compile_prim_func, empty, tensor
from sparsity_app.kernels.dense import TorchDense, TVMDense
from sparsity_app.kernels.int8 import TVMDenseInt8
from sparsity_app.prune.quantize import int8_linear


class TorchDenseFeatureMajor:
    """PyTorch dense in the sparse kernels' layout: Y^T float32 [out, tokens] = W @ X^T."""

    def __init__(self, weight: np.ndarray, x: np.ndarray):
        self._w = torch.from_numpy(np.ascontiguousarray(weight))
        self._xt = torch.from_numpy(np.ascontiguousarray(x.T))
        self._mm = torch.mm

    def run(self):
        return self._mm(self._w, self._xt)

    def output(self) -> np.ndarray:
        """Y float32 [tokens, out], whatever the layout it was computed in."""
        return np.ascontiguousarray(self.run().numpy().T)


class TVMDenseInt8Peer(TVMDenseInt8):
    """Our dense INT8 kernel as a peer: checked against the same quantized arithmetic, to the bit."""

    def expected(self) -> tuple[np.ndarray, float]:
        return int8_linear(self._x, self.quantized, self.dot), 1e-6

    def __init__(self, weight: np.ndarray, x: np.ndarray):
        self._x = x
        super().__init__(weight, x)


class TorchDynamicInt8:
    """PyTorch's dynamic INT8 linear: `torch.ao.quantization.quantize_dynamic` on an nn.Linear with
    per-channel weights (fbgemm on x86; activations quantized per tensor at run time)."""

    def __init__(self, weight: np.ndarray, x: np.ndarray):
        out_f, in_f = weight.shape
        linear = torch.nn.Linear(in_f, out_f, bias=False)
        linear.weight.data = torch.from_numpy(np.ascontiguousarray(weight))
        with warnings.catch_warnings():  # torch 2.13 deprecates the quantized tensor types it still uses
            warnings.simplefilter("ignore")
            self._linear = torch.ao.quantization.quantize_dynamic(
                torch.nn.Sequential(linear), {torch.nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig},
                dtype=torch.qint8)
        self._x, self._weight = torch.from_numpy(np.ascontiguousarray(x)), weight

    def run(self):
        with torch.inference_mode():
            return self._linear(self._x)

    def output(self) -> np.ndarray:
        return self.run().numpy()

    def expected(self) -> tuple[np.ndarray, float]:
        """Its own quantization (per-tensor activations) is not ours: checked against float32 X W^T within
        quantization noise (5% of the output's scale; measured ~2% on 768x768 Gaussian data)."""
        return self._x.numpy().astype(np.float64) @ self._weight.astype(np.float64).T, 0.05


def dense_peers(weight: np.ndarray, x: np.ndarray, precision: str = "fp32") -> dict:
    """name (core.results.DENSE_PEERS, and INT8_PEERS for precision int8) -> peer with run() and
    output() -> Y float32 [tokens, out].

    weight: float32 [out, in] (the unpruned weight: dense pays for every entry); x: float32 [tokens, in].
    """
    peers = {"tvm_dense": TVMDense(weight, x), "torch_dense": TorchDense(weight, x),
             "torch_dense_fm": TorchDenseFeatureMajor(weight, x)}
    assert peers.keys() == DENSE_PEERS.keys()
    if precision == "int8":
        peers.update(tvm_dense_int8=TVMDenseInt8Peer(weight, x), torch_dynamic_int8=TorchDynamicInt8(weight, x))
        assert set(INT8_PEERS) <= peers.keys()
    return peers


class TVMDefaultDense:
    """Y = X @ W^T as TVM compiles it with no schedule (TVM 0.27's default for a matmul: plain
    loops, one thread). Not a fair baseline; shown so that a user sees what "dense TVM" means
    without scheduling, and why our scheduled TVM dense is the one speedups are quoted against."""

    def __init__(self, weight: np.ndarray, x: np.ndarray):
        (out_f, in_f), tokens = weight.shape, x.shape[0]
        xs = te.placeholder((tokens, in_f), "float32", name="X")
        ws = te.placeholder((out_f, in_f), "float32", name="W")
        k = te.reduce_axis((0, in_f), name="k")
        ys = te.compute((tokens, out_f), lambda i, j: te.sum(xs[i, k] * ws[j, k], axis=k), name="Y")
        self._fn = compile_prim_func(te.create_prim_func([xs, ws, ys]), "default_dense")
        self._args = (tensor(x), tensor(weight), empty((tokens, out_f)))

    def run(self) -> None:
        self._fn(*self._args)

    def output(self) -> np.ndarray:
        self.run()
        return self._args[-1].numpy()
