"""Pure functions over result tables (pandas DataFrames of `Result.row()`), for the app and CLI."""
from __future__ import annotations

from typing import Iterable

import numpy as np
import pandas as pd

from .spec import Result

PROXIES = {  # column -> (label, higher is better)
    "output_cosine": ("layer output cosine", True),
    "retained_energy": ("retained weight energy", True),
    "lee_pearson": ("Lee similarity Pearson (model)", True),
    "embedding_cosine": ("sentence embedding cosine (model)", True),
    "output_rel_error": ("layer output relative error", False),
}


def frame(results: Iterable[Result]) -> pd.DataFrame:
    """One row per result, with `speedup_vs_best_dense` (vs the faster of TVM and PyTorch dense)."""
    df = pd.DataFrame([r.row() for r in results])
    if df.empty:
        return df
    df["best_dense_ms"] = df[["tvm_dense_ms", "torch_dense_ms"]].min(axis=1)
    df["speedup_vs_best_dense"] = df["best_dense_ms"] / df["tvm_bsr_ms"]
    df["fraction_of_ideal"] = df["speedup_vs_best_dense"] / df["ideal_speedup"]
    return df.sort_values(["pattern", "sparsity_target"]).reset_index(drop=True)


def pareto_mask(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """True where no other point has x >= and y >= with one strictly greater (both maximised)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = np.ones(len(x), bool)
    for i in range(len(x)):
        dominated = (x >= x[i]) & (y >= y[i]) & ((x > x[i]) | (y > y[i]))
        keep[i] = not dominated.any()
    return keep


def break_even(df: pd.DataFrame, speedup: str = "speedup_vs_best_dense") -> pd.DataFrame:
    """Per pattern: the lowest measured sparsity whose BSR kernel beats dense (speedup >= 1).

    Columns: pattern, break_even_sparsity (NaN if it never pays off), measured (number of points).
    """
    rows = []
    for pattern, g in df.groupby("pattern"):
        wins = g.loc[g[speedup] >= 1.0, "sparsity_achieved"]
        rows.append({"pattern": pattern, "break_even_sparsity": wins.min() if len(wins) else np.nan,
                     "measured": len(g)})
    return pd.DataFrame(rows)


FORMAT_TITLES = {"bsr": "TVM BSR", "csr": "TVM CSR", "nm": "TVM N:M"}


def kernel_title(result: Result) -> str:
    """'TVM BSR', 'TVM CSR' or 'TVM N:M': the sparse kernel the result timed."""
    return FORMAT_TITLES.get(result.kernel.get("format", "bsr"), "TVM sparse")


def tuning_frame(result: Result) -> pd.DataFrame:
    """The tuner's trials for this result, fastest first: schedule, median us, x slower than the winner."""
    tuning = result.kernel.get("tuning") or {}
    trials = tuning.get("trials", [])
    if not trials:
        return pd.DataFrame(columns=["schedule", "median_us", "vs_winner", "round"])
    best = min(t["median_ms"] for t in trials)
    return pd.DataFrame([{"schedule": t["label"], "median_us": t["median_ms"] * 1e3,
                          "vs_winner": t["median_ms"] / best, "round": t["round"]} for t in trials])
