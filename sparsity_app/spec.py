"""The request (`Spec`) and the measured answer (`Result`): data flows spec -> experiment -> result.

A resolved `Spec` is canonical (fields a method ignores are set to fixed values) so that two
requests that mean the same experiment share one cache entry.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

from .errors import UserError

BLOCK_PRESETS = ("32x1", "16x1", "8x1", "4x1", "1x32", "4x4", "8x8", "16x16", "1x1")
NM_PRESETS = ("2:4", "1:4", "4:8")
NORMS = ("l2", "l1")
MAX_SPARSITY = 0.99
MAX_REPEAT = 200


def parse_block(text: str) -> tuple[int, int]:
    """'32x1' -> (32, 1): bs_r (rows of W, i.e. output features) x bs_c (input features)."""
    m = re.fullmatch(r"\s*(\d{1,6})\s*[xX*]\s*(\d{1,6})\s*", str(text))  # 6 digits: no int() of a huge string
    if not m or int(m[1]) < 1 or int(m[2]) < 1:
        raise UserError(f"block must look like 32x1 (bs_r x bs_c, both >= 1), got {str(text)[:40]!r}")
    return int(m[1]), int(m[2])


def parse_nm(text: str) -> tuple[int, int]:
    """'2:4' -> (2, 4): keep N of every M consecutive weights along the input dimension."""
    m = re.fullmatch(r"\s*(\d{1,6})\s*:\s*(\d{1,6})\s*", str(text))
    if not m:
        raise UserError(f"N:M must look like 2:4, got {str(text)[:40]!r}")
    n, mm = int(m[1]), int(m[2])
    if not 1 <= n < mm:
        raise UserError(f"N:M needs 1 <= N < M, got {n}:{mm}")
    return n, mm


def fmt_block(block: tuple[int, int]) -> str:
    return f"{block[0]}x{block[1]}"


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclasses.dataclass(frozen=True)
class Spec:
    """One experiment. Frozen and hashable: once resolved it is the cache key (with the machine)."""

    model: str = "minilm-l6"  # catalog name, see models.MODEL_NAMES
    layer: str = "encoder.layer.0.attention.self.query"  # dotted name of an nn.Linear
    method: str = "block"  # pruning.METHODS: magnitude | block | nm | random | wanda
    block: tuple[int, int] = (32, 1)  # (bs_r, bs_c): rows of W (outputs) x columns (inputs)
    sparsity: float = 0.9  # target fraction of weights removed, in [0, 0.99]
    nm: tuple[int, int] | None = None  # (N, M): keep N of every M inputs; method nm, or random
    norm: str = "l2"  # block score: l1 or l2 norm of the tile (method block only)
    tokens: int = 128  # rows of X: real calibration tokens fed to the layer
    seed: int = 0  # random pruning's seed
    threads: int = 0  # threads for every kernel; 0 = all cores
    repeat: int = 25  # timed samples per implementation (more: a steadier median)

    def resolve(self, cores: int | None = None) -> "Spec":
        """Validate everything that needs no model, and return the canonical form.

        cores: threads the measuring device has (default: this machine's; a remote device's for RPC).
        Raises UserError with one line that says what to change.
        """
        from .models import MAX_TOKENS
        from .pruning import METHODS

        if self.method not in METHODS:
            raise UserError(f"unknown pruning method {self.method!r}; valid methods: {', '.join(METHODS)}")
        if self.norm not in NORMS:
            raise UserError(f"unknown norm {self.norm!r}; valid norms: {', '.join(NORMS)}")
        if not isinstance(self.tokens, int) or not 1 <= self.tokens <= MAX_TOKENS:
            raise UserError(f"tokens must be an integer in [1, {MAX_TOKENS}], got {self.tokens}")
        if not isinstance(self.repeat, int) or not 3 <= self.repeat <= MAX_REPEAT:
            raise UserError(f"repeat must be an integer in [3, {MAX_REPEAT}], got {self.repeat}")
        cores = cores or default_threads()
        if not isinstance(self.threads, int) or not 0 <= self.threads <= cores:
            raise UserError(f"threads must be between 1 and {cores} on the measuring device "
                            f"(0 = all cores), got {self.threads}")
        block = tuple(int(b) for b in self.block)
        if len(block) != 2 or min(block) < 1:
            raise UserError(f"block must be two positive sizes bs_r x bs_c, got {self.block}")
        nm = None if self.nm is None else tuple(int(v) for v in self.nm)
        if nm is not None and not 1 <= nm[0] < nm[1]:
            raise UserError(f"N:M needs 1 <= N < M, got {nm[0]}:{nm[1]}")
        if self.method == "nm" and nm is None:
            raise UserError("method nm needs an N:M pattern, e.g. --nm 2:4")
        sparsity = float(self.sparsity)
        if self.method == "nm" or (self.method in ("random", "wanda") and nm is not None):
            sparsity, block = 1 - nm[0] / nm[1], (1, 1)  # N:M fixes the sparsity; stored weight by weight
        else:
            nm = None
            if not 0.0 <= sparsity <= MAX_SPARSITY:
                raise UserError(f"sparsity must be in [0, {MAX_SPARSITY}], got {self.sparsity}")
            if self.method == "magnitude":
                block = (1, 1)
        norm = self.norm if self.method in ("block", "wanda") and block != (1, 1) else "l2"
        seed = self.seed if self.method == "random" else 0
        return dataclasses.replace(self, block=block, nm=nm, sparsity=round(sparsity, 6), norm=norm,
                                   seed=int(seed), threads=self.threads or cores)

    def check_shape(self, shape: tuple[int, int]) -> None:
        """Raise UserError unless the block (or N:M group) tiles a weight of `shape` (out, in)."""
        out_f, in_f = shape
        bs_r, bs_c = self.block
        if out_f % bs_r:
            raise UserError(f"block {fmt_block(self.block)} does not divide layer {self.layer} {out_f}x{in_f}: "
                            f"bs_r={bs_r} must divide the output dimension {out_f}")
        if in_f % bs_c:
            raise UserError(f"block {fmt_block(self.block)} does not divide layer {self.layer} {out_f}x{in_f}: "
                            f"bs_c={bs_c} must divide the input dimension {in_f}")
        if self.nm is not None and in_f % self.nm[1]:
            raise UserError(f"N:M {self.nm[0]}:{self.nm[1]} does not fit layer {self.layer}: "
                            f"M={self.nm[1]} must divide the input dimension {in_f}")

    def label(self) -> str:
        """Short name of the pattern, e.g. 'block 32x1', 'nm 2:4', 'magnitude'."""
        if self.nm is not None:
            seed = f" seed {self.seed}" if self.method == "random" and self.seed else ""
            return f"{self.method} {self.nm[0]}:{self.nm[1]}{seed}"
        if self.method == "wanda" and self.block == (1, 1):
            return "wanda"
        if self.method == "magnitude":
            return "magnitude"
        seed = f" seed {self.seed}" if self.method == "random" and self.seed else ""
        norm = f" {self.norm}" if self.method in ("block", "wanda") and self.norm != "l2" else ""
        return f"{self.method} {fmt_block(self.block)}{norm}{seed}"


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
    # where it was measured (backend.py): kind, device, measured_on {name: where}, not_measured
    # {name: why}, tuned_on; empty for results from before remote devices (all on this machine)
    backend: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def device(self) -> str:
        """The device the kernels were timed on, e.g. 'this machine' or 'RPC key rasp4 (cortex-a72)'."""
        return self.backend.get("device", "this machine")

    @property
    def best_dense(self) -> str:
        """Name (a DENSE_PEERS key) of the fastest dense peer timed with this result."""
        return min((k for k in DENSE_PEERS if k in self.times_ms), key=lambda k: self.times_ms[k].median)

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
        }

    def row(self) -> dict[str, Any]:
        """One flat row for tables, CSV and charts (times in ms, speedups as ratios)."""
        d, s = self.to_dict(), self.spec
        row = {k: d[k] for k in ("model", "layer", "method", "block", "nm", "norm", "seed", "sparsity_target",
                                 "sparsity_achieved", "tokens", "threads", "repeat", "stored_blocks", "sparse_bytes",
                                 "dense_bytes", "best_dense", "speedup_vs_best_dense", "speedup_vs_tvm_dense",
                                 "speedup_vs_torch_dense", "ideal_speedup", "tune_s", "compile_s", "scored_tokens",
                                 "cached")}
        row["fraction_of_ideal"] = self.speedup_vs_best_dense / self.ideal_speedup
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
                    repeat=d.get("repeat", times[SPARSE].runs))
        return cls(spec=spec, shape=tuple(d["shape"]), sparsity_achieved=d["sparsity_achieved"],
                   stored_blocks=d["stored_blocks"], sparse_bytes=d["sparse_bytes"], dense_bytes=d["dense_bytes"],
                   times_ms=times, tune_s=d.get("tune_s", 0.0), compile_s=d["compile_s"],
                   proxies=d["proxies"], machine=d["machine"], kernel=d.get("kernel", {}),
                   scored_tokens=d.get("scored_tokens"), step_s=d.get("step_s", {}),
                   cached=d.get("cached", False), real_weights=d.get("real_weights", True),
                   backend=d.get("backend", {}))


def conditions_label(c: dict[str, Any]) -> str:
    """One line naming measurement conditions, e.g. for a chart's caption or a choice between them."""
    isa = (c["isa"] or "").split()
    where = "" if c.get("device", "this machine") == "this machine" else f"{c['device']}: "
    return (f"{where}{c['cpu']} ({c['cores']} cores, {isa[-1] if isa else 'no ISA flags'}), {c['threads']} threads, "
            f"{c['tokens']} tokens, {c['repeat']} samples, TVM {c['tvm']}, PyTorch {c['torch']}, code {str(c['code'])[:8]}")


# The model level ------------------------------------------------------------------------------------

ROLES = {  # role name -> the BERT sublayers it covers (overrides may name a role instead of a layer glob)
    "q": ("attention.self.query",), "k": ("attention.self.key",), "v": ("attention.self.value",),
    "qkv": ("attention.self.query", "attention.self.key", "attention.self.value"),
    "attention-output": ("attention.output.dense",),
    "ffn-in": ("intermediate.dense",), "ffn-out": ("output.dense",),
}
MAX_BATCH, MAX_SEQ = 8, 512  # batch * tokens rows stay within a single layer's MAX_TOKENS (4096)


@dataclasses.dataclass(frozen=True)
class ModelPlan:
    """Prune a whole model: a default pattern for every encoder linear, then per-layer overrides.

    Frozen and hashable: once resolved it is the cache key of a model result (with the machine).
    An override is "TARGET=VALUE": TARGET a role (ROLES: q, k, v, qkv, attention-output, ffn-in,
    ffn-out) or a glob on the layer name (`attention.self.*`, `encoder.layer.0.*`); VALUE a
    sparsity (`0.7`), `dense` (the layer is not pruned), a block at a sparsity (`16x1@0.8`) or an
    N:M pattern (`2:4`). Overrides apply in order; the last that matches a layer wins.
    """

    model: str = "minilm-l6"  # catalog name, see models.MODEL_NAMES
    method: str = "block"  # default pattern's pruning method (pruning.METHODS)
    block: tuple[int, int] = (32, 1)  # default (bs_r, bs_c)
    sparsity: float = 0.9  # default fraction of each layer's weights removed
    nm: tuple[int, int] | None = None  # default N:M (method nm, or random N:M)
    norm: str = "l2"  # block score norm
    seed: int = 0  # random pruning's seed
    overrides: tuple[str, ...] = ()  # "TARGET=VALUE" strings, applied in order
    tokens: int = 128  # sequence length (tokens per input)
    batch: int = 1  # inputs per call; the kernels see batch * tokens rows
    threads: int = 0  # threads for every implementation; 0 = all cores
    repeat: int = 25  # timed samples per implementation

    def resolve(self) -> "ModelPlan":
        """Validate everything that needs no weights; the canonical form. UserError names what to change."""
        if not isinstance(self.batch, int) or not 1 <= self.batch <= MAX_BATCH:
            raise UserError(f"batch must be an integer in [1, {MAX_BATCH}], got {self.batch}")
        if not isinstance(self.tokens, int) or not 2 <= self.tokens <= MAX_SEQ:  # [CLS] and [SEP] at least
            raise UserError(f"tokens (the sequence length) must be an integer in [2, {MAX_SEQ}], got {self.tokens}")
        default = self._layer_spec("encoder.layer.0.attention.self.query", self._default_fields()).resolve()
        overrides = tuple(_canonical_override(o) for o in self.overrides)
        return dataclasses.replace(self, method=default.method, block=default.block, sparsity=default.sparsity,
                                   nm=default.nm, norm=default.norm, seed=default.seed, overrides=overrides,
                                   threads=default.threads)

    def _default_fields(self) -> dict[str, Any]:
        return dict(method=self.method, block=self.block, sparsity=self.sparsity, nm=self.nm, norm=self.norm,
                    seed=self.seed)

    def _layer_spec(self, layer: str, fields: dict[str, Any]) -> Spec:
        return Spec(model=self.model, layer=layer, tokens=self.batch * self.tokens, threads=self.threads,
                    repeat=self.repeat, **fields)

    def layer_specs(self, layers: list[tuple[str, tuple[int, int]]]) -> dict[str, Spec | None]:
        """layer -> its resolved single-layer Spec, or None for a layer left dense.

        layers: (name, (out, in)) of every prunable layer. Raises UserError naming the first layer
        whose pattern does not fit it.
        """
        out: dict[str, Spec | None] = {}
        for name, shape in layers:
            fields: dict[str, Any] | None = self._default_fields()
            for override in self.overrides:
                target, value = override.split("=", 1)
                if _matches(target, name):
                    fields = _apply(fields or self._default_fields(), value)
            if fields is None or (fields["nm"] is None and fields["method"] != "nm" and fields["sparsity"] == 0):
                out[name] = None
                continue
            spec = self._layer_spec(name, fields).resolve()
            spec.check_shape(shape)
            out[name] = spec
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: block "32x1", nm "2:4" or None, overrides a list (and `from_dict` reads it back)."""
        return {**dataclasses.asdict(self), "block": fmt_block(self.block),
                "nm": None if self.nm is None else f"{self.nm[0]}:{self.nm[1]}", "overrides": list(self.overrides)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelPlan":
        p = {k: v for k, v in d.items() if k != "label"}
        return cls(**{**p, "block": parse_block(p["block"]), "nm": None if p["nm"] is None else parse_nm(p["nm"]),
                      "overrides": tuple(p["overrides"])})

    def label(self) -> str:
        pattern = self._layer_spec("", self._default_fields()).label()
        at = "" if self.nm is not None else f" at {self.sparsity:g}"
        extra = f", {len(self.overrides)} override(s)" if self.overrides else ""
        return f"{pattern}{at}{extra}"


def _matches(target: str, layer: str) -> bool:
    import fnmatch

    if target in ROLES:  # the sublayer after "encoder.layer.N.", exactly (output.dense is not attention.output.dense)
        return re.sub(r"^encoder\.layer\.\d+\.", "", layer) in ROLES[target]
    return fnmatch.fnmatchcase(layer, target) or fnmatch.fnmatchcase(layer, "*." + target)


def _apply(fields: dict[str, Any] | None, value: str) -> dict[str, Any] | None:
    """The layer's pruning fields after an override VALUE (None = left dense)."""
    if value == "dense":
        return None
    fields = dict(fields)
    if ":" in value:
        fields.update(method=fields["method"] if fields["method"] in ("random", "wanda") else "nm", nm=parse_nm(value))
    elif "@" in value:
        block, sparsity = value.split("@", 1)
        fields.update(block=parse_block(block), sparsity=float(sparsity), nm=None,
                      method=fields["method"] if fields["method"] in ("block", "random", "wanda") else "block")
    else:
        fields.update(sparsity=float(value))
        if fields["nm"] is not None:  # a sparsity, not a pattern: unstructured
            fields.update(method="wanda" if fields["method"] == "wanda" else "magnitude", nm=None, block=(1, 1))
    return fields


def _canonical_override(text: str) -> str:
    """Check one "TARGET=VALUE" override; returns it stripped. UserError says what is wrong."""
    target, sep, value = str(text).partition("=")
    target, value = target.strip(), value.strip()
    if not sep or not target or not value:
        raise UserError(f"an override must look like 'attention.self.*=0.7' or 'ffn-in=dense', got {text!r}")
    if any(c in target for c in "/\\") or target.startswith("."):
        raise UserError(f"override target {target!r} must be a role ({', '.join(ROLES)}) or a layer-name glob")
    try:
        if value != "dense":
            if ":" in value:
                parse_nm(value)
            elif "@" in value:
                block, sparsity = value.split("@", 1)
                parse_block(block)
                _check_sparsity(float(sparsity))
            else:
                _check_sparsity(float(value))
    except ValueError as e:
        raise UserError(f"override {text!r}: the value must be a sparsity (0.7), 'dense', a block at a sparsity "
                        f"(16x1@0.8) or an N:M pattern (2:4); {e}") from None
    return f"{target}={value}"


def _check_sparsity(s: float) -> None:
    if not 0.0 <= s <= MAX_SPARSITY:
        raise UserError(f"sparsity must be in [0, {MAX_SPARSITY}], got {s}")


def amdahl_bound(breakdown: dict[str, float]) -> float:
    """The speedup of a whole pass (ms by operator group) if its "linears" took no time at all."""
    total = sum(breakdown.values())
    rest = total - breakdown.get("linears", 0.0)
    return total / rest if rest > 0 else float("inf")


MODEL_DENSE_PEERS = {  # name -> what it is; the best dense is the fastest of these
    "tvm_dense": "TVM dense: the same compiled graph, every linear the project's scheduled dense kernel",
    "torch_eager": "PyTorch eager, dense",
    "onnxruntime": "ONNX Runtime, dense (exported with torch.onnx.export, all graph optimisations)",
}
MODEL_OTHER_PEERS = {  # timed in the same call, not a candidate for best dense (it is torch_eager again)
    "torch_eager_pruned": "PyTorch eager with the pruned weights stored dense (pruning alone buys no speed)",
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
    recovery: dict[str, Any] | None = None  # None: one-shot weights; else recovery.RecoveryResult.summary()

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
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelResult":
        return cls(plan=ModelPlan.from_dict(d["plan"]), sparsity_achieved=d["sparsity_achieved"], layers=d["layers"],
                   times_ms={k: Timing(**v) for k, v in d["times_ms"].items()}, breakdown=d["breakdown"],
                   max_abs_error=d["max_abs_error"], metrics=d["metrics"], dense_metrics=d["dense_metrics"],
                   tune_s=d["tune_s"], compile_s=d["compile_s"], machine=d["machine"], step_s=d.get("step_s", {}),
                   cached=d.get("cached", False), real_weights=d.get("real_weights", True), recovery=d.get("recovery"))
