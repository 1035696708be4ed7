"""One encoder for every sentence length: executables compiled at a few lengths (buckets), each input
padded inside to the smallest bucket that holds it.

Our kernels are specialised to their token count (static shapes, tiles and tunings per count), so a
deployment would otherwise pad everything to the longest length or recompile per length. Padding
inside is exact for the real tokens: padded positions are masked out of every attention (their keys
get the additive mask HF uses), and every other operator works per token; their rows are cut off
the output. The default buckets grow by at most 1.5x (8, 12, 16, 24, 32, 48, ...), so a padded
pass does at most 1.5x the work of an exact one; `bench-model --lengths` measures the time per length.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np

from sparsity_app.core.errors import UserError

if TYPE_CHECKING:  # the graph loads TVM; a bucket list and the padding need none of it
    from sparsity_app.model.graph import Encoder

PAD_ID = 0  # [PAD] in BERT vocabularies; its rows are masked out and cut off, so any valid id would do


def default_buckets(longest: int) -> list[int]:
    """Lengths 8, 12, 16, 24, 32, 48, ... (each 1.5x or 4/3x the last, all multiples of 4) up to and
    including the first >= longest."""
    if longest < 1:
        raise UserError(f"the longest length must be >= 1, got {longest}")
    out = [8]
    while out[-1] < longest:
        step = out[-1] // 2 if (out[-1] & (out[-1] - 1)) == 0 else out[-1] // 3  # 2^k -> 1.5x, 1.5 * 2^k -> 4/3x
        out.append(out[-1] + step)
    return out


class BucketedEncoder:
    """input_ids / attention_mask int64 [batch, seq] for any seq up to the largest bucket ->
    last_hidden_state float32 [batch, seq, hidden].

    buckets: increasing lengths (e.g. `default_buckets(longest)`); batch: the sequences per call;
    encoder_at: (length) -> graph.Encoder compiled for (batch, length), called once per bucket, on
    the first input that needs it.
    """

    def __init__(self, buckets: list[int], batch: int, encoder_at: Callable[[int], Encoder]):
        if not buckets or sorted(set(buckets)) != list(buckets):
            raise UserError(f"buckets must be increasing lengths, got {buckets}")
        self.buckets, self.batch, self._encoder_at = list(buckets), batch, encoder_at
        self._encoders: dict[int, Encoder] = {}

    def encoder(self, length: int) -> Encoder:
        """The executable of the bucket that holds `length` tokens (compiled on first use)."""
        bucket = next((b for b in self.buckets if b >= length), None)
        if bucket is None:
            raise UserError(f"{length} tokens is longer than the largest bucket, {self.buckets[-1]}")
        if bucket not in self._encoders:
            self._encoders[bucket] = self._encoder_at(bucket)
        return self._encoders[bucket]

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        ids = np.asarray(input_ids, np.int64)
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int64)
        if ids.ndim != 2 or ids.shape[0] != self.batch or mask.shape != ids.shape:
            raise UserError(f"input_ids and attention_mask must be [{self.batch}, seq] alike, got "
                            f"{list(ids.shape)} and {list(mask.shape)}")
        seq = ids.shape[1]
        encoder = self.encoder(seq)
        padded_ids = np.full((self.batch, encoder.seq), PAD_ID, np.int64)
        padded_mask = np.zeros((self.batch, encoder.seq), np.int64)
        padded_ids[:, :seq], padded_mask[:, :seq] = ids, mask
        return encoder(padded_ids, padded_mask)[:, :seq]
