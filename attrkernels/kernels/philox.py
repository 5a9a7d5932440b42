"""Philox4x32-10, the counter-based generator behind every random projection.

Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011) maps a
128-bit counter (c0, c1, c2, c3) and a 64-bit key (k0, k1) to 128 random bits. One round is

    (hi0, lo0) = M0 * c0        (32 x 32 -> 64-bit product, M0 = 0xD2511F53)
    (hi1, lo1) = M1 * c2        (M1 = 0xCD9E8D57)
    (c0, c1, c2, c3) <- (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)

and the key is bumped by the Weyl constants (0x9E3779B9, 0xBB67AE85) between rounds. This is the
same generator as cuRAND's Philox and Triton's ``tl.randint4x``.

The implementation here works on NumPy or torch integer arrays (int64 holding uint32 values), so
one definition serves both the NumPy oracle used by the tests and the torch reference backend.
"""
from __future__ import annotations

MASK32 = 0xFFFFFFFF
ROUND_MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
KEY_INCREMENTS = (0x9E3779B9, 0xBB67AE85)
ROUNDS = 10

# Tag stored in counter word 3 that separates the streams of different uses of one seed.
STREAM_RADEMACHER = 0x52414445  # "RADE"
STREAM_GAUSSIAN = 0x47415553  # "GAUS"
STREAM_SEED = 0x53454544  # "SEED"


def split_seed(seed: int) -> tuple[int, int]:
    """The Philox key (k0, k1) of a 64-bit seed: its low and high 32-bit words."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return seed & MASK32, (seed >> 32) & MASK32


def philox4x32(c0, c1, c2, c3, seed: int):
    """Philox4x32-10 of counter words (int64 arrays or ints holding uint32 values).

    Arrays broadcast against each other; returns four int64 arrays of uint32 values.
    """
    k0, k1 = split_seed(seed)
    m0, m1 = ROUND_MULTIPLIERS
    for _ in range(ROUNDS):
        p0 = c0 * m0  # wraps modulo 2**64 in int64; bits 0..63 are the exact product
        p1 = c2 * m1
        hi0, lo0 = (p0 >> 32) & MASK32, p0 & MASK32
        hi1, lo1 = (p1 >> 32) & MASK32, p1 & MASK32
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + KEY_INCREMENTS[0]) & MASK32
        k1 = (k1 + KEY_INCREMENTS[1]) & MASK32
    return c0, c1, c2, c3


def derive_seed(seed: int, index: int) -> int:
    """A 64-bit seed for member ``index`` (a checkpoint, an ensemble member) of run ``seed``.

    derive_seed(s, i) = w0 | w1 << 32 where (w0, w1, _, _) = Philox(counter = (i_lo, i_hi, 0,
    "SEED"), key = s). Distinct indices give unrelated projections; the same (s, i) always gives
    the same one.
    """
    if not isinstance(index, int) or not 0 <= index < 2**64:
        raise ValueError(f"index must be an int in [0, 2**64), got {index!r}")
    w0, w1, _, _ = philox4x32(index & MASK32, index >> 32, 0, STREAM_SEED, seed)
    return int(w0) | (int(w1) << 32)
