"""Export: the Hugging Face folder reloads with the same metrics; the library runs without the project."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from sparsity_app import UserError
from sparsity_app.core.requests import ModelPlan, Spec
from sparsity_app.model import graph
from sparsity_app.prune.formats import to_bsr
from sparsity_app.runs import resolve
from sparsity_app.serve import export


def test_library_and_loader_run_without_the_project(tmp_path):
    model = graph.synthetic_bert(layers=1, hidden=64, heads=4, intermediate=128, seed=3)
    name = "encoder.layer.0.intermediate.dense"
    w = model.get_submodule(name).weight.detach().numpy()
    mask = np.zeros_like(w, bool)
    mask[::2] = True  # half the rows kept: a 1x... any-block pattern the BSR format stores as 2x1 blocks
    bsr = to_bsr(w, mask, (2, 1))
    plans = {name: graph.LinearPlan("bsr", bsr, model.get_submodule(name).bias.detach().numpy())}
    encoder = graph.compile_encoder(model, model, plans, 2, 8)
    export.write_library(encoder, tmp_path)
    ids = np.random.default_rng(0).integers(0, 1000, (2, 8)).astype(np.int64)
    mask_in = np.ones((2, 8), np.int64)
    mask_in[1, 5:] = 0
    np.save(tmp_path / "ids.npy", ids)
    np.save(tmp_path / "mask.npy", mask_in)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # cwd = the export folder (not the repo): `import sparsity_app` would fail there, so the loader cannot use it
    # cwd = the export folder, PYTHONPATH unset: the project is not importable there, and the loader must not need it
    run = subprocess.run([sys.executable, "-c", "import runpy, sys; sys.argv = ['run_sparse_model.py', 'ids.npy', "
                          "'mask.npy', '--out', 'hidden.npy']; runpy.run_path('run_sparse_model.py', run_name='__main__'); "
                          "assert 'sparsity_app' not in sys.modules and 'torch' not in sys.modules, 'project imported'"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    got = np.load(tmp_path / "hidden.npy")
    want = encoder(ids, mask_in)
    assert got.shape == (2, 8, 64)
    np.testing.assert_array_equal(got, want)
    meta = json.loads((tmp_path / export.META).read_text())
    assert (meta["batch"], meta["seq"], meta["hidden"]) == (2, 8, 64)


def test_hf_folder_reloads_with_the_same_metrics(tmp_path):
    from transformers import AutoModel

    from sparsity_app.accuracy import metrics
    from sparsity_app.model.catalog import get_model
    from sparsity_app.model.pruned import pruned_weights

    plan = ModelPlan(method="block", block=(32, 1), sparsity=0.5)
    resolved = resolve.plan(plan)
    _, pruned = pruned_weights(resolved.plan.model, resolved.specs)
    model = get_model("minilm-l6")
    copy = model.pruned_copy(pruned)
    export.write_hf_folder(copy, model.tokenizer(), tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").exists() and (tmp_path / "hf" / "tokenizer.json").exists()
    reloaded = AutoModel.from_pretrained(str(tmp_path / "hf")).eval()
    w = reloaded.get_submodule("encoder.layer.2.output.dense").weight.detach().numpy()
    np.testing.assert_array_equal(w, pruned["encoder.layer.2.output.dense"])
    dense = metrics.reference_embeddings("minilm-l6")
    before = metrics.evaluate(copy, model.tokenizer(), dense)
    after = metrics.evaluate(reloaded, model.tokenizer(), dense)
    assert before["lee_pearson"] < metrics.dense_metrics()["lee_pearson"] - 0.05  # it is the pruned model
    for name in before:
        assert round(after[name], 3) == round(before[name], 3), name


def test_mask_of_weights_fits_the_pattern_or_refuses():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 8)).astype(np.float32)
    nm = resolve.spec(Spec(layer="x", method="nm", nm=(2, 4)))
    kept = np.zeros((8, 8), bool)
    kept[:, [0, 3, 4, 5]] = True
    m = export.mask_of_weights(w * kept, nm)
    assert m.reshape(8, 2, 4).sum(axis=2).tolist() == [[2, 2]] * 8 and (m >= kept).all()
    with pytest.raises(UserError, match="not 2:4"):
        export.mask_of_weights(w, nm)
    block = resolve.spec(Spec(layer="x", method="block", block=(4, 1), sparsity=0.5))
    sparse = w.copy()
    sparse[:4, :3] = 0
    m = export.mask_of_weights(sparse, block)
    assert not m[:4, :3].any() and m[4:].all()


def test_export_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        export.export_model(resolve.plan(ModelPlan(sparsity=0.5)), tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "mine"
    with pytest.raises(UserError, match="unknown layer"):
        export.export_model(resolve.plan(ModelPlan(sparsity=0.5)), tmp_path / "new", weights={"nope": np.zeros((2, 2))})
    assert not (tmp_path / "new").exists()
