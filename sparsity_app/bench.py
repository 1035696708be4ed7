"""The kernel benchmark (a command, never a test): `python -m sparsity_app bench [--json]`.

For each weight shape and sparsity, every implementation is timed in one `measure` call, so the
ratios in a row compare like with like. Weights are seeded Gaussian (only timing matters here);
masks come from the same pruning methods the app uses.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from .errors import UserError
from .spec import Spec, parse_block

SHAPES = ("768x768", "3072x768", "768x3072", "384x384", "1536x384", "384x1536")  # (out x in)
SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95)
BLOCKS = ((32, 1), (16, 1), (8, 1), (4, 4), (8, 8), (16, 16), (1, 32), (1, 1))
NMS = ((2, 4), (1, 4))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated out x in weight shapes")
    p.add_argument("--sparsities", default=",".join(map(str, SPARSITIES)))
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=0, help="0 = all cores; the benchmark also runs 1 thread with --also-1-thread")
    p.add_argument("--also-1-thread", action="store_true", help="repeat the whole benchmark on one thread")
    p.add_argument("--repeat", type=int, default=15, help="timed samples per implementation")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout instead of tables")


def _peer(name: str, w: np.ndarray, mask: np.ndarray, x: np.ndarray, block: tuple[int, int]):
    """(run, bytes) of a sparse library computing Y^T = (W * mask) @ X^T."""
    import warnings

    import scipy.sparse
    import torch

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


def bench_shape(shape: tuple[int, int], sparsities, tokens: int, threads: int, repeat: int) -> list[dict]:
    from .formats import to_bsr
    from .kernels import set_threads
    from .kernels.bsr import TVMBSR
    from .kernels.dense import TorchDense, TVMDense
    from .pruning import prune
    from .timing import measure

    set_threads(threads)
    rng = np.random.default_rng(0)
    w = rng.standard_normal(shape, dtype=np.float32)
    x = rng.standard_normal((tokens, shape[1]), dtype=np.float32)
    dense = {"PyTorch dense": TorchDense(w, x).run, "TVM dense": TVMDense(w, x).run}
    rows = []
    for s in sparsities:
        fns, meta = dict(dense), {name: (0.0, w.nbytes) for name in dense}
        for block in BLOCKS:
            if shape[0] % block[0] or shape[1] % block[1]:
                continue
            method = "magnitude" if block == (1, 1) else "block"
            mask = prune(w, Spec(method=method, block=block, sparsity=s).resolve())
            b = to_bsr(w, mask, block)
            name = "TVM CSR (BSR 1x1)" if block == (1, 1) else f"TVM BSR {block[0]}x{block[1]}"
            fns[name], meta[name] = TVMBSR(b, x).run, (1 - mask.mean(), b.nbytes)
            for peer, peer_block in PEERS.items():
                if peer_block == block:
                    fns[peer], nbytes = _peer(peer, w, mask, x, block)
                    meta[peer] = (1 - mask.mean(), nbytes)
        for n, m in NMS:
            if shape[1] % m == 0 and abs((1 - n / m) - s) < 1e-9:
                mask = prune(w, Spec(method="nm", nm=(n, m)).resolve())
                b = to_bsr(w, mask, (1, 1))
                fns[f"TVM N:M {n}:{m} (as BSR 1x1)"], meta[f"TVM N:M {n}:{m} (as BSR 1x1)"] = TVMBSR(b, x).run, (1 - n / m, b.nbytes)
        times = measure(fns, repeat=repeat)
        best = min(times["PyTorch dense"].median, times["TVM dense"].median)
        for name, t in times.items():
            achieved, nbytes = meta[name]
            speedup = best / t.median
            ideal = 1 / (1 - achieved) if achieved else 1.0
            rows.append({"shape": f"{shape[0]}x{shape[1]}", "sparsity": s, "impl": name, "threads": threads,
                         "median_ms": t.median, "spread_ms": t.spread, "speedup_vs_best_dense": speedup,
                         "fraction_of_ideal": speedup / ideal, "bytes": nbytes,
                         "gflops_effective": 2 * tokens * shape[0] * shape[1] * (1 - achieved) / t.median / 1e6})
    return rows


def format_tables(rows: list[dict]) -> str:
    out = []
    for (shape, threads) in dict.fromkeys((r["shape"], r["threads"]) for r in rows):
        sub = [r for r in rows if r["shape"] == shape and r["threads"] == threads]
        sparsities = sorted({r["sparsity"] for r in sub})
        impls = list(dict.fromkeys(r["impl"] for r in sub))
        head = ["implementation", *[f"s={s:g}: ms / x best / of ideal" for s in sparsities], "bytes @ max s"]
        body = []
        for impl in impls:
            cells = []
            for s in sparsities:
                r = next((r for r in sub if r["impl"] == impl and r["sparsity"] == s), None)
                cells.append("" if r is None else f"{r['median_ms']:.4f} / {r['speedup_vs_best_dense']:.2f}x / "
                             f"{r['fraction_of_ideal']:.2f}")
            last = [r for r in sub if r["impl"] == impl][-1]
            body.append([impl, *cells, str(last["bytes"])])
        widths = [max(len(c) for c in col) for col in zip(head, *body)]
        out.append(f"\n== {shape} (out x in), {threads} thread(s)")
        out += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in [head, *body]]
    return "\n".join(out)


def main(args: argparse.Namespace) -> int:
    from .cli import _floats
    from .spec import default_threads
    from .timing import fingerprint

    try:
        shapes = [parse_block(s) for s in args.shapes.split(",") if s.strip()]  # same "AxB" syntax
    except UserError:
        raise UserError(f"--shapes must look like 768x768,3072x768 (out x in), got {args.shapes!r}") from None
    sparsities = _floats(args.sparsities)
    threads = args.threads or default_threads()
    Spec(tokens=args.tokens, threads=args.threads).resolve()  # validates tokens and threads
    runs = [threads] + ([1] if args.also_1_thread and threads != 1 else [])
    rows = []
    for t in runs:
        for shape in shapes:
            print(f"benchmarking {shape[0]}x{shape[1]} on {t} thread(s)...", file=sys.stderr, flush=True)
            rows += bench_shape(shape, sparsities, args.tokens, t, args.repeat)
    machine = fingerprint()
    if args.json:
        print(json.dumps({"machine": machine, "tokens": args.tokens, "rows": rows}))
    else:
        print(f"machine: {machine['cpu']}, ISA {' '.join(machine['isa'])}, {machine['cores']} cores, "
              f"TVM {machine['tvm']}, torch {machine['torch']}; {args.tokens} tokens, float32")
        print("cells: median ms / speedup vs the best dense (faster of PyTorch and TVM dense) / fraction of ideal 1/(1-s)")
        print(format_tables(rows))
    return 0
