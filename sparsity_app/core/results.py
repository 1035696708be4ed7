"""The measured answers: `Result` (one layer), `ModelResult` (the whole model), `RecoveryResult`.

Each is frozen; `to_dict` is the CLI's --json object and the one stored form (`from_dict` reads it
back). This module imports nothing of the project but the requests it answers.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from sparsity_app.core.requests import ModelPlan, RecoveryRequest, Spec, fmt_block, parse_block, parse_nm


@dataclasses.dataclass(frozen=True)
class Timing:
    """One implementation's latency over repeated runs, in milliseconds."""

    median: float
    spread: float  # interquartile range (p75 - p25)
    min: float
    max: float
    runs: int


# What `Result.times_ms` holds: the sparse kernel and every dense peer, all timed in one `measure` call.
SPARSE = "tvm_sparse"  # our TVM kernel for the layer's format (BSR, CSR or N:M)
DENSE_PEERS = {  # name -> what it is; the best dense is the fastest of these
    "tvm_dense": "TVM dense (hand-scheduled GEMM, X row-major)",
    "torch_dense": "PyTorch dense (nn.functional.linear, X row-major)",
    "torch_dense_fm": "PyTorch dense, feature-major (W @ X^T, the sparse kernels' layout)",
}
INT8_PEERS = {  # an INT8 layer's dense peers at INT8 (as well as DENSE_PEERS): the best dense is the fastest of all
    "tvm_dense_int8": "TVM dense INT8 (our kernel: per-row weights, per-token activations quantized inside)",
    "torch_dynamic_int8": "PyTorch dynamic INT8 (quantize_dynamic on nn.Linear, per-channel weights, fbgemm)",
}
ALL_DENSE_PEERS = {**DENSE_PEERS, **INT8_PEERS}
_OLD_NAMES = {"tvm_bsr": SPARSE, "bsr_bytes": "sparse_bytes", "nnz_blocks": "stored_blocks"}  # before 0.3


@dataclasses.dataclass(frozen=True)
class Result:
    """What one experiment measured. `to_dict` is the CLI's --json object and the stored form."""

    spec: Spec
    shape: tuple[int, int]  # (out, in) of the layer
    sparsity_achieved: float  # fraction of weights removed by the mask
    stored_blocks: int  # stored blocks of spec.block (N:M and 1x1: stored weights)
    sparse_bytes: int  # bytes of the sparse format the kernel reads (kernel['format']: bsr, csr or nm)
    dense_bytes: int
    times_ms: dict[str, Timing]  # SPARSE and the DENSE_PEERS (old results may lack torch_dense_fm)
    tune_s: float  # tuning the schedule (0.0 when a stored winner was reused)
    compile_s: float  # compiling the chosen schedule (the one that is timed)
    proxies: dict[str, float | None]  # retained_energy, output_rel_error, output_cosine, ...
    machine: dict[str, Any]  # fingerprint: cpu, isa, cores, threads, versions, code
    kernel: dict[str, Any] = dataclasses.field(default_factory=dict)  # format and schedule knobs used
    scored_tokens: int | None = None  # calibration tokens the layer proxies were scored on
    step_s: dict[str, float] = dataclasses.field(default_factory=dict)  # wall seconds of each pipeline step
    cached: bool = False
    real_weights: bool = True
    # where it was measured (measure/backend.py): kind, device, measured_on {name: where}, not_measured
    # {name: why}, tuned_on; empty for results from before remote devices (all on this machine)
    backend: dict[str, Any] = dataclasses.field(default_factory=dict)
    noisy: str | None = None  # why the timings are noise (`layer_noise`, still so after re-measuring), or None
    # a reconstructing method's run only: what the reconstruction buys, on the proxies' calibration tokens. One row
    # per way of pruning the same pattern to the same density (runs.layer.same_pattern), each {"output_cosine",
    # "output_rel_error"}; None for other methods and older results
    same_pattern: dict[str, dict[str, float]] | None = None

    @property
    def device(self) -> str:
        """The device the kernels were timed on, e.g. 'this machine' or 'RPC key rasp4 (cortex-a72)'."""
        return self.backend.get("device", "this machine")

    @property
    def best_dense(self) -> str:
        """Name (an ALL_DENSE_PEERS key) of the fastest dense peer timed with this result, at any precision."""
        return min((k for k in ALL_DENSE_PEERS if k in self.times_ms), key=lambda k: self.times_ms[k].median)

    @property
    def best_dense_same_precision(self) -> str:
        """Name of the fastest dense peer of the layer's own precision (an INT8 layer: INT8_PEERS), the
        one a fraction of ideal per precision is taken against."""
        own = [k for k in (INT8_PEERS if self.spec.precision == "int8" else DENSE_PEERS) if k in self.times_ms]
        return min(own, key=lambda k: self.times_ms[k].median) if own else self.best_dense

    def speedup_vs(self, peer: str) -> float | None:
        """None when `peer` was not measured with the sparse kernel (e.g. PyTorch on a remote device):
        a speedup only ever compares kernels timed on the same device in the same measurement."""
        if peer not in self.times_ms:
            return None
        return self.times_ms[peer].median / self.times_ms[SPARSE].median

    @property
    def speedup_vs_best_dense(self) -> float:
        return self.speedup_vs(self.best_dense)

    @property
    def speedup_vs_tvm_dense(self) -> float:
        return self.speedup_vs("tvm_dense")

    @property
    def speedup_vs_torch_dense(self) -> float | None:
        return self.speedup_vs("torch_dense")

    @property
    def ideal_speedup(self) -> float:
        return 1.0 / max(1.0 - self.sparsity_achieved, 1e-9)

    def conditions(self) -> dict[str, Any]:
        """What a timing depends on besides the configuration: results compare only if these are equal."""
        m = self.machine
        return {"device": self.device, "cpu": m.get("cpu"), "isa": " ".join(m.get("isa", [])), "cores": m.get("cores"), "tvm": m.get("tvm"),
                "torch": m.get("torch"), "code": m.get("code"), "threads": self.spec.threads,
                "tokens": self.spec.tokens, "repeat": self.spec.repeat}

    def to_dict(self) -> dict[str, Any]:
        s = self.spec
        return {
            "model": s.model,
            "layer": s.layer,
            "shape": list(self.shape),
            "method": s.method,
            "block": fmt_block(s.block),
            "nm": None if s.nm is None else f"{s.nm[0]}:{s.nm[1]}",
            "norm": s.norm,
            "seed": s.seed,
            "precision": s.precision,
            "sparsity_target": s.sparsity,
            "sparsity_achieved": self.sparsity_achieved,
            "tokens": s.tokens,
            "threads": s.threads,
            "repeat": s.repeat,
            "stored_blocks": self.stored_blocks,
            "sparse_bytes": self.sparse_bytes,
            "dense_bytes": self.dense_bytes,
            "times_ms": {k: dataclasses.asdict(v) for k, v in self.times_ms.items()},
            "best_dense": self.best_dense,
            "speedup_vs_best_dense": self.speedup_vs_best_dense,
            "speedup_vs_tvm_dense": self.speedup_vs_tvm_dense,
            "speedup_vs_torch_dense": self.speedup_vs_torch_dense,
            "ideal_speedup": self.ideal_speedup,
            "tune_s": self.tune_s,
            "compile_s": self.compile_s,
            "step_s": dict(self.step_s),
            "proxies": dict(self.proxies),
            "scored_tokens": self.scored_tokens,
            "kernel": dict(self.kernel),
            "cached": self.cached,
            "real_weights": self.real_weights,
            "accuracy_note": None if self.real_weights else
            "synthetic random weights: the accuracy figures mean nothing (timing only)",
            "machine": dict(self.machine),
            "backend": dict(self.backend),
            "noisy": self.noisy,
            "same_pattern": self.same_pattern,
        }

    def row(self) -> dict[str, Any]:
        """One flat row for tables, CSV and charts (times in ms, speedups as ratios)."""
        d, s = self.to_dict(), self.spec
        row = {k: d[k] for k in ("model", "layer", "method", "block", "nm", "norm", "seed", "precision", "sparsity_target",
                                 "sparsity_achieved", "tokens", "threads", "repeat", "stored_blocks", "sparse_bytes",
                                 "dense_bytes", "best_dense", "speedup_vs_best_dense", "speedup_vs_tvm_dense",
                                 "speedup_vs_torch_dense", "ideal_speedup", "tune_s", "compile_s", "scored_tokens",
                                 "cached")}
        row["fraction_of_ideal"] = self.speedup_vs_best_dense / self.ideal_speedup
        row["fraction_of_ideal_same_precision"] = self.speedup_vs(self.best_dense_same_precision) / self.ideal_speedup
        row["noisy"] = bool(self.noisy)
        row["pattern"] = s.label()
        row["format"], row["schedule"] = self.kernel.get("format"), self.kernel.get("schedule")
        row["shape"] = f"{self.shape[0]}x{self.shape[1]}"
        for name, t in self.times_ms.items():
            row[f"{name}_ms"], row[f"{name}_spread_ms"] = t.median, t.spread
        row["best_dense_ms"] = self.times_ms[self.best_dense].median
        row.update(self.proxies)
        row["device"] = self.device
        row["cpu"], row["tvm"], row["code"] = self.machine.get("cpu"), self.machine.get("tvm"), self.machine.get("code")
        row["conditions"] = conditions_label(self.conditions())
        return row

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Result":
        """The inverse of `to_dict`; also reads results stored before the format-neutral names."""
        d = {_OLD_NAMES.get(k, k): v for k, v in d.items()}
        times = {_OLD_NAMES.get(k, k): Timing(**v) for k, v in d["times_ms"].items()}
        spec = Spec(model=d["model"], layer=d["layer"], method=d["method"], block=parse_block(d["block"]),
                    sparsity=d["sparsity_target"], nm=None if d["nm"] is None else parse_nm(d["nm"]),
                    norm=d["norm"], tokens=d["tokens"], seed=d["seed"], threads=d["threads"],
                    repeat=d.get("repeat", times[SPARSE].runs), precision=d.get("precision", "fp32"))
        return cls(spec=spec, shape=tuple(d["shape"]), sparsity_achieved=d["sparsity_achieved"],
                   stored_blocks=d["stored_blocks"], sparse_bytes=d["sparse_bytes"], dense_bytes=d["dense_bytes"],
                   times_ms=times, tune_s=d.get("tune_s", 0.0), compile_s=d["compile_s"],
                   proxies=d["proxies"], machine=d["machine"], kernel=d.get("kernel", {}),
                   scored_tokens=d.get("scored_tokens"), step_s=d.get("step_s", {}),
                   cached=d.get("cached", False), real_weights=d.get("real_weights", True),
                   backend=d.get("backend", {}), noisy=d.get("noisy"), same_pattern=d.get("same_pattern"))


def conditions_label(c: dict[str, Any]) -> str:
    """One line naming measurement conditions, e.g. for a chart's caption or a choice between them."""
    isa = (c["isa"] or "").split()
    where = "" if c.get("device", "this machine") == "this machine" else f"{c['device']}: "
    return (f"{where}{c['cpu']} ({c['cores']} cores, {isa[-1] if isa else 'no ISA flags'}), {c['threads']} threads, "
            f"{c['tokens']} tokens, {c['repeat']} samples, TVM {c['tvm']}, PyTorch {c['torch']}, code {str(c['code'])[:8]}")


def amdahl_bound(breakdown: dict[str, float]) -> float:
    """The speedup of a whole pass (ms by operator group) if its "linears" took no time at all."""
    total = sum(breakdown.values())
    rest = total - breakdown.get("linears", 0.0)
    return total / rest if rest > 0 else float("inf")


BOUND_SLACK = 1.1  # a measured speedup may exceed its physical bound by this much before it is noise
MAX_SPREAD = 0.5  # a timing whose interquartile spread is above this fraction of its median is noise
REMEASURE = 2  # a measurement that fails its bounds is taken again this many times before it is marked noisy


def _noise(times: dict[str, Timing], bound: float, bound_name: str) -> str | None:
    """TVM sparse faster than TVM dense of its own precision (an INT8 layer: tvm_dense_int8) by more
    than BOUND_SLACK x `bound`, and every timing whose interquartile spread exceeds MAX_SPREAD of its
    median, as one line; None if neither."""
    problems = []
    dense = "tvm_dense_int8" if "tvm_dense_int8" in times else "tvm_dense"
    speedup = times[dense].median / times[SPARSE].median if dense in times else 0.0
    if speedup > BOUND_SLACK * bound:
        problems.append(f"{speedup:.2f}x vs {'TVM dense INT8' if dense != 'tvm_dense' else 'TVM dense'} is above "
                        f"its {bound_name} of {bound:.2f}x")
    for name, t in times.items():
        if t.spread > MAX_SPREAD * t.median:
            problems.append(f"{name} spread {t.spread:.3g} ms on a {t.median:.3g} ms median")
    return "; ".join(problems) or None


def model_noise(times: dict[str, Timing], breakdown: dict[str, dict[str, float]]) -> str | None:
    """Why a whole-model measurement is not a figure, or None: a speedup over TVM dense above the Amdahl
    bound (a pass cannot beat its own graph with free linears), or a timing too spread (a busy machine)."""
    dense = "tvm_dense_int8" if "tvm_dense_int8" in times else "tvm_dense"  # the dense graph of its own precision
    return _noise(times, amdahl_bound(breakdown.get(dense, {})), "Amdahl bound")


def layer_noise(times: dict[str, Timing], sparsity_achieved: float) -> str | None:
    """Why a layer measurement is not a figure, or None: a speedup over TVM dense above the ideal
    1 / (1 - s) (the kernel does (1 - s) of the work), or a timing too spread (a busy machine)."""
    return _noise(times, 1.0 / max(1.0 - sparsity_achieved, 1e-9), "ideal 1/(1-s)")


MODEL_DENSE_PEERS = {  # name -> what it is; the best dense is the fastest of these
    "tvm_dense": "TVM dense: the same compiled graph, every linear the project's scheduled dense kernel",
    "torch_eager": "PyTorch eager, dense",
    "onnxruntime": "ONNX Runtime, dense (exported with torch.onnx.export, all graph optimisations)",
    # an INT8 plan's dense peers at INT8 too (timed for INT8 plans only)
    "tvm_dense_int8": "TVM dense INT8: the same compiled graph, every linear the project's dense INT8 kernel",
    "torch_dynamic_int8": "PyTorch eager, dense, every nn.Linear dynamically quantized to INT8 (quantize_dynamic)",
    "onnxruntime_int8": "ONNX Runtime INT8, dense (the export quantized by quantize_dynamic, per-channel)",
}
MODEL_OTHER_PEERS = {  # timed in the same call, not a candidate for best dense (it is torch_eager again)
    "torch_eager_pruned": "PyTorch eager with the pruned weights stored dense (pruning alone buys no speed)",
    "tvm_sparse_fp32": "TVM sparse with the same masks in float32 kernels (an INT8 plan only: what INT8 buys)",
}


@dataclasses.dataclass(frozen=True)
class ModelResult:
    """What one whole-model experiment measured. `to_dict` is the CLI's --json object and the stored form."""

    plan: ModelPlan  # resolved
    sparsity_achieved: float  # removed weights / all weights of the encoder linears
    layers: list[dict[str, Any]]  # per linear: layer, pattern, format, sparsity_achieved, schedule, sparse_bytes, ...
    times_ms: dict[str, Timing]  # SPARSE, MODEL_DENSE_PEERS and MODEL_OTHER_PEERS, one measure call
    breakdown: dict[str, dict[str, float]]  # "tvm_sparse" / "tvm_dense" -> operator group -> ms per pass
    max_abs_error: float  # max |TVM sparse - masked PyTorch| / max |masked PyTorch| (the name)
    metrics: dict[str, float | None]  # real-label metrics of the pruned model (metrics.METRICS)
    dense_metrics: dict[str, float | None]  # the same of the unpruned model
    tune_s: float  # tuning the layers' schedules (0.0 when every winner was stored)
    compile_s: float  # compiling the sparse and the dense executables
    machine: dict[str, Any]
    step_s: dict[str, float] = dataclasses.field(default_factory=dict)
    cached: bool = False
    real_weights: bool = True
    recovery: dict[str, Any] | None = None  # None: one-shot weights; else RecoveryResult.summary()
    noisy: str | None = None  # why the figures are noise (`model_noise`, still so after re-measuring), or None

    @property
    def best_dense(self) -> str:
        return min((k for k in MODEL_DENSE_PEERS if k in self.times_ms), key=lambda k: self.times_ms[k].median)

    def speedup_vs(self, peer: str) -> float:
        return self.times_ms[peer].median / self.times_ms[SPARSE].median

    @property
    def amdahl_bound(self) -> float:
        """Speedup over TVM dense if the linears took no time at all (from the dense breakdown)."""
        return amdahl_bound(self.breakdown.get("tvm_dense", {}))

    def to_dict(self) -> dict[str, Any]:
        p = self.plan
        return {
            "plan": {**p.to_dict(), "label": p.label()},
            "sparsity_achieved": self.sparsity_achieved,
            "layers": [dict(layer) for layer in self.layers],
            "times_ms": {k: dataclasses.asdict(v) for k, v in self.times_ms.items()},
            "best_dense": self.best_dense,
            "speedup_vs_best_dense": self.speedup_vs(self.best_dense),
            "speedup_vs_torch_eager": self.speedup_vs("torch_eager"),
            "speedup_vs_tvm_dense": self.speedup_vs("tvm_dense"),
            "speedup_vs_onnxruntime": self.speedup_vs("onnxruntime") if "onnxruntime" in self.times_ms else None,
            "breakdown": {k: dict(v) for k, v in self.breakdown.items()},
            "amdahl_bound": self.amdahl_bound,
            "max_abs_error": self.max_abs_error,
            "metrics": dict(self.metrics),
            "dense_metrics": dict(self.dense_metrics),
            "tune_s": self.tune_s,
            "compile_s": self.compile_s,
            "step_s": dict(self.step_s),
            "cached": self.cached,
            "real_weights": self.real_weights,
            "accuracy_note": None if self.real_weights else
            "synthetic random weights: the accuracy figures mean nothing (timing only)",
            "machine": dict(self.machine),
            "recovery": None if self.recovery is None else dict(self.recovery),
            "noisy": self.noisy,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelResult":
        return cls(plan=ModelPlan.from_dict(d["plan"]), sparsity_achieved=d["sparsity_achieved"], layers=d["layers"],
                   times_ms={k: Timing(**v) for k, v in d["times_ms"].items()}, breakdown=d["breakdown"],
                   max_abs_error=d["max_abs_error"], metrics=d["metrics"], dense_metrics=d["dense_metrics"],
                   tune_s=d["tune_s"], compile_s=d["compile_s"], machine=d["machine"], step_s=d.get("step_s", {}),
                   cached=d.get("cached", False), real_weights=d.get("real_weights", True), recovery=d.get("recovery"),
                   noisy=d.get("noisy"))


@dataclasses.dataclass(frozen=True)
class RecoveryResult:
    """What one recovery run did. `to_dict` is the CLI's --json object and the stored form."""

    request: RecoveryRequest  # resolved
    steps_done: int  # == request.steps for a finished run
    wall_s: float  # training wall time, summed over resumed pieces
    loss: list[tuple[int, float]]  # (step, distillation loss), every 10 steps and the last
    metrics_before: dict[str, float | None]  # the one-shot pruned model (metrics.METRICS)
    metrics_after: dict[str, float | None]  # the recovered model
    dense_metrics: dict[str, float | None]  # the unpruned model
    sparsity_achieved: float  # zero weights / all weights of the encoder linears, after recovery
    resumed_from: int  # the checkpoint step this run started from (0: from the start)
    eval_s: float  # scoring before and after
    machine: dict[str, Any]
    key: str  # the cache key; the weights are `Store.recovered_weights(key)`
    cached: bool = False

    def summary(self) -> dict[str, Any]:
        """What a whole-model result measured on these weights records of them."""
        return {"recipe": self.request.recipe, "steps": self.steps_done, "key": self.key, "label": self.request.label(),
                "metrics_before": dict(self.metrics_before), "wall_s": self.wall_s}

    def to_dict(self) -> dict[str, Any]:
        return {"plan": self.request.to_dict()["plan"] | {"label": self.request.plan.label()},
                "recipe": self.request.recipe, "steps": self.steps_done, "wall_s": self.wall_s,
                "metrics_before": dict(self.metrics_before), "metrics_after": dict(self.metrics_after),
                "dense_metrics": dict(self.dense_metrics), "sparsity_achieved": self.sparsity_achieved,
                "loss": [list(p) for p in self.loss], "resumed_from": self.resumed_from, "eval_s": self.eval_s,
                "request": self.request.to_dict(), "machine": dict(self.machine), "key": self.key,
                "cached": self.cached}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RecoveryResult":
        return cls(request=RecoveryRequest.from_dict(d["request"]), steps_done=d["steps"], wall_s=d["wall_s"],
                   loss=[tuple(p) for p in d["loss"]], metrics_before=d["metrics_before"],
                   metrics_after=d["metrics_after"], dense_metrics=d["dense_metrics"],
                   sparsity_achieved=d["sparsity_achieved"], resumed_from=d["resumed_from"], eval_s=d["eval_s"],
                   machine=d["machine"], key=d["key"], cached=d.get("cached", False))
