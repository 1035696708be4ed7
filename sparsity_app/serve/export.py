"""Export a pruned (or recovered) model: a Hugging Face folder, the compiled sparse library, the results.

export_model(plan, out_dir, weights=None) writes into out_dir (new or empty):
  hf/                     the pruned model as a Hugging Face folder (config.json, model.safetensors,
                          tokenizer files): `transformers.AutoModel.from_pretrained("hf")` loads it
  sparse_model.so         the compiled sparse encoder (TVM Relax VM executable, `export_library`);
                          every weight is baked into it as a constant (no params file)
  sparse_model.json       what it was compiled for: batch, seq, hidden, vocab, inputs, output
  run_sparse_model.py     a standalone loader (only TVM and NumPy): token ids in, last hidden state out
  result.json             the whole-model result (ModelResult.to_dict) of the plan
  layers.csv              its per-layer table
  manifest.json           the plan, where the weights came from, the files

weights: layer -> float32 [out, in], already masked, in place of the one-shot pruned weights (what
a recovery fine-tune passes); the sparse formats are built from their nonzeros, and their metrics
are measured again (timing is the plan's: the same pattern runs at the same speed).
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import os
import pathlib
import sys
import tempfile
import zipfile

import numpy as np

from sparsity_app.accuracy import metrics
from sparsity_app.core.errors import UserError
from sparsity_app.core.requests import ModelPlan, ResolvedPlan, Spec, default_threads
from sparsity_app.core.results import ModelResult
from sparsity_app.kernels import set_threads
from sparsity_app.model import baselines, graph
from sparsity_app.model.catalog import get_model
from sparsity_app.model.pruned import pruned_weights
from sparsity_app.runs.model import run_model
from sparsity_app.runs.pipeline import Progress, StepClock, quiet

STEPS = ("check", "measure", "hf", "evaluate", "compile", "library", "results")
LIBRARY, META, LOADER = "sparse_model.so", "sparse_model.json", "run_sparse_model.py"


def export_model(resolved: ResolvedPlan, out_dir: str | os.PathLike, weights: dict[str, np.ndarray] | None = None,
                 store=None, progress: Progress = quiet, force: bool = False,
                 result: ModelResult | None = None) -> pathlib.Path:
    """Write every export of the resolved plan into out_dir (see the module docstring); returns its path.

    weights: layer -> float32 [out, in], already masked, overriding the one-shot pruned weights.
    result: the plan's ModelResult if the caller has it (else it is measured, or read from the store).
    force: write into an existing non-empty directory (files of the same name are replaced).
    Raises UserError for a non-empty out_dir without force, or weights that do not fit the plan.
    """
    out = pathlib.Path(out_dir)
    clock = StepClock(progress, STEPS)
    with clock.step("check", f"checking the plan, the weights and {out}"):
        plan, specs = resolved.plan, resolved.specs
        check_out_dir(out, force)
        pruned = final_weights(plan, specs, weights)
    if result is None:
        with clock.step("measure", "the plan's whole-model result (stored, or measured now)"):
            result = run_model(resolved, store=store, progress=lambda s, d: progress("measure", f"{s}: {d}"))
    out.mkdir(parents=True, exist_ok=True)
    with clock.step("hf", "the pruned model as a Hugging Face folder (safetensors)"):
        model = get_model(plan.model)
        reference = model.pruned_copy(pruned)
        write_hf_folder(reference, model.tokenizer(), out / "hf")
    if weights is not None and model.real_weights:
        with clock.step("evaluate", "real-label metrics of the given weights"):
            result = dataclasses.replace(result, metrics=metrics.evaluate(
                reference, model.tokenizer(), metrics.reference_embeddings(plan.model)), cached=False)
    with clock.step("compile", "tuning (stored winners) and compiling the sparse encoder, checked against PyTorch"):
        encoder = compile_plan(plan, specs, pruned, store)
    with clock.step("library", f"exporting the library and its loader ({LIBRARY}, {LOADER})"):
        write_library(encoder, out)
    with clock.step("results", "result.json and layers.csv"):
        write_results(result, out)
        manifest = {"plan": result.to_dict()["plan"], "weights": "one-shot pruned" if weights is None else "given" if result.recovery is None
                    else f"recovered: {result.recovery['label']}",
                    "files": sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()),
                    "library_weights": "baked into sparse_model.so as constants"}
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


def check_out_dir(out: pathlib.Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a new or empty directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"--out {out} is not empty; give a new or empty directory, or --force to replace its files")


def final_weights(plan: ModelPlan, specs: dict[str, Spec | None], weights: dict[str, np.ndarray] | None
                  ) -> dict[str, np.ndarray]:
    """layer -> float32 [out, in] of every encoder linear: the one-shot pruned weights, with `weights` in
    place of those it names. UserError for an unknown layer, a wrong shape, or a weight that does not
    fit its layer's pattern (a block or N:M group the plan does not allow)."""
    _, pruned = pruned_weights(plan.model, specs)
    for name, w in (weights or {}).items():
        if name not in pruned:
            raise UserError(f"weights name unknown layer {name!r}; the plan's layers are {next(iter(pruned))}, ...")
        w = np.asarray(w, np.float32)
        if w.shape != pruned[name].shape:
            raise UserError(f"weights[{name!r}] must be [out, in] = {list(pruned[name].shape)}, got {list(w.shape)}")
        if specs[name] is not None:
            mask_of_weights(w, specs[name])  # raises if it does not fit
        pruned[name] = w
    return pruned


def mask_of_weights(weight: np.ndarray, spec: Spec) -> np.ndarray:
    """The keep-mask, bool [out, in], of already-masked weights under spec's pattern: for N:M the N
    largest |w| of each group of M inputs (their nonzeros must fit in it), else every block of
    spec.block holding a nonzero. UserError if the nonzeros do not fit the pattern."""
    out_f, in_f = weight.shape
    if spec.nm is not None:
        n, m = spec.nm
        groups = np.abs(weight).reshape(out_f, in_f // m, m)
        order = np.argsort(-groups, axis=2, kind="stable")[..., :n]
        mask = np.zeros(groups.shape, bool)
        np.put_along_axis(mask, order, True, axis=2)
        mask = mask.reshape(out_f, in_f)
        if np.any((weight != 0) & ~mask):
            raise UserError(f"weights of {spec.layer} keep more than {n} of some group of {m} inputs: not {n}:{m}")
        return mask
    bs_r, bs_c = spec.block
    present = (weight != 0).reshape(out_f // bs_r, bs_r, in_f // bs_c, bs_c).any(axis=(1, 3))
    return np.repeat(np.repeat(present, bs_r, axis=0), bs_c, axis=1)


def compile_plan(plan: ModelPlan, specs: dict[str, Spec | None], pruned: dict[str, np.ndarray], store=None):
    """The plan's sparse encoder (graph.Encoder) with `pruned` weights, each linear on its tuned schedule,
    verified against the PyTorch model with the same weights (relative error <= 1e-4; an INT8 plan:
    against the model whose linears compute the INT8 arithmetic, within `graph.tolerance`)."""
    model = get_model(plan.model)
    threads = plan.threads or default_threads()
    set_threads(threads)
    hf = model.torch_model()
    masks = {name: np.ones(pruned[name].shape, bool) if spec is None else mask_of_weights(pruned[name], spec)
             for name, spec in specs.items()}
    biases = {name: model.weight(name)[1] for name in specs}
    linears = graph.plan_linears(plan.model, specs, pruned, masks, biases, plan.batch * plan.tokens, threads, store,
                                 precision=plan.precision)
    plans = {name: linear for name, (linear, _) in linears.items()}
    encoder = graph.compile_encoder(hf, hf, plans, plan.batch, plan.tokens)
    ids, attention = baselines.example_inputs(model.tokenizer(), plan.batch, plan.tokens)
    reference = graph.reference_model(hf, plans) if plan.precision == "int8" else model.pruned_copy(pruned)
    graph.verify(encoder, reference, ids, attention, graph.tolerance(plan.precision))
    return encoder


def write_hf_folder(model, tokenizer, folder: pathlib.Path) -> None:
    """A BertModel (e.g. a pruned copy) and its tokenizer as a Hugging Face folder (model.safetensors)."""
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))


def write_library(encoder, folder: pathlib.Path) -> None:
    """sparse_model.so (weights baked in), sparse_model.json and run_sparse_model.py into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    with _native_stderr_silenced():  # TVM logs one "Scope Saving" warning per function to fd 2
        encoder.executable.export_library(str(folder / LIBRARY))
    meta = {"library": LIBRARY, "batch": encoder.batch, "seq": encoder.seq, "hidden": encoder.hidden,
            "vocab": encoder.vocab, "function": "main",
            "inputs": {"input_ids": f"int64 [{encoder.batch}, {encoder.seq}]",
                       "attention_mask": f"int64 [{encoder.batch}, {encoder.seq}] (1 = token, 0 = padding)"},
            "output": f"last_hidden_state float32 [{encoder.batch}, {encoder.seq}, {encoder.hidden}]",
            "weights": "baked into the library as constants", "description": encoder.description}
    (folder / META).write_text(json.dumps(meta, indent=2))
    (folder / LOADER).write_text(LOADER_SOURCE)


@contextlib.contextmanager
def _native_stderr_silenced():
    """fd 2 to /dev/null for a native call's log lines (errors still raise as Python exceptions)."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


LOADER_SOURCE = '''"""Run the exported sparse encoder with only TVM and NumPy (no sparsity_app, no torch).

    python run_sparse_model.py ids.npy [mask.npy] --out hidden.npy
    python run_sparse_model.py --demo              # runs [CLS] ... [SEP] ids, prints the output's shape

ids.npy / mask.npy: int64 [batch, seq] as sparse_model.json says (mask: 1 = token, 0 = padding;
default all ones). Writes last_hidden_state, float32 [batch, seq, hidden], to --out.
From Python: `SparseModel(folder)(ids, mask)` returns the same array.
"""
import argparse
import json
import os
import sys

import numpy as np
import tvm
from tvm import relax

HERE = os.path.dirname(os.path.abspath(__file__))


class SparseModel:
    def __init__(self, folder=HERE):
        with open(os.path.join(folder, "sparse_model.json")) as f:
            self.meta = json.load(f)
        sys.stderr.flush()
        saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)  # TVM logs one "Scope Loaded" warning per function; errors still raise
        try:
            library = tvm.runtime.load_module(os.path.join(folder, self.meta["library"]))
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(null)
        self.vm = relax.VirtualMachine(library, tvm.cpu())

    def __call__(self, input_ids, attention_mask=None):
        shape = (self.meta["batch"], self.meta["seq"])
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        mask = np.ones(shape, np.int64) if attention_mask is None else np.ascontiguousarray(attention_mask, np.int64)
        if ids.shape != shape or mask.shape != shape:
            raise SystemExit(f"input_ids and attention_mask must be int64 {list(shape)}, got {list(ids.shape)} "
                             f"and {list(mask.shape)}")
        if ids.min() < 0 or ids.max() >= self.meta["vocab"]:
            raise SystemExit(f"input_ids must be in [0, {self.meta['vocab']})")
        out = self.vm[self.meta["function"]](tvm.runtime.tensor(ids), tvm.runtime.tensor(mask))
        return out.numpy()


def main(argv=None):
    p = argparse.ArgumentParser(description="Run the exported sparse encoder (TVM + NumPy only).")
    p.add_argument("ids", nargs="?", help="int64 [batch, seq] token ids (.npy)")
    p.add_argument("mask", nargs="?", help="int64 [batch, seq] attention mask (.npy); default all ones")
    p.add_argument("--out", help="where to write last_hidden_state (.npy)")
    p.add_argument("--demo", action="store_true", help="run [CLS] 1000.. [SEP] ids and print the output's shape")
    args = p.parse_args(argv)
    model = SparseModel()
    batch, seq = model.meta["batch"], model.meta["seq"]
    if args.demo:
        ids = np.tile(np.r_[101, np.arange(1000, 1000 + seq - 2), 102][:seq], (batch, 1)).astype(np.int64)
        hidden = model(ids)
        print(f"last_hidden_state {list(hidden.shape)} float32, mean {hidden.mean():.6f}")
        return 0
    if not args.ids or not args.out:
        p.error("give ids.npy and --out hidden.npy (or --demo)")
    hidden = model(np.load(args.ids), None if args.mask is None else np.load(args.mask))
    np.save(args.out, hidden)
    return 0


if __name__ == "__main__":
    sys.exit(main())
'''


def write_results(result: ModelResult, folder: pathlib.Path) -> None:
    """result.json (ModelResult.to_dict) and layers.csv (its per-layer table) into `folder`."""
    (folder / "result.json").write_text(json.dumps(result.to_dict(), indent=2))
    rows = [dict(layer) for layer in result.layers]
    if rows:
        with open(folder / "layers.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


def zip_bytes(resolved: ResolvedPlan, weights: dict[str, np.ndarray] | None = None, store=None,
              progress: Progress = quiet, result: ModelResult | None = None) -> bytes:
    """Every export of the resolved plan as one zip archive in memory (for a download button; no user path)."""
    with tempfile.TemporaryDirectory(prefix="sparsity-export-") as tmp:
        folder = export_model(resolved, pathlib.Path(tmp) / "export", weights=weights, store=store, progress=progress,
                              result=result)
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    z.write(path, path.relative_to(folder).as_posix())
        return buffer.getvalue()


__all__ = ["export_model", "zip_bytes", "write_hf_folder", "write_library", "write_results", "compile_plan",
           "final_weights", "mask_of_weights", "STEPS", "UserError"]
