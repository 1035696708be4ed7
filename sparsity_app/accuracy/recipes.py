"""Recovery recipes, losses and sequence lengths: what a recovery run may ask for (no torch here).

The training loop that carries them out is accuracy.recovery; this module is what resolving a
request and listing the choices read.

The student is a copy of the dense model whose encoder linears (`model.catalog.Model.layers()`) train;
everything else (embeddings, biases, layer norms) stays frozen, so a recovered model is exactly
"the same model with other linear weights": layer -> float32 [out, in], zero where its mask drops
a weight. It learns to reproduce the dense model (`LOSSES`: by default every layer's hidden states,
mean squared error; or also the sentence embedding, by cosine) on unlabelled text that no metric
evaluates on: gensim's `lee_background.cor` and
`head500.noblanks.cor`. Never `lee.cor` or the polarity sentences (accuracy/metrics.py scores on those).
Each step reads `batch` x `seq_len` tokens; `LENGTHS` says how they are cut into sequences. By
default ("mixed") the steps cycle through sequences of seq_len, seq_len/2, seq_len/4 and seq_len/8
tokens: a student that only ever saw 128-token windows matched the dense model far less on short
inputs (cosine 0.76 at 16 tokens against 0.88 at 128), and the polarity sentences and single words
that the metrics embed are short.

A recipe decides, step by step, which pattern the mask follows and how the pruned weights take
part (`Phase`); the training loop is shared. Adding a recipe is one function of (request, specs,
step) -> Phase plus one line in `RECIPES`:

- fixed: the one-shot masks, fixed for the whole run (the baseline).
- gradual: gradual magnitude pruning: each layer's sparsity rises on a cubic schedule
  (Zhu & Gupta 2017) over the first `decay_fraction` of the steps, masks recomputed every
  `mask_interval` steps, then fixed.
- sr-ste: masks recomputed from the dense weights every step; the forward uses the masked weights,
  the gradient reaches every weight (straight-through), and the pruned ones decay by `sr_ste_decay`
  (Zhou et al. 2021, arXiv 2102.04010). The last step's mask is kept.
- mask-decay (arXiv 2209.07617): the forward uses W * (m + (1 - m) * beta), beta going from 1 to 0
  (`beta_schedule`: linear or exponential) over the first `decay_fraction` of the steps, masks
  recomputed every `mask_interval` steps; then a binary mask for the rest of the run.
- structure-decay (arXiv 2209.07617, N:M only): N:M stepped toward the target over equal time
  frames in the first `decay_fraction` of the steps (`nm_stages`: 2:4 -> 3:4, 2:4; 1:8 -> 4:8,
  2:8, 1:8), then the target for the rest. The paper's first frame is dense; under distillation a
  dense student is the teacher, its loss exactly 0 (measured: 0 at every step of that frame), so
  that frame would train nothing and the sparse frames start at once.
- group-lasso (co-design paper, arXiv 2106.08846): dense training with a penalty on the L2 norms of
  the plan's bs_r x bs_c blocks for the first `decay_fraction` of the steps, then the smallest
  blocks pruned (the plan's own method) and a fixed-mask fine-tune for the rest.

Runs are deterministic for a request (no dropout, a seeded data order indexed by step), write a
checkpoint every `checkpoint_every` steps, and a run that was stopped (time limit, kill -9) resumes
from its last checkpoint with the same result as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np

from sparsity_app.core.errors import UserError
from sparsity_app.core.requests import RecoveryRequest, Spec
from sparsity_app.model.corpus import training_sequences

MAX_STEPS = 5000


# ---- recipes: what the mask follows at each step ---------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Phase:
    """What the training loop does at one step.

    specs: layer -> the pattern its mask follows now (None: no mask, the layer trains dense).
    remask: recompute the masks from the current dense weights under `specs` before this step.
    beta: how much of each pruned weight the forward keeps, W * (m + (1 - m) * beta); 0 = a hard mask.
    ste: the forward uses W * m, the gradient reaches every weight (straight-through estimator).
    decay: added to the gradient of each pruned weight, times the weight (SR-STE's lambda_w).
    group_lasso: weight of the summed block L2 norms of every layer (bs_r x bs_c of the plan's pattern).
    """

    specs: dict[str, Spec | None]
    remask: bool
    beta: float = 0.0
    ste: bool = False
    decay: float = 0.0
    group_lasso: float = 0.0

    @property
    def hard(self) -> bool:
        """Pruned weights are held at exactly zero after this step."""
        return self.beta == 0.0 and not self.ste


BETA_SCHEDULES = ("linear", "exponential")


def _decay_steps(req: RecoveryRequest) -> int:
    return int(round(req.decay_fraction * req.steps))


def fixed(req: RecoveryRequest, specs: dict, step: int) -> Phase:
    return Phase(specs, remask=step == 0)


def gradual(req: RecoveryRequest, specs: dict, step: int) -> Phase:
    ramp = _decay_steps(req)
    if any(s is not None and s.nm is not None for s in specs.values()):
        raise UserError("gradual raises a sparsity; an N:M pattern has none to raise: use structure-decay")
    if step >= ramp:
        return Phase(specs, remask=step == ramp)
    frac = 1.0 - (1.0 - step / ramp) ** 3  # cubic: prune fast while the network has spare weights
    now = {n: None if s is None else dataclasses.replace(s, sparsity=s.sparsity * frac) for n, s in specs.items()}
    return Phase(now, remask=step % req.mask_interval == 0)


def sr_ste(req: RecoveryRequest, specs: dict, step: int) -> Phase:
    last = step == req.steps - 1
    return Phase(specs, remask=True, ste=not last, decay=0.0 if last else req.sr_ste_decay)


def mask_decay(req: RecoveryRequest, specs: dict, step: int) -> Phase:
    span = _decay_steps(req)
    if step >= span:
        return Phase(specs, remask=step == span)
    t = step / span
    beta = 1.0 - t if req.beta_schedule == "linear" else math.exp(-5.0 * t) * (1.0 - t)  # both reach 0 at t=1
    return Phase(specs, remask=step % req.mask_interval == 0, beta=beta)


def nm_stages(n: int, m: int) -> list[int]:
    """The N of each frame of structure-decay, the first sparse stage first and the target last.

    N halves from M until the target; when that would go from dense straight to the target
    (N = M/2), the midpoint comes between: 2:4 -> [3, 2]; 1:8 -> [4, 2, 1]; 4:8 -> [6, 4]. No dense
    frame: under distillation it would train nothing (see the module's docstring).
    """
    stages = [m]
    while stages[-1] > n:
        stages.append(max(n, stages[-1] // 2))
    if len(stages) == 2:
        stages.insert(1, (m + n) // 2) if (m + n) // 2 not in (m, n) else None
    return stages[1:]


def structure_decay(req: RecoveryRequest, specs: dict, step: int) -> Phase:
    if not any(s is not None and s.nm is not None for s in specs.values()):
        raise UserError("structure-decay steps an N:M pattern toward its target: choose an N:M plan (e.g. --nm 2:4)")
    span = _decay_steps(req)
    stages = {name: nm_stages(*s.nm) if s is not None and s.nm is not None else None for name, s in specs.items()}
    frames = max(len(st) for st in stages.values() if st) - 1  # equal frames for every stage before the target

    def frame(t: int) -> int:
        return frames if t >= span else t * frames // span

    now = {}
    for name, s in specs.items():
        st = stages[name]
        n = None if st is None else st[min(frame(step), len(st) - 1)]
        now[name] = s if st is None else None if n == s.nm[1] else dataclasses.replace(s, nm=(n, s.nm[1]))
    return Phase(now, remask=step == 0 or frame(step) != frame(step - 1))


def group_lasso(req: RecoveryRequest, specs: dict, step: int) -> Phase:
    span = _decay_steps(req)
    if step >= span:
        return Phase(specs, remask=step == span)
    return Phase({n: None for n in specs}, remask=step == 0, group_lasso=req.group_lasso)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A recovery recipe: its phase function and the request knobs it reads (the others are
    canonicalised away when a request is resolved, so they never split the cache)."""

    phase: Callable[[RecoveryRequest, dict, int], Phase]  # (request, layer -> Spec | None, step) -> Phase
    label: str  # one line: what the mask does during the run
    knobs: tuple[str, ...] = ()  # RecoveryRequest fields it reads beyond the shared ones (steps, lr, ...)


RECIPES: dict[str, Recipe] = {
    "fixed": Recipe(fixed, "the one-shot masks, fixed (the baseline)"),
    "gradual": Recipe(gradual, "each layer's sparsity rises on a cubic schedule, then fixed",
                      ("decay_fraction", "mask_interval")),
    "sr-ste": Recipe(sr_ste, "masks recomputed every step, straight-through gradient, pruned weights decay",
                     ("sr_ste_decay",)),
    "mask-decay": Recipe(mask_decay, "pruned weights fade out (beta 1 -> 0), then a binary mask",
                         ("decay_fraction", "mask_interval", "beta_schedule")),
    "structure-decay": Recipe(structure_decay, "N:M stepped toward the target, then the target",
                              ("decay_fraction",)),
    "group-lasso": Recipe(group_lasso, "a block-norm penalty while dense, then the smallest blocks pruned",
                          ("decay_fraction", "group_lasso")),
}


# ---- losses: (student hidden states, teacher's) -> a scalar; each a tuple of [batch, seq, hidden], one per layer --

def hidden_mse(student, teacher):
    """Every layer's hidden states, mean squared error averaged over the layers (the issue's baseline)."""
    return sum(((h - t) ** 2).mean() for h, t in zip(student, teacher)) / len(teacher)


def pooled_cosine(student, teacher):
    """1 - cosine of the sentence embeddings, as the metrics embed (the last layer, mean over tokens:
    the training sequences hold no padding), averaged over the batch."""
    a, b = student[-1].mean(dim=1), teacher[-1].mean(dim=1)
    cosine = (a * b).sum(dim=-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-8)
    return 1.0 - cosine.mean()


def hidden_and_pooled(student, teacher):
    """hidden_mse + pooled_cosine: the token-level signal and the one that the metrics read."""
    return hidden_mse(student, teacher) + pooled_cosine(student, teacher)


LOSSES = {
    "hidden": hidden_mse,
    "pooled": pooled_cosine,
    "hidden+pooled": hidden_and_pooled,
}


def fixed_length(seq_len: int) -> tuple[int, ...]:
    """Every sequence seq_len tokens long (the issue's baseline protocol)."""
    return (seq_len,)


def mixed_lengths(seq_len: int) -> tuple[int, ...]:
    """seq_len/8, seq_len/4, seq_len/2 and seq_len tokens, those that are whole numbers >= 16 (16, 32,
    64, 128 for 128; seq_len alone below 32), so every step holds exactly batch x seq_len tokens.
    Chosen by fidelity averaged over windows of 16 to 128 tokens of the training text (32x1 at 50%,
    fixed, 100 steps): 0.778 against 0.771 for 32-128 and 0.726 for 128 alone."""
    return tuple(seq_len >> k for k in (3, 2, 1, 0) if seq_len % (1 << k) == 0 and seq_len >> k >= 16) or (seq_len,)


LENGTHS: dict[str, Callable[[int], tuple[int, ...]]] = {
    "mixed": mixed_lengths,
    "fixed": fixed_length,
}


# ---- training text ------------------------------------------------------------------------------

def batch_at(req: RecoveryRequest, step: int) -> np.ndarray:
    """The sequences of one step, int64 [batch * seq_len / L, L]: the step's batch x seq_len tokens as
    sequences of L tokens, L cycling through `LENGTHS[req.lengths](seq_len)` step by step. For each L a
    seeded permutation, reshuffled each epoch; indexed by step alone, so a resumed run reads exactly what
    an uninterrupted one would."""
    lengths = LENGTHS[req.lengths](req.seq_len)
    length = lengths[step % len(lengths)]
    rows = req.batch * req.seq_len // length
    seqs = training_sequences(length)
    per_epoch = len(seqs) // rows
    if per_epoch == 0:
        raise UserError(f"the training text has {len(seqs)} sequences of {length} tokens, fewer than a batch ({rows})")
    epoch, i = divmod(step // len(lengths), per_epoch)
    order = np.random.default_rng([req.seed, length, epoch]).permutation(len(seqs))
    return seqs[order[i * rows:(i + 1) * rows]]


# ---- the training loop ----------------------------------------------------------------------------


class RecoveryStopped(UserError):
    """The run hit its time limit; its checkpoint is kept and the next run resumes from it."""
