"""Sparsity Co-design Explorer: prune a layer, compile it to a block-sparse TVM kernel, time it
against dense, score what it costs in accuracy, and keep the result.

Python API (the CLI and the app are thin doors onto it):

    from sparsity_app import Spec, run
    result = run(Spec(model="minilm-l6", layer="encoder.layer.0.attention.self.query",
                      method="block", block=(32, 1), sparsity=0.9))
    result.speedup_vs_torch_dense, result.proxies["lee_pearson"]
"""
__version__ = "0.3.0"  # the release; cache keys use measure.timing.code_version(), a hash of the sources

from sparsity_app.core import env
from sparsity_app.core.errors import UserError
from sparsity_app.core.requests import Spec
from sparsity_app.core.results import Result, Timing


def run(spec, **kwargs):
    """runs.layer.run for the Python API, which is an entry point like the CLI: the environment first."""
    # lazy: importing any sparsity_app module runs this file, and must not load TVM and PyTorch
    from sparsity_app.runs.layer import run as run_layer

    env.configure()
    return run_layer(spec, **kwargs)


__all__ = ["Result", "Spec", "Timing", "UserError", "run", "__version__"]
