"""Sparsity Co-design Explorer: prune a layer, compile it to a block-sparse TVM kernel, time it
against dense, score what it costs in accuracy, and keep the result.

Python API (the CLI and the app are thin doors onto it):

    from sparsity_app import Spec, run
    result = run(Spec(model="minilm-l6", layer="encoder.layer.0.attention.self.query",
                      method="block", block=(32, 1), sparsity=0.9))
    result.speedup_vs_torch_dense, result.proxies["lee_pearson"]
"""
__version__ = "0.3.0"  # the release; cache keys use timing.code_version(), a hash of the sources

from .errors import UserError  # noqa: E402
from .spec import Result, Spec, Timing  # noqa: E402


def run(spec, **kwargs):
    from .experiment import run as _run

    return _run(spec, **kwargs)


__all__ = ["Result", "Spec", "Timing", "UserError", "run", "__version__"]
