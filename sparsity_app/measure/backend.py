"""Where kernels are measured: in this process (`local`), or on devices behind TVM's RPC tracker (`rpc`).

`Backend` is the request (frozen; from `--rpc-tracker/--rpc-key/--rpc-target` or the app's
sidebar). The runs (runs/layer.py, measure/tuner.py) measure through a *device*, the one seam
between "what to measure" and "where"; `LocalDevice` here, `remote.RemoteDevice` for RPC. A device has:

  fingerprint         the machine part of cache keys: a remote result describes the remote device
  cores               threads a kernel can use there (what Spec.threads = 0 means)
  n_parts             parallel parts of split="nnz" schedules (one per thread of the device)
  slot(who, waiting)  what to hold while measuring (the machine-wide measurement slot, or nothing)
  set_threads(n)
  dense_peers(weight, x, precision)  the dense peers it can run (PyTorch runs only here)
  prepare(kernels)    -> Prepared: compiled (and, remotely, uploaded), with output(name) -> Y and
                      time(repeat, ...) -> name -> Timing, every kernel in one measurement
  where(names)        Result.backend: which implementation was measured where, and what was not
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, ContextManager

import numpy as np

from sparsity_app.core.errors import CompileError, UserError, one_line
from sparsity_app.core.limits import check_time
from sparsity_app.core.requests import default_threads
from sparsity_app.core.results import Timing
from sparsity_app.measure.locks import measurement_slot
from sparsity_app.measure.timing import fingerprint, measure, tuning_machine

KINDS = ("local", "rpc")


@dataclasses.dataclass(frozen=True)
class Backend:
    """Where to measure. Frozen and hashable; `resolve()` checks it without touching the network."""

    kind: str = "local"  # "local": this process; "rpc": servers registered with a TVM RPC tracker
    tracker: str = ""  # rpc: the tracker's HOST:PORT
    key: str = ""  # rpc: the device key the servers registered with (rpc_server --key)
    target: str = ""  # rpc: the device's LLVM target, "mtriple=...,mcpu=..."; "" = read from the device

    def resolve(self) -> "Backend":
        """The canonical form; UserError names what to change."""
        if self.kind not in KINDS:
            raise UserError(f"unknown measurement backend {self.kind!r}; valid backends: {', '.join(KINDS)}")
        if self.kind == "local":
            return Backend()
        self.address  # raises on a malformed HOST:PORT
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", self.key or ""):
            raise UserError(f"the RPC device key must be a word like 'rasp4' or 'x86-server' (the --key the "
                            f"servers were started with), got {self.key!r}")
        self.target_fields()
        return dataclasses.replace(self, tracker=self.tracker.strip(), target=self.target.strip())

    @property
    def address(self) -> tuple[str, int]:
        host, _, port = (self.tracker or "").strip().rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise UserError(f"the RPC tracker must look like HOST:PORT, e.g. 127.0.0.1:9190, got {self.tracker!r}")
        return host, int(port)

    def target_fields(self) -> dict[str, str]:
        """--rpc-target as LLVM target fields, e.g. {"mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72"}."""
        fields = {}
        for item in filter(None, (t.strip() for t in self.target.split(","))):
            name, sep, value = item.partition("=")
            if not sep or name.strip() not in ("mtriple", "mcpu", "mattr") or not value.strip():
                raise UserError(f"--rpc-target must look like mtriple=aarch64-linux-gnu,mcpu=cortex-a72 "
                                f"(fields mtriple, mcpu, mattr), got {self.target!r}")
            fields[name.strip()] = value.strip()
        return fields

    def label(self) -> str:
        return "this machine" if self.kind == "local" else f"RPC key {self.key} via tracker {self.tracker}"


LOCAL = Backend()


class LocalPrepared:
    """Kernels compiled for this CPU; every timing in one `timing.measure` call."""

    def __init__(self, kernels: dict[Any, Any]):
        self.kernels = kernels
        for name, k in kernels.items():
            if hasattr(k, "compile"):  # TVM kernels compile on first use; PyTorch peers have nothing to compile
                label = name.label() if hasattr(name, "label") else name
                check_time(f"compiling {label}")
                try:
                    k.compile()
                except Exception as e:
                    raise CompileError(f"TVM could not compile the kernel with schedule {label}: {one_line(e)}") from e

    def output(self, name) -> np.ndarray:
        """Y float32 [tokens, out] of one kernel."""
        return self.kernels[name].output()

    def time(self, repeat: int = 25, per_round: int = 5, warmup_s: float = 0.05, min_sample_s: float = 0.002,
             settle_s: float = 0.02) -> dict[Any, Timing]:
        return measure({name: k.run for name, k in self.kernels.items()}, repeat=repeat, per_round=per_round,
                       warmup_s=warmup_s, min_sample_s=min_sample_s, settle_s=settle_s)


class LocalDevice:
    """This process on this machine: every dense peer, the machine-wide measurement slot."""

    n_parts = None  # kernels default to one part per thread of this process's TVM pool

    @property
    def fingerprint(self) -> dict[str, Any]:
        return fingerprint()

    @property
    def cores(self) -> int:
        return default_threads()

    def tuning_machine(self) -> dict[str, Any]:
        return tuning_machine()

    def slot(self, who: str, waiting: Callable[[int], None] = lambda ahead: None) -> ContextManager:
        return measurement_slot(who, waiting)

    def set_threads(self, n: int) -> None:
        _kernels().set_threads(n)

    def mcpu(self) -> str:
        return _kernels().host_mcpu()

    def dense_peers(self, weight: np.ndarray, x: np.ndarray, precision: str = "fp32") -> dict:
        return _kernels().peers.dense_peers(weight, x, precision)

    def prepare(self, kernels: dict) -> LocalPrepared:
        return LocalPrepared(kernels)

    def where(self, names) -> dict[str, Any]:
        return {"kind": "local", "device": "this machine", "measured_on": {n: "this machine" for n in names},
                "not_measured": {}}


def _kernels():
    """The kernels package, imported on first use: it loads TVM and PyTorch (~4 s), which the
    questions a device answers without measuring (cores, fingerprint, slot) never need."""
    import sparsity_app.kernels.peers  # lazy: see the docstring

    return sparsity_app.kernels
