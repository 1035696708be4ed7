"""The kernel benchmark (a command, never a test): `python -m sparsity_app bench [--json]`.

For each weight shape and sparsity, every implementation is timed in one `measure` call, so the
ratios in a row compare like with like. Weights are seeded Gaussian (only timing matters here);
masks come from the same pruning methods the app uses.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings

import numpy as np
import scipy.sparse
import torch

from sparsity_app.core.errors import UserError
from sparsity_app.core.requests import Spec, default_threads, parse_block, parse_floats
from sparsity_app.core.store import Store
from sparsity_app.kernels import host_isa, set_threads
from sparsity_app.kernels.peers import dense_peers
from sparsity_app.measure import tuner
from sparsity_app.measure.locks import measurement_slot
from sparsity_app.measure.timing import fingerprint, measure
from sparsity_app.measure.tuner import check_output
from sparsity_app.prune.methods import prune
from sparsity_app.runs import resolve

BLOCKS = ((32, 1), (16, 1), (8, 1), (4, 4), (8, 8), (16, 16), (1, 32))
INT8_BLOCKS = ((32, 4), (16, 4), (8, 4), (4, 4), (1, 4))  # INT8 needs a multiple of 4 input columns
NMS = ((2, 4), (1, 4))  # timed at their own sparsity (1 - N/M), beside unstructured at the same one


def _peer(name: str, w: np.ndarray, mask: np.ndarray, x: np.ndarray, block: tuple[int, int]):
    """(run, bytes) of a sparse library computing Y^T = (W * mask) @ X^T."""
    wp, xt = w * mask, np.ascontiguousarray(x.T)
    if name.startswith("SciPy BSR"):
        m = scipy.sparse.bsr_matrix(wp, blocksize=block)
        m.eliminate_zeros()
    else:
        m = scipy.sparse.csr_matrix(wp)
    nbytes = m.data.nbytes + m.indices.nbytes + m.indptr.nbytes
    if name.startswith("PyTorch"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
            t, txt = torch.from_numpy(wp).to_sparse_csr(), torch.from_numpy(xt)
        return (lambda: torch.sparse.mm(t, txt)), nbytes
    return (lambda: m @ xt), nbytes


PEERS = {"PyTorch CSR (MKL)": (1, 1), "SciPy CSR": (1, 1), "SciPy BSR 32x1": (32, 1)}  # name -> mask block


DENSE_TITLES = {"torch_dense": "PyTorch dense", "torch_dense_fm": "PyTorch dense, feature-major", "tvm_dense": "TVM dense",
                "tvm_dense_int8": "TVM dense INT8", "torch_dynamic_int8": "PyTorch dynamic INT8"}
INT8_DENSE = ("TVM dense INT8", "PyTorch dynamic INT8")


def _dense_rows(w: np.ndarray, x: np.ndarray, precisions: tuple[str, ...]) -> dict:
    """The dense peers of `run` (kernels.peers), in both layouts and at each precision, each checked
    against NumPy first (an INT8 peer against its own arithmetic: `expected`)."""
    want = x.astype(np.float64) @ w.astype(np.float64).T
    rows = {}
    for name, peer in dense_peers(w, x, "int8" if "int8" in precisions else "fp32").items():
        reference, tolerance = tuner.expected_of(peer, want)
        check_output(DENSE_TITLES[name], peer.output(), reference, tolerance)
        rows[DENSE_TITLES[name]] = peer.run
    return rows


def _patterns(shape: tuple[int, int], s: float, sweep: bool, precisions: tuple[str, ...] = ("fp32",)
              ) -> list[tuple[str, Spec]]:
    """(row name, pattern) of every TVM sparse row timed at sparsity s on this shape."""
    out = []
    if sweep and "int8" in precisions:
        out += [(f"TVM BSR INT8 {b[0]}x{b[1]}", Spec(method="block", block=b, sparsity=s, precision="int8"))
                for b in INT8_BLOCKS if not (shape[0] % b[0] or shape[1] % b[1])]
    if "fp32" not in precisions:
        return out
    if sweep:
        out += [(f"TVM BSR {b[0]}x{b[1]}", Spec(method="block", block=b, sparsity=s)) for b in BLOCKS
                if not (shape[0] % b[0] or shape[1] % b[1])]
    out.append(("TVM CSR (1x1)", Spec(method="magnitude", block=(1, 1), sparsity=s)))
    out += [(f"TVM N:M {n}:{m}", Spec(method="nm", nm=(n, m))) for n, m in NMS
            if shape[1] % m == 0 and abs((1 - n / m) - s) < 1e-9]
    return out


def bench_shape(shape: tuple[int, int], sparsities, tokens: int, threads: int, repeat: int, store,
                precisions: tuple[str, ...] = ("fp32",)) -> list[dict]:
    """Rows of one shape: every dense peer and sparse kernel per sparsity, each sparsity in one `measure`.

    speedup_vs_best_dense: against the fastest dense row at any precision (`best_dense` names it);
    fraction_of_ideal: the speedup over the fastest dense of the row's own precision, over 1/(1-s).
    """
    set_threads(threads)
    rng = np.random.default_rng(0)
    w = rng.standard_normal(shape, dtype=np.float32)
    x = rng.standard_normal((tokens, shape[1]), dtype=np.float32)
    dense = _dense_rows(w, x, precisions)
    nm_sparsities = [1 - n / m for n, m in NMS if shape[1] % m == 0]
    rows = []
    for s in sorted({*sparsities, *(v for v in nm_sparsities if not any(abs(v - t) < 1e-9 for t in sparsities))}):
        # INT8 dense reads int8 codes, a float32 scale and an int32 code sum per row
        fns, meta = dict(dense), {name: (0.0, w.size + 8 * w.shape[0] if name in INT8_DENSE else w.nbytes, None)
                                  for name in dense}
        for name, spec in _patterns(shape, s, any(abs(s - t) < 1e-9 for t in sparsities), precisions):
            spec = resolve.spec(spec)
            mask = prune(w, spec)
            family, weight = tuner.sparse_format(w, mask, spec)
            reference = tuner.reference_of(family, weight, x, w * mask)
            tuning = tuner.best_schedule(family, weight, x, reference, spec, threads, store)
            kernel = tuner.families()[family].kernel(weight, x, tuning.knobs())
            tuner.check_output(name, kernel.output(), reference)
            fns[name], meta[name] = kernel.run, (1 - mask.mean(), weight.nbytes, tuning)
            for peer, peer_block in PEERS.items():
                if peer_block == spec.block and spec.nm is None:
                    fns[peer], nbytes = _peer(peer, w, mask, x, spec.block)
                    meta[peer] = (1 - mask.mean(), nbytes, None)
        times = measure(fns, repeat=repeat, per_round=3)  # many short rounds: a burst of noise hits every row alike
        best = min((n for n in DENSE_TITLES.values() if n in times), key=lambda n: times[n].median)
        own = {int8: min((n for n in DENSE_TITLES.values() if n in times and (n in INT8_DENSE) == int8),
                         key=lambda n: times[n].median, default=best) for int8 in (False, True)}
        for name, t in times.items():
            achieved, nbytes, tuning = meta[name]
            speedup = times[best].median / t.median
            ideal = 1 / (1 - achieved) if achieved else 1.0
            same = own["INT8" in name]
            rows.append({"shape": f"{shape[0]}x{shape[1]}", "sparsity": s, "impl": name, "threads": threads,
                         "median_ms": t.median, "spread_ms": t.spread, "speedup_vs_best_dense": speedup,
                         "best_dense": best, "best_dense_same_precision": same,
                         "fraction_of_ideal": times[same].median / t.median / ideal, "bytes": nbytes,
                         "gflops_effective": 2 * tokens * shape[0] * shape[1] * (1 - achieved) / t.median / 1e6,
                         "schedule": None if tuning is None else tuning.label,
                         "knobs": None if tuning is None else tuning.winner,
                         "tuner_gain": None if tuning is None else tuning.gain})
    return rows


def _table(head: list[str], body: list[list[str]]) -> list[str]:
    widths = [max(len(c) for c in col) for col in zip(head, *body)]
    return ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in [head, *body]]


def format_tables(rows: list[dict]) -> str:
    """Per (shape, threads): the timing table, then which schedule the tuner picked for each cell."""
    out = []
    for (shape, threads) in dict.fromkeys((r["shape"], r["threads"]) for r in rows):
        sub = [r for r in rows if r["shape"] == shape and r["threads"] == threads]
        sparsities = sorted({r["sparsity"] for r in sub})
        impls = list(dict.fromkeys(r["impl"] for r in sub))
        cell = {(r["impl"], r["sparsity"]): r for r in sub}
        body, tuned = [], []
        for impl in impls:
            got = [cell.get((impl, s)) for s in sparsities]
            body.append([impl, *["" if r is None else f"{r['median_ms']:.4f} / {r['speedup_vs_best_dense']:.2f}x / "
                                 f"{r['fraction_of_ideal']:.2f}" for r in got],
                         str([r for r in got if r][-1]["bytes"])])
            if any(r and r["knobs"] for r in got):
                tuned.append([impl, *["" if not (r and r["knobs"]) else
                                      f"{'/'.join(str(v) for v in r['knobs'].values())} ({r['tuner_gain']:.2f}x)"
                                      for r in got]])
        out.append(f"\n== {shape} (out x in), {threads} thread(s)")
        out += _table(["implementation", *[f"s={s:g}: ms / x best / of ideal" for s in sparsities], "bytes @ max s"], body)
        out.append(f"-- schedules the tuner picked ({shape}, {threads} thread(s)); in brackets, how much faster "
                   "than the untuned default")
        out += _table(["implementation", *[f"s={s:g}" for s in sparsities]], tuned)
    return "\n".join(out)


def summary(rows: list[dict], tokens: int = 128) -> str:
    """The figures the kernels are held to, per thread count, from the rows of this one run."""
    out = []
    for threads in dict.fromkeys(r["threads"] for r in rows):
        sub = [r for r in rows if r["threads"] == threads]
        cell = {(r["shape"], r["impl"], r["sparsity"]): r for r in sub}
        shapes = list(dict.fromkeys(r["shape"] for r in sub))
        out.append(f"\n== summary, {threads} thread(s): worst case over the shapes measured")

        def worst(impls, sparsities, goal):
            got = [(r["fraction_of_ideal"], f"{r['impl']} s={r['sparsity']:g} {r['shape']}")
                   for i in impls for s in sparsities for sh in shapes if (r := cell.get((sh, i, s)))]
            if got:
                f, where = min(got)
                out.append(f"{'/'.join(i[8:] for i in impls)} at s={','.join(f'{s:g}' for s in sparsities)}: "
                           f"fraction of ideal >= {goal}: min {f:.2f} ({where}) {'ok' if f >= goal else 'MISSED'}")

        worst(["TVM BSR 32x1", "TVM BSR 16x1"], [0.8, 0.9, 0.95], 0.9)
        worst(["TVM BSR 8x1", "TVM BSR 4x4", "TVM BSR 8x8"], [0.9], 0.6)
        ratios = [cell[(sh, "PyTorch CSR (MKL)", 0.9)]["median_ms"] / cell[(sh, "TVM CSR (1x1)", 0.9)]["median_ms"]
                  for sh in shapes if (sh, "TVM CSR (1x1)", 0.9) in cell and (sh, "PyTorch CSR (MKL)", 0.9) in cell]
        if ratios:
            out.append(f"TVM CSR vs PyTorch CSR at s=0.9: >= 2x faster: min {min(ratios):.2f}x "
                       f"{'ok' if min(ratios) >= 2 else 'MISSED'}")
        for sh in shapes:
            wins = sorted(s for (shape, impl, s), r in cell.items()
                          if shape == sh and impl == "TVM BSR 32x1" and r["speedup_vs_best_dense"] > 1)
            out.append(f"break-even of 32x1 on {sh}: {wins[0] if wins else 'none'}"
                       + (f" {'ok' if wins and wins[0] <= 0.5 else 'MISSED'} (<= 0.5)"))
        for sh in shapes:  # precision: INT8 against float32, and the best INT8 block at 90%
            def median(impl):
                got = [r["median_ms"] for (shape, i, _), r in cell.items() if shape == sh and i == impl]
                return float(np.median(got)) if got else None
            if (int8 := median("TVM dense INT8")) and (fp32 := median("TVM dense")):
                out.append(f"TVM dense INT8 vs TVM dense fp32 on {sh}: {fp32 / int8:.2f}x (>= 2.5) "
                           f"{'ok' if fp32 / int8 >= 2.5 else 'MISSED'}; vs PyTorch dense fp32 "
                           f"{median('PyTorch dense') / int8:.2f}x; PyTorch dynamic INT8 is "
                           f"{median('PyTorch dynamic INT8') / int8:.2f}x ours")
            at90 = [(r["fraction_of_ideal"], r["impl"][13:], r["best_dense_same_precision"]) for (shape, impl, sp), r
                    in cell.items() if shape == sh and impl.startswith("TVM BSR INT8") and abs(sp - 0.9) < 1e-9]
            if at90:
                f, block, peer = max(at90)
                out.append(f"BSR INT8 at s=0.9 on {sh}, best block {block}: {f:.2f} of ideal against {peer} (>= 0.8) "
                           f"{'ok' if f >= 0.8 else 'MISSED'}")
        for sh in shapes:
            tvm = [r["median_ms"] for (shape, impl, _), r in cell.items() if shape == sh and impl == "TVM dense"]
            pt = [r["median_ms"] for (shape, impl, _), r in cell.items() if shape == sh and impl == "PyTorch dense"]
            if tvm and pt:
                ratio = float(np.median(pt)) / float(np.median(tvm))
                goal = 0.9 if tokens % 8 == 0 else 1 / 1.3  # awkward token counts: within 1.3x of PyTorch
                out.append(f"TVM dense vs PyTorch dense on {sh} at {tokens} tokens: {ratio:.2f}x PyTorch's speed "
                           f"(>= {goal:.2f}) {'ok' if ratio >= goal else 'MISSED'}")
    return "\n".join(out)


def main(args: argparse.Namespace) -> int:
    try:
        shapes = [parse_block(s) for s in args.shapes.split(",") if s.strip()]  # same "AxB" syntax
    except UserError:
        raise UserError(f"--shapes must look like 768x768,3072x768 (out x in), got {args.shapes!r}") from None
    sparsities = parse_floats(args.sparsities)
    threads = args.threads or default_threads()
    for s in sparsities:  # validate everything before the first (long) measurement
        resolve.spec(Spec(tokens=args.tokens, threads=args.threads, sparsity=s))
    runs = [threads] + ([1] if args.also_1_thread and threads != 1 else [])
    store = Store(args.cache_dir)
    machine = fingerprint()
    if not args.json:
        print(f"machine: {machine['cpu']}, ISA {' '.join(machine['isa'])}, {machine['cores']} cores, "
              f"TVM {machine['tvm']}, torch {machine['torch']}; {args.tokens} tokens, {'+'.join(args.precisions)}")
        print("cells: median ms / speedup vs the best dense (fastest dense row at any precision) / fraction of ideal "
              "1/(1-s) against the fastest dense of the row's own precision")
        if "int8" in args.precisions:
            dot = host_isa().int8_dot
            how = "vpdpbusd, 8-bit activations" if dot == "vnni" else "vpmaddubsw + vpmaddwd, 7-bit activations"
            print(f"INT8: integer dot {dot} ({how}); every INT8 row quantizes X per token inside the timed call")
        print("TVM sparse rows run the tuner's winning schedule (tuned once per shape, pattern, sparsity, threads; "
              "kept in the cache). Feature-major schedules read X^T [in, tokens] and write Y^T [out, tokens]; "
              "'PyTorch dense, feature-major' is the dense peer in that layout.")
        print("knobs: BSR tile/vec/layout/unroll/split/rows_per_pass; CSR tile/pack/split; N:M tile/chunk/pack/split",
              flush=True)

    rows = []
    with measurement_slot("bench", waiting=lambda ahead: print(
            f"waiting: {ahead} measurement(s) ahead", file=sys.stderr, flush=True)):
        rows = _bench_all(runs, shapes, sparsities, args, store)
    if args.json:
        print(json.dumps({"machine": machine, "tokens": args.tokens, "rows": rows}))
    else:
        print(summary(rows, args.tokens))
    return 0


def _bench_all(runs, shapes, sparsities, args, store) -> list[dict]:
    rows = []
    for t in runs:
        for shape in shapes:
            print(f"benchmarking {shape[0]}x{shape[1]} on {t} thread(s)...", file=sys.stderr, flush=True)
            got = bench_shape(shape, sparsities, args.tokens, t, args.repeat, store, args.precisions)
            rows += got
            if not args.json:  # each table as soon as it is measured
                print(format_tables(got), flush=True)
    return rows
