"""The dense peers every sparse kernel is compared with, in both activation layouts.

`run` (one layer), the app and the benchmark all take their "best dense" from here: the fastest of
TVM dense and PyTorch dense with X row-major, and PyTorch dense feature-major (Y^T = W @ X^T, the
layout our fastest sparse schedules read and write). A sparse kernel that wins only against the
slower layout has not won.
"""
from __future__ import annotations

import numpy as np
import torch
from tvm import te

from sparsity_app.core.results import DENSE_PEERS
from sparsity_app.kernels import compile_prim_func, empty, tensor
from sparsity_app.kernels.dense import TorchDense, TVMDense


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


def dense_peers(weight: np.ndarray, x: np.ndarray) -> dict:
    """name (core.results.DENSE_PEERS) -> peer with run() and output() -> Y float32 [tokens, out].

    weight: float32 [out, in] (the unpruned weight: dense pays for every entry); x: float32 [tokens, in].
    """
    peers = {"tvm_dense": TVMDense(weight, x), "torch_dense": TorchDense(weight, x),
             "torch_dense_fm": TorchDenseFeatureMajor(weight, x)}
    assert peers.keys() == DENSE_PEERS.keys()
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
