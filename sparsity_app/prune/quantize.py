"""INT8 quantization of a linear layer, and the NumPy reference of the arithmetic the INT8 kernels do.

Weights: symmetric, one scale per output channel, w ~ q * scale with q int8 in [-127, 127] and
scale = max |w[row]| / 127 over the row's kept weights. Pruning decides the mask on the float32
weights first and only the kept weights are quantized: a zero stays exactly zero (the sparse format
stores the same pattern), and a row's scale is set by what it keeps, so a pruned row whose largest
weight went keeps a finer step.

Activations: dynamic, per token (like ONNX Runtime's `quantize_dynamic`, per row instead of per
tensor): x ~ c * xscale[t], c = rint(x * levels / max |x[t]|) in [-levels, levels]. The integer dot of
the CPU takes unsigned activations (u8 x s8 -> s32, four products per 32-bit lane), so the kernels
store c + offset as uint8 and take offset * sum_k q[n, k] back out of the s32 accumulator:
  Y[t, n] = float32(acc[t, n] - offset * colsum[n]) * xscale[t] * wscale[n],  acc = sum_k (c + offset) q.
`levels` depends on the instruction (`LEVELS`): VNNI's vpdpbusd sums in 32 bits, so activations keep
8 bits (levels 127, offset 128, codes 1..255). Without VNNI, AVX2's vpmaddubsw adds pairs of u8 x s8
products into *saturating* int16 first, so activations keep 7 bits (levels 63, offset 64, codes
1..127: a pair is at most 2 x 127 x 127 = 32258 < 32767) -- the reduce_range PyTorch's fbgemm uses
on such CPUs for the same reason.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from sparsity_app.prune.formats import BSR, to_bsr

# integer dot (kernels.VectorISA.int8_dot) -> (levels, offset) of the activation codes
LEVELS = {"vnni": (127, 128), "avx2": (63, 64)}
TINY = np.float32(1e-30)  # a token of zeros gets scale 0 and codes `offset`, not a division by zero


def int8_misfit(block: tuple[int, int], nm: tuple[int, int] | None) -> str | None:
    """None if the INT8 kernels run this pattern, else the one-line reason they do not."""
    if nm is not None:
        return "INT8 runs block patterns only (no N:M kernel yet): use a block such as 16x4, or fp32 for N:M"
    bs_r, bs_c = block
    if bs_c % 4:
        return (f"INT8 blocks need a multiple of 4 input columns, got {bs_r}x{bs_c}: the CPU's integer dot sums "
                f"four products of consecutive inputs per lane (try {bs_r}x4, 16x4, 8x4, 4x4 or 1x4; "
                f"{bs_r}x{bs_c} runs in fp32)")
    return None


@dataclasses.dataclass(frozen=True)
class QuantizedRows:
    """A weight [out, in] as int8 codes with one float32 scale per output row."""

    codes: np.ndarray  # int8 [out, in]; pruned entries 0
    scales: np.ndarray  # float32 [out]: w ~ codes * scales[:, None]

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes

    def to_dense(self) -> np.ndarray:
        """float32 [out, in], as the float reference of a graph multiplies (`dequantized`)."""
        return self.dequantized()

    def dequantized(self) -> np.ndarray:
        """float32 [out, in]: what the INT8 kernels multiply by, in float."""
        return self.codes.astype(np.float32) * self.scales[:, None]

    def column_sums(self, offset: int) -> np.ndarray:
        """int32 [out]: offset * sum_k codes[n, k], the term the unsigned activation codes add."""
        return (offset * self.codes.astype(np.int32).sum(axis=1)).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class QuantizedBSR:
    """A pruned weight's kept blocks as INT8 codes (BSR of the codes), with one float32 scale per row."""

    bsr: BSR  # data int8 [nnz_blocks, bs_r, bs_c] codes; indices, indptr as prune.formats.BSR
    scales: np.ndarray  # float32 [out]

    shape = property(lambda self: self.bsr.shape)
    block = property(lambda self: self.bsr.block)
    nnz_blocks = property(lambda self: self.bsr.nnz_blocks)
    density = property(lambda self: self.bsr.density)

    @property
    def nbytes(self) -> int:
        return self.bsr.nbytes + self.scales.nbytes

    def rows(self) -> QuantizedRows:
        """The same codes and scales as a dense [out, in] (what the NumPy reference multiplies by)."""
        return QuantizedRows(self.bsr.to_dense().astype(np.int8), self.scales)

    def to_dense(self) -> np.ndarray:
        """float32 [out, in]: the dequantized kept weights, zeros elsewhere."""
        return self.rows().dequantized()

    def column_sums(self, offset: int) -> np.ndarray:
        """int32 [out]: offset * the sum of each row's codes."""
        return self.rows().column_sums(offset)


def to_quantized_bsr(weight: np.ndarray, mask: np.ndarray, block: tuple[int, int]) -> QuantizedBSR:
    """The kept weights (weight * mask, float32 [out, in]) quantized per row, stored as BSR of `block`."""
    rows = quantize_rows(np.where(mask, weight, np.float32(0)).astype(np.float32))
    bsr = to_bsr(rows.codes.astype(np.float32), mask, block)
    return QuantizedBSR(BSR(bsr.data.astype(np.int8), bsr.indices, bsr.indptr, bsr.shape), rows.scales)


def quantize_rows(weight: np.ndarray) -> QuantizedRows:
    """Symmetric per-output-channel INT8 of float32 [out, in] (its zeros stay zero)."""
    peak = np.abs(weight).max(axis=1).astype(np.float32)
    scales = (peak / np.float32(127)).astype(np.float32)
    safe = np.where(scales > 0, scales, np.float32(1))
    codes = np.clip(np.rint(weight / safe[:, None]), -127, 127).astype(np.int8)
    return QuantizedRows(codes, scales)


def quantize_tokens(x: np.ndarray, levels: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """(codes uint8 [tokens, in] = c + offset, scales float32 [tokens]) of float32 X [tokens, in].

    The same float32 operations, in the same order, as the kernels' quantizing phase (kernels.int8),
    so both round every value the same way.
    """
    peak = np.abs(x).max(axis=1).astype(np.float32)
    inv = (np.float32(levels) / np.maximum(peak, TINY)).astype(np.float32)
    codes = (np.rint((x * inv[:, None]).astype(np.float32)).astype(np.int32) + offset).astype(np.uint8)
    return codes, (peak / np.float32(levels)).astype(np.float32)


def int8_linear(x: np.ndarray, weight: QuantizedRows, dot: str) -> np.ndarray:
    """Y float32 [tokens, out] exactly as an INT8 kernel with integer dot `dot` computes it.

    x: float32 [tokens, in]. The s32 accumulation is exact: here in float64 (BLAS; every partial sum is
    an integer below 255 * 127 * in < 2**53), and no kernel shape comes near 2**31. The epilogue is the
    kernels' float32 expression, so a correct kernel agrees to the bit.
    """
    levels, offset = LEVELS[dot]
    codes, xscale = quantize_tokens(x, levels, offset)
    acc = np.rint(codes.astype(np.float64) @ weight.codes.astype(np.float64).T).astype(np.int64)
    centred = (acc - weight.column_sums(offset)).astype(np.int32).astype(np.float32)
    return (centred * xscale[:, None]).astype(np.float32) * weight.scales[None, :]


def int8_layers(weights: dict[str, np.ndarray], dot: str) -> dict:
    """layer -> x float32 [tokens, in] -> Y float32 [tokens, out]: each weight (float32 [out, in], pruned
    or not) run as an INT8 kernel with integer dot `dot` runs it (`int8_linear`), for
    model.hf.masked_copy's `outputs`: the model evaluated with these linears in INT8."""
    def layer(rows: QuantizedRows):
        return lambda x: int8_linear(x, rows, dot)
    return {name: layer(quantize_rows(w)) for name, w in weights.items()}
