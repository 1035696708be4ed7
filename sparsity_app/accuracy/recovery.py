"""The recovery training loop: fine-tune a pruned model's linears toward the dense model, masks enforced.

What a run follows step by step (recipes, losses, sequence lengths) is accuracy.recipes; this
module is the loop that carries it out, on the CPU with PyTorch: the training text, the data order,
checkpoints and resumption. See accuracy.recipes for what each recipe does and why.

Runs are deterministic for a request (no dropout, a seeded data order indexed by step), write a
checkpoint every `checkpoint_every` steps, and a run that was stopped (time limit, kill -9) resumes
from its last checkpoint with the same result as an uninterrupted one.
"""
from __future__ import annotations

import copy
import math
import os
import pathlib
import time
from typing import Callable

import numpy as np
import torch
from torch.func import functional_call

from sparsity_app.accuracy.recipes import LOSSES, RECIPES, Phase, RecoveryStopped, batch_at
from sparsity_app.core.requests import RecoveryRequest, Spec
from sparsity_app.model.catalog import get_model
from sparsity_app.model.pruned import layer_input_norms, pruned_weights, reconstructs
from sparsity_app.prune.methods import prune

# ---- training text ------------------------------------------------------------------------------

Progress = Callable[[str, str], None]  # (step, one-line detail), as runs.pipeline.Progress


def _effective(w, m, phase: Phase):
    """The weight the forward uses, float32 [out, in]; its gradient flows to w as the phase says."""
    if phase.ste:
        return w + (w * m - w).detach()
    if phase.beta > 0:
        return w * (m + (~m) * phase.beta)
    return w * m


def _block_norm_penalty(w, spec: Spec):
    """Sum of the L2 norms of the bs_r x bs_c blocks of w (float32 [out, in]); for N:M, of 1 x M groups.

    A sum, not a mean, so each weight's penalty gradient (group_lasso * w / ||block||) does not
    shrink with the layer's size; Adam then moves a block whose distillation gradient is small
    toward zero at about the learning rate per step.
    """
    bs_r, bs_c = (1, spec.nm[1]) if spec.nm is not None else spec.block
    out_f, in_f = w.shape
    return w.reshape(out_f // bs_r, bs_r, in_f // bs_c, bs_c).pow(2).sum(dim=(1, 3)).add(1e-12).sqrt().sum()


def _follows(mask: np.ndarray, spec: Spec, weight: np.ndarray) -> bool:
    """Whether a mask (bool [out, in]) has the spec's pattern: N of every M for N:M; else whole
    bs_r x bs_c blocks, as many kept as the one-shot mask of `weight` (float32 [out, in]) keeps."""
    out_f, in_f = mask.shape
    if spec.nm is not None:
        n, m = spec.nm
        return bool((mask.reshape(out_f, in_f // m, m).sum(-1) == n).all())
    bs_r, bs_c = spec.block
    tiles = mask.reshape(out_f // bs_r, bs_r, in_f // bs_c, bs_c)
    whole = bool((tiles.all(axis=(1, 3)) | ~tiles.any(axis=(1, 3))).all())
    return whole and int(mask.sum()) == int(prune(weight, spec, layer_input_norms(spec)).sum())


def _lr_at(req: RecoveryRequest, step: int) -> float:
    """5% linear warm-up, then a cosine decay to 0."""
    warm = max(1, req.steps // 20)
    if step < warm:
        return req.lr * (step + 1) / warm
    return req.lr * 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, req.steps - warm)))


def _load_checkpoint(checkpoint: pathlib.Path | None, progress: Progress) -> dict | None:
    """The checkpoint's state, or None (none there; or unreadable: set aside, and the run starts afresh)."""
    if checkpoint is None or not checkpoint.exists():
        return None
    try:
        return torch.load(checkpoint, weights_only=True)
    except Exception as e:
        aside = checkpoint.with_name(f"checkpoint.unreadable-{int(time.time())}.pt")
        os.replace(checkpoint, aside)
        progress("train", f"the checkpoint could not be read ({type(e).__name__}); kept aside as {aside.name}, "
                          "starting from step 0")
        return None


def train(req: RecoveryRequest, specs: dict, checkpoint: pathlib.Path | None, progress: Progress,
          time_limit_s: float | None, one_shot: dict[str, np.ndarray] | None = None):
    """The shared loop: (weights, masks, steps done, wall s, losses, resumed from).

    weights: layer -> float32 [out, in] numpy, zero where masks (bool [out, in]) drop a weight.
    one_shot: the plan's one-shot weights (model.pruned.pruned_weights); a layer whose method
    reconstructs (sparsegpt) starts from them, every other layer from its dense weight.
    """
    model = get_model(req.plan.model)
    # Both private: asked for hidden states, transformers installs its capture hooks on the model it runs, and
    # the shared model must stay as every other caller expects it (no hooks).
    teacher = copy.deepcopy(model.torch_model()).eval()
    student = copy.deepcopy(teacher).eval()  # eval: no dropout, so a run is deterministic
    student.requires_grad_(False)
    recipe = RECIPES[req.recipe].phase
    if one_shot is None and any(reconstructs(s) for s in specs.values()):
        one_shot = pruned_weights(req.plan.model, specs)[1]
    w = {n: torch.from_numpy((one_shot[n] if reconstructs(s) else model.weight(n)[0]).copy()).requires_grad_(True)
         for n, s in specs.items()}
    m = {n: torch.ones(t.shape, dtype=torch.bool) for n, t in w.items()}
    opt = torch.optim.AdamW(list(w.values()), lr=req.lr, weight_decay=0.0, foreach=True)
    start, wall_s, losses = 0, 0.0, []
    state = _load_checkpoint(checkpoint, progress)
    if state is not None:
        with torch.no_grad():
            for n in w:
                w[n].copy_(state["w"][n])
                m[n] = state["m"][n].bool()
        opt.load_state_dict(state["opt"])
        start, wall_s, losses = int(state["step"]), float(state["wall_s"]), [tuple(p) for p in state["loss"]]
        progress("train", f"resuming from the checkpoint at step {start}/{req.steps}")
    resumed_from = start

    def save(step: int) -> None:
        if checkpoint is None:
            return
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        tmp = checkpoint.with_suffix(".tmp")
        torch.save({"step": step, "w": {n: t.detach() for n, t in w.items()}, "m": m, "opt": opt.state_dict(),
                    "wall_s": wall_s, "loss": [list(p) for p in losses]}, tmp)
        os.replace(tmp, checkpoint)  # a kill mid-write leaves the previous checkpoint whole

    began = time.perf_counter()
    for step in range(start, req.steps):
        t0 = time.perf_counter()
        phase = recipe(req, specs, step)
        if phase.remask:
            for n, spec in phase.specs.items():
                m[n] = torch.ones_like(m[n]) if spec is None else torch.from_numpy(
                    prune(w[n].detach().numpy(), spec, layer_input_norms(spec)))
            if phase.hard:
                with torch.no_grad():
                    for n in w:
                        w[n].mul_(m[n])
        ids = torch.from_numpy(batch_at(req, step))
        with torch.no_grad():  # not inference_mode: the targets enter the (student's) autograd graph
            target = teacher(input_ids=ids, output_hidden_states=True).hidden_states[1:]
        params = {f"{n}.weight": _effective(w[n], m[n], phase) for n in w}
        out = functional_call(student, params, args=(), kwargs={"input_ids": ids, "output_hidden_states": True})
        loss = LOSSES[req.loss](out.hidden_states[1:], target)
        total = loss
        if phase.group_lasso:
            total = loss + phase.group_lasso * sum(_block_norm_penalty(w[n], s) for n, s in specs.items() if s is not None)
        total.backward()
        with torch.no_grad():
            for n, t in w.items():
                if phase.decay:
                    t.grad.add_(t * ~m[n], alpha=phase.decay)
                if phase.hard:
                    t.grad.mul_(m[n])
        for group in opt.param_groups:
            group["lr"] = _lr_at(req, step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if phase.hard:
            with torch.no_grad():
                for n in w:
                    w[n].mul_(m[n])
        wall_s += time.perf_counter() - t0
        done = step + 1
        if done % 10 == 0 or done == req.steps:
            losses.append((done, round(loss.item(), 6)))
        left = (time.perf_counter() - began) / (done - start) * (req.steps - done)
        progress("train", f"step {done}/{req.steps}, loss {loss.item():.4g}, {wall_s:.0f} s so far, ~{left:.0f} s left")
        if done % req.checkpoint_every == 0 and done < req.steps:
            save(done)
        if time_limit_s is not None and time.perf_counter() - began > time_limit_s and done < req.steps:
            save(done)
            kept = "its checkpoint is kept: run it again to resume" if checkpoint is not None else \
                "nothing was kept (no store)"
            raise RecoveryStopped(f"recovery stopped by its time limit ({time_limit_s:g} s) after {done} of "
                                  f"{req.steps} steps; {kept}")
    last = recipe(req, specs, req.steps - 1)
    if last.specs != specs or not last.hard:  # a schedule cut short (e.g. decay_fraction near 1): the plan's mask now
        for n, spec in specs.items():
            m[n] = torch.ones_like(m[n]) if spec is None else torch.from_numpy(
                prune(w[n].detach().numpy(), spec, layer_input_norms(spec)))
    weights = {n: (t.detach() * m[n]).numpy().astype(np.float32) for n, t in w.items()}
    masks = {n: t.numpy() for n, t in m.items()}
    for n, spec in specs.items():  # what is stored is what the plan says, or nothing is
        if spec is not None and not _follows(masks[n], spec, model.weight(n)[0]):
            raise AssertionError(f"the recovered mask of {n} does not follow {spec.label()}")
    return weights, masks, req.steps, wall_s, losses, resumed_from


__all__ = ["train"]
