"""The CLI's contract: JSON keys, one-line errors with non-zero exit, cache hits."""
import json

import pytest

from sparsity_app.cli.main import main

RUN = ["run", "--model", "minilm-l6", "--layer", "encoder.layer.0.attention.self.query", "--method", "block",
       "--block", "32x1", "--sparsity", "0.9", "--tokens", "128", "--json"]
KEYS = {"model", "layer", "shape", "method", "block", "sparsity_target", "sparsity_achieved", "tokens", "repeat",
        "stored_blocks", "sparse_bytes", "dense_bytes", "times_ms", "best_dense", "speedup_vs_best_dense",
        "speedup_vs_tvm_dense", "speedup_vs_torch_dense", "ideal_speedup", "tune_s", "compile_s", "step_s", "proxies",
        "scored_tokens", "cached", "machine"}


def test_run_json_contract_and_cache_hit(cli):
    cold = cli(RUN)
    assert cold.returncode == 0, cold.stderr
    d = json.loads(cold.stdout)  # exactly one JSON object, nothing else on stdout
    assert KEYS <= d.keys()
    assert set(d["times_ms"]) == {"tvm_sparse", "tvm_dense", "torch_dense", "torch_dense_fm"}
    assert all({"median", "spread"} <= t.keys() for t in d["times_ms"].values())
    assert set(d["proxies"]) == {"retained_energy", "output_rel_error", "output_cosine", "embedding_cosine",
                                 "lee_pearson"}
    assert d["cached"] is False and d["shape"] == [384, 384] and d["block"] == "32x1"
    assert d["speedup_vs_torch_dense"] == pytest.approx(
        d["times_ms"]["torch_dense"]["median"] / d["times_ms"]["tvm_sparse"]["median"])
    best = min(("tvm_dense", "torch_dense", "torch_dense_fm"), key=lambda k: d["times_ms"][k]["median"])
    assert d["best_dense"] == best and d["speedup_vs_best_dense"] == pytest.approx(
        d["times_ms"][best]["median"] / d["times_ms"]["tvm_sparse"]["median"])
    assert d["tune_s"] > 0 and d["compile_s"] > 0 and d["scored_tokens"] > 10_000
    assert {"cpu", "isa", "cores", "threads", "tvm", "torch", "versions", "code"} <= d["machine"].keys()
    warm = cli(RUN)
    assert warm.returncode == 0 and json.loads(warm.stdout)["cached"] is True
    assert "compile]" not in warm.stderr and "/7 compile]" in cold.stderr


def test_layers_json(capsys):
    assert main(["layers", "--model", "bert-base-synthetic", "--json"]) == 0
    layers = json.loads(capsys.readouterr().out)
    assert {"name": "encoder.layer.0.intermediate.dense", "shape": [3072, 768]} in layers
    assert len(layers) == 72


@pytest.mark.parametrize("args, words", [
    (["run", "--model", "gpt9"], "valid models: minilm-l6, bert-base-synthetic"),
    (["run", "--layer", "encoder.nope"], "valid layers: encoder.layer.0.attention.self.query"),
    (["run", "--block", "5x1"], "bs_r=5 must divide the output dimension 384"),
    (["run", "--block", "1x7"], "bs_c=7 must divide the input dimension 384"),
    (["run", "--block", "big"], "block must look like 32x1"),
    (["run", "--sparsity", "1.2"], "sparsity must be in [0, 0.99]"),
    (["run", "--method", "nm", "--nm", "4:2"], "1 <= N < M"),
    (["run", "--tokens", "0"], "tokens must be an integer"),
    (["run", "--tokens", "-5"], "tokens must be an integer"),
    (["run", "--threads", "999"], "threads must be between 1 and"),
    (["run", "--repeat", "1"], "repeat must be an integer in [3, 200]"),
    (["cache", "wipe"], "invalid choice"),
    (["run", "--method", "prune-it"], "valid methods: magnitude, block, nm, random, wanda, sparsegpt"),
    (["sweep", "--blocks", "32x1,5x5"], "must divide"),
    (["sweep", "--sparsities", "0.5,x"], "comma-separated numbers"),
    (["layers", "--model", "gpt9"], "valid models"),
    (["run", "--cache-dir", "/proc/no-such-dir"], "cannot use /proc/no-such-dir as the cache directory"),
    (["bench", "--shapes", "64x64", "--sparsities", "0.5,1.5"], "sparsity must be in [0, 0.99]"),
    (["bench", "--shapes", "64by64"], "--shapes must look like"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_input_is_one_line_and_exit_2(args, words, capsys, cache_dir):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and words in err
    assert "\n" not in err and "Traceback" not in err


def test_sweep_prints_table_and_writes_csv(tmp_path, cache_dir, capsys):
    out = tmp_path / "grid.csv"
    assert main(["sweep", "--model", "bert-base-synthetic", "--tokens", "8", "--blocks", "32x1,4x4",
                 "--sparsities", "0.9,0.95", "--csv", str(out)]) == 0
    table = capsys.readouterr().out
    assert "block 32x1" in table and "block 4x4" in table
    lines = out.read_text().splitlines()
    assert len(lines) == 5 and "speedup_vs_torch_dense" in lines[0]


def test_bench_json_has_every_row(capsys, cache_dir):
    assert main(["bench", "--shapes", "64x64", "--sparsities", "0.9", "--tokens", "8", "--repeat", "2",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    impls = {r["impl"] for r in out["rows"]}
    assert {"PyTorch dense", "PyTorch dense, feature-major", "TVM dense", "TVM BSR 32x1", "TVM BSR 1x32",
            "TVM CSR (1x1)", "PyTorch CSR (MKL)", "SciPy CSR", "SciPy BSR 32x1", "TVM N:M 2:4", "TVM N:M 1:4"} <= impls
    assert all(r["median_ms"] > 0 and r["bytes"] > 0 for r in out["rows"])
    assert {r["sparsity"] for r in out["rows"] if r["impl"] == "TVM N:M 1:4"} == {0.75}  # at its own sparsity
    tvm_sparse = [r for r in out["rows"] if r["impl"].startswith("TVM") and r["impl"] != "TVM dense"]
    assert all(r["schedule"] and r["knobs"] and r["tuner_gain"] > 0 for r in tvm_sparse)
    assert {"cpu", "isa", "cores"} <= out["machine"].keys()
