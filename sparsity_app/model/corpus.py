"""The unlabelled training text as token sequences: what recovery trains on, fidelity reads and
pruning calibrates on (model.data.TRAINING_CORPORA; never a text any metric scores)."""
from __future__ import annotations

import functools

import numpy as np

from sparsity_app.model import data
from sparsity_app.model.catalog import get_model
from sparsity_app.model.tokens import TOKENIZER_LOCK


@functools.cache
def training_sequences(seq_len: int) -> np.ndarray:
    """int64 [n, seq_len]: [CLS] + seq_len - 2 consecutive word pieces of one document + [SEP].

    Each document is cut into as many full sequences as it holds (a shorter tail is dropped), so no
    sequence needs padding. ~4.7k sequences of 128 tokens, ~44k of 16.
    """
    tok = get_model("minilm-l6").tokenizer()
    body = seq_len - 2
    with TOKENIZER_LOCK:
        ids = tok(list(data.training_documents()), add_special_tokens=False)["input_ids"]
    rows = [[tok.cls_token_id, *doc[i:i + body], tok.sep_token_id]
            for doc in ids for i in range(0, len(doc) - body + 1, body)]
    out = np.asarray(rows, dtype=np.int64)
    out.setflags(write=False)
    return out


FIDELITY_STRIDE, FIDELITY_COUNT = 18, 256  # fidelity reads every 18th 128-token sequence, the first 256 of them


def fidelity_sequences() -> np.ndarray:
    """The 128-token sequences fidelity (accuracy.metrics) scores on: int64 [256, 128]."""
    return training_sequences(128)[::FIDELITY_STRIDE][:FIDELITY_COUNT]


def calibration_draw(seed: int, samples: int, seq_len: int = 128) -> np.ndarray:
    """`samples` sequences of `training_sequences(seq_len)` drawn at random by `seed` (without
    replacement, in corpus order), never one of the `fidelity_sequences` (a knob chosen by fidelity must
    not be scored on the text it calibrated on): int64 [samples, seq_len]. Draws 0, 1, 2 are the three
    calibration sets that one-shot accuracy verdicts average over."""
    seqs = training_sequences(seq_len)
    allowed = np.arange(len(seqs))
    if seq_len == 128:
        allowed = allowed[~np.isin(allowed, allowed[::FIDELITY_STRIDE][:FIDELITY_COUNT])]
    if not 1 <= samples <= len(allowed):
        raise ValueError(f"samples must be in [1, {len(allowed)}], got {samples}")
    return seqs[np.sort(np.random.default_rng(seed).choice(allowed, samples, replace=False))]
