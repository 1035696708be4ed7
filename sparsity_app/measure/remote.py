"""Measuring on remote devices through TVM's RPC tracker (`python -m tvm.exec.rpc_tracker`, servers
started with `python -m tvm.exec.rpc_server --tracker HOST:PORT --key KEY`).

Kernels are compiled here for the device's target (`--rpc-target`, else the mtriple and mcpu the
device reports through the session), exported with `export_library`, uploaded, loaded, run once on
remote tensors and compared with NumPy here, and only then timed there with `time_evaluator`, in
rounds (every kernel of a comparison in turn, a discarded settle sample first, as timing.measure).

- Schedules are tuned **on the device**, by the same tuner timing its candidates there (all of a
  round in one uploaded module); winners are stored under the device's fingerprint, so a remote
  device never reuses this machine's winner. The result says so (`backend.tuned_on`).
- PyTorch cannot run on the device: a remote result times TVM sparse against TVM dense only, both
  there, and names the PyTorch peers as not measured; its speedups compare like with like.
- The fingerprint (the machine part of cache keys) comes from the device through the session: its
  key, LLVM's name of its CPU, vendor and triple, its thread pool's size, and the target compiled for.
- `sweep` fans a grid out over the key's free servers (one worker and one session each; the tracker
  hands them out); each point is stored as it finishes; a point whose server vanishes is put back
  and measured on another server.
- The measurement slot (locks.py): servers on this machine time on our own cores, so a point
  measured there holds the machine-wide slot from compile to last timing, like a local run (fan-out
  over such servers then only demonstrates the mechanism: their timings never overlap). Servers on
  other machines hold nothing here.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import ipaddress
import os
import socket
import tempfile
import threading
import time
import uuid
from importlib.metadata import version
from typing import Any, Callable, Iterator

import numpy as np
import tvm
from tvm import rpc

from sparsity_app.core.errors import CompileError, UserError, one_line
from sparsity_app.core.limits import check_time
from sparsity_app.core.results import DENSE_PEERS, Timing
from sparsity_app.kernels.dense import TVMDense
from sparsity_app.measure.backend import Backend
from sparsity_app.measure.locks import measurement_slot
from sparsity_app.measure.timing import KERNEL_SOURCES, code_version, summarize

NOT_ON_DEVICE = "PyTorch cannot run on an RPC device; not measured"


class DeviceLost(RuntimeError):
    """The RPC server went away (killed, rebooted, network): the point can be measured elsewhere."""


@contextlib.contextmanager
def _on_device(what: str) -> Iterator[None]:
    """Any failure of an RPC call inside is the device's loss, not a wrong kernel."""
    try:
        yield
    except Exception as e:  # tvm.error.RPCError, InternalError (kShutdown), OSError...
        raise DeviceLost(f"{what}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e


def tracker_of(backend: Backend):
    host, port = backend.address
    try:  # TVM's own connect retries for a minute: say at once that nothing listens there
        socket.create_connection((host, port), timeout=3).close()
    except OSError as e:
        raise UserError(f"cannot reach the RPC tracker at {backend.tracker} ({e.strerror or e}); start one with "
                        f"python -m tvm.exec.rpc_tracker --host {host} --port {port}") from None
    try:
        return rpc.connect_tracker(host, port)
    except Exception as e:
        raise UserError(f"cannot reach the RPC tracker at {backend.tracker}: {e}") from None


def servers(backend: Backend, tracker=None) -> tuple[int, int]:
    """(servers registered with the backend's key, of which free) according to its tracker."""
    summary = (tracker or tracker_of(backend)).summary()
    total = sum(1 for s in summary.get("server_info", []) if s.get("key") == f"server:{backend.key}")
    return total, int(summary.get("queue_info", {}).get(backend.key, {}).get("free", 0))


_REQUESTING = threading.Lock()  # one request in flight per process: see _request


def request_server(backend: Backend, tracker=None, poll_s: float = 0.2):
    """A session on one server of the key; UserError when the tracker has none registered.

    TVM's tracker queues a request until a server of the key is free, and keeps it queued for ever if
    the last busy one dies. So a request goes out only when the tracker reports a free server, one at
    a time in this process (two sent for one free server would leave the second queued); while every
    server is busy this polls, and when none is left registered it says so. (A server that dies
    between the summary and the request can still strand that one request.)
    """
    tracker = tracker or tracker_of(backend)
    while True:
        with _REQUESTING:
            total, free = servers(backend, tracker)
            if total == 0:
                raise UserError(f"the RPC tracker {backend.tracker} has no server with key {backend.key!r} "
                                f"(start one: python -m tvm.exec.rpc_server --tracker {backend.tracker} "
                                f"--key {backend.key})")
            if free:
                with _on_device(f"requesting a {backend.key} server"):
                    return tracker.request(backend.key, session_timeout=0, max_retry=3)
        time.sleep(poll_s)


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    """What a remote device is, as it answered through an RPC session."""

    backend: Backend
    mcpu: str  # LLVM's name of the device's CPU (tvm.codegen.llvm.GetHostCPUName there)
    triple: str  # the device's target triple (as its TVM was built)
    vendor: str  # CPU vendor, x86 only ("" elsewhere)
    threads: int  # the device's TVM thread pool (its TVM_NUM_THREADS): the threads a kernel can use
    target: tuple[tuple[str, str], ...]  # LLVM target fields compiled for: --rpc-target, else mtriple + mcpu
    isa: tuple[str, ...]  # vector ISA features LLVM knows for that target
    on_this_machine: bool  # some server of the key runs on this machine (shares our cores)

    @property
    def cores(self) -> int:
        return self.threads

    @property
    def label(self) -> str:
        return f"RPC key {self.backend.key} ({dict(self.target).get('mcpu', self.mcpu)})"

    @property
    def fingerprint(self) -> dict[str, Any]:
        """The machine part of a remote result's cache key: the device, the target, the code."""
        return {"device": self.label, "key": self.backend.key, "cpu": f"{self.vendor or 'cpu'} {self.mcpu}".strip(),
                "isa": list(self.isa), "cores": self.threads, "target": dict(self.target), "triple": self.triple,
                "tvm": version("apache-tvm"), "torch": None, "code": code_version()}

    def tvm_target(self):
        return tvm.target.Target({"kind": "llvm", **dict(self.target), "num-cores": self.threads})


_ISA = ("sse4.2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512vnni", "avx512bf16",
        "amx-tile", "neon", "sve", "sve2", "dotprod")


def _read_device(session, backend: Backend) -> DeviceInfo:
    """Ask the device (not this machine) what it is."""
    with _on_device("reading the device"):
        mcpu = str(session.get_function("tvm.codegen.llvm.GetHostCPUName")())
        triple = str(session.get_function("target.llvm_get_system_triple")())
        try:
            vendor = str(session.get_function("target.llvm_get_system_x86_vendor")())
        except Exception:
            vendor = ""
        threads = int(session.get_function("runtime.NumThreads")())
    fields = backend.target_fields() or {"mtriple": triple, "mcpu": mcpu}
    try:
        target = tvm.target.Target({"kind": "llvm", **fields})
        features = tvm.get_global_func("target.llvm_get_cpu_features")(target)
        isa = tuple(f for f in _ISA if f in features)  # the map's keys are the features (values are empty)
    except Exception as e:
        raise UserError(f"this TVM cannot compile for the RPC device's target {fields}: {e}") from None
    return DeviceInfo(backend=backend, mcpu=mcpu, triple=triple, vendor=vendor, threads=max(1, threads),
                      target=tuple(sorted(fields.items())), isa=isa, on_this_machine=_servers_here(backend))


def _servers_here(backend: Backend) -> bool:
    """Whether any server of the key runs on this machine (its address is loopback or one of ours)."""
    mine = {"127.0.0.1", "::1"}
    with contextlib.suppress(OSError):
        mine |= set(socket.gethostbyname_ex(socket.gethostname())[2])
    summary = tracker_of(backend).summary()
    for s in summary.get("server_info", []):
        if s.get("key") == f"server:{backend.key}":
            addr = str(s["addr"][0])
            with contextlib.suppress(ValueError):
                if ipaddress.ip_address(addr).is_loopback:
                    return True
            if addr in mine:
                return True
    return False


@functools.lru_cache(maxsize=16)
def probe(backend: Backend) -> DeviceInfo:
    """What the backend's device is (one session, once per process): for cache keys and lookups."""
    backend = backend.resolve()
    session = request_server(backend)
    try:
        return _read_device(session, backend)
    finally:
        del session


class RemotePrepared:
    """Kernels compiled here for the device, uploaded as one library, with their arguments there."""

    def __init__(self, session, info: DeviceInfo, kernels: dict[Any, Any]):
        self.kernels, self.info = kernels, info
        self.symbols = {name: f"k{i}" for i, name in enumerate(kernels)}
        mod = tvm.IRModule({sym: kernels[name].source.prim_func(sym) for name, sym in self.symbols.items()})

        check_time(f"compiling {len(kernels)} kernel(s) for {info.tvm_target()}")
        try:
            lib = tvm.compile(mod, target=info.tvm_target())  # a compile error is ours, not the device's
        except Exception as e:
            raise CompileError(f"TVM could not compile the kernels for the device: {one_line(e)}") from e
        with tempfile.TemporaryDirectory(prefix="sparsity-rpc-") as tmp:
            name = f"kernels-{uuid.uuid4().hex[:12]}.so"
            lib.export_library(os.path.join(tmp, name))
            with _on_device("uploading the kernels"):
                session.upload(os.path.join(tmp, name), target=name)
                self.module = session.load_module(name)
                self.dev = session.cpu()
                self.args = {n: [tvm.runtime.tensor(a, self.dev) for a in k.arrays()] for n, k in kernels.items()}

    def output(self, name) -> np.ndarray:
        """Y float32 [tokens, out] of one kernel, run on the device and copied back here."""
        with _on_device("running a kernel"):
            self.module[self.symbols[name]](*self.args[name])
            y = self.args[name][-1].numpy()
        return self.kernels[name].to_output(y)

    def time(self, repeat: int = 25, per_round: int = 5, warmup_s: float = 0.05, min_sample_s: float = 0.002,
             settle_s: float = 0.02) -> dict[Any, Timing]:
        """The timing.measure protocol on the device: each kernel's calls per sample sized to last
        min_sample_s, then rounds in which each kernel runs one discarded settle sample and
        `per_round` timed ones (time_evaluator's own clock there). Returns name -> Timing (ms)."""
        with _on_device("timing"):
            number = {}
            for name, sym in self.symbols.items():
                warm = self.module.time_evaluator(sym, self.dev, number=1, repeat=3,
                                                  min_repeat_ms=max(1, int(warmup_s * 1e3 / 3)))(*self.args[name])
                per_call = max(min(warm.results), 1e-9)
                number[name] = max(1, int(np.ceil(min_sample_s / per_call)))
            samples: dict[Any, list[float]] = {name: [] for name in self.symbols}
            while any(len(s) < repeat for s in samples.values()):
                check_time("timing on the device")  # the measurement's time limit, between rounds
                for name, sym in self.symbols.items():
                    n = min(per_round, repeat - len(samples[name]))
                    if n <= 0:
                        continue
                    ev = self.module.time_evaluator(sym, self.dev, number=number[name], repeat=n + 1)
                    samples[name] += [t * 1e3 for t in ev(*self.args[name]).results[1:]]  # [0]: the settle sample
        return {name: summarize(s) for name, s in samples.items()}


class RemoteDevice:
    """One RPC session on one server of a key: the device a point is measured on (see measure/backend.py)."""

    def __init__(self, session, info: DeviceInfo):
        self.session, self.info = session, info
        self.n_parts = info.threads
        self.cores = info.cores
        self.fingerprint = info.fingerprint

    def tuning_machine(self) -> dict[str, Any]:
        return {**self.fingerprint, "code": code_version(KERNEL_SOURCES)}

    def slot(self, who: str, waiting: Callable[[int], None] = lambda ahead: None):
        return measurement_slot(f"{who} on {self.info.label}", waiting) if self.info.on_this_machine \
            else contextlib.nullcontext()

    def set_threads(self, n: int) -> None:
        with _on_device("setting the device's threads"):
            self.session.get_function("runtime.config_threadpool")(1, n)

    def mcpu(self) -> str:
        return dict(self.info.target).get("mcpu", self.info.mcpu)

    def dense_peers(self, weight: np.ndarray, x: np.ndarray, precision: str = "fp32") -> dict:
        """TVM dense only (PyTorch does not run on the device). INT8 layers run on this machine only
        (their integer dot is chosen for the host's ISA): a remote INT8 run is refused before it gets here."""
        return {"tvm_dense": TVMDense(weight, x)}

    def prepare(self, kernels: dict) -> RemotePrepared:
        return RemotePrepared(self.session, self.info, kernels)

    def where(self, names) -> dict[str, Any]:
        b = self.info.backend
        return {"kind": "rpc", "device": self.info.label, "tracker": b.tracker, "key": b.key,
                "target": dict(self.info.target), "measured_on": {n: self.info.label for n in names},
                "not_measured": {n: NOT_ON_DEVICE for n in DENSE_PEERS if n not in names},
                "tuned_on": f"{self.info.label} (schedules tuned by timing candidates on the device)"}


@contextlib.contextmanager
def open_device(backend: Backend, tracker=None) -> Iterator[RemoteDevice]:
    """A RemoteDevice on one server of the key, for the body; the server is freed afterwards."""
    info = probe(backend.resolve())
    session = request_server(info.backend, tracker)
    try:
        yield RemoteDevice(session, info)
    finally:
        del session
