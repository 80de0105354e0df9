"""The checksum of gradient rows (format 3), computed and verified with vectorized numpy.

HDF5's fletcher32 filter reads at about 2.3 GB/s in one thread (a serial loop over 16-bit words),
which was most of the cost of streaming float16 shards. Format 3 stores the gradient rows in
unfiltered chunks and, next to them, two sums per chunk:

    x_0 .. x_{N-1}   the chunk's data bytes (its rows, without HDF5's padding of a last partial
                     chunk), zero-padded to a multiple of 8 bytes, as little-endian uint64 words
    s1 = sum_j x_j            mod 2^64
    s2 = sum_j (j + 1) x_j    mod 2^64

Both are sums of 64-bit words, so numpy computes them at memory speed: with the words of a chunk
laid out as a [N/m, m] matrix, s1 and s2 follow from its row sums S and column sums C,
s2 = m * sum_r r S_r + sum_c (c + 1) C_c (two reductions, no serial dependency).

Strength, against fletcher32 (two 16-bit sums mod 65535 over 16-bit words, one per 512 KiB chunk):
any change confined to two adjacent words (any 16 consecutive bytes, any bit pattern) changes
(s1, s2): a change e in word a and f in word a+1 leaves s1 only if f = -e, and then s2 changes by
-e, which is nonzero. fletcher32 misses some single-word changes (0x0000 <-> 0xffff). Reordered
words change s2 (the position weights), as fletcher's second sum does. The check values are 128
bits per 64 KiB against 32 bits per 512 KiB.
"""

from __future__ import annotations

import numpy as np

NAME = "sum64x2"  # the algorithm, as named by the 'checksum' attribute of a checked dataset
_WORD = 8


def _split(n_words: int) -> int:
    """m: a divisor of n_words near 256, the width of the [n_words / m, m] layout."""
    for m in range(min(n_words, 256), 0, -1):
        if n_words % m == 0:
            return m
    return 1


def _sums_of_words(words: np.ndarray) -> np.ndarray:
    """[n, 2] uint64 (s1, s2) of n chunks whose words are the rows of words [n, N] (uint64)."""
    n, N = words.shape
    if N == 0:
        return np.zeros((n, 2), np.uint64)
    m = _split(N)
    x = words.reshape(n, N // m, m)
    S = x.sum(axis=2, dtype=np.uint64)  # [n, N/m]; uint64 arithmetic wraps mod 2^64, as intended
    C = x.sum(axis=1, dtype=np.uint64)  # [n, m]
    r = np.arange(N // m, dtype=np.uint64)
    c = np.arange(1, m + 1, dtype=np.uint64)
    out = np.empty((n, 2), np.uint64)
    out[:, 0] = C.sum(axis=1, dtype=np.uint64)
    out[:, 1] = (S * r).sum(axis=1, dtype=np.uint64) * np.uint64(m) + (C * c).sum(axis=1, dtype=np.uint64)
    return out


def _padded_words(data: np.ndarray) -> np.ndarray:
    n = len(data)
    buf = np.zeros(-(-n // _WORD) * _WORD, np.uint8)
    buf[:n] = data
    return buf.view("<u8")


def chunk_sums(data: np.ndarray, chunk_bytes: int) -> np.ndarray:
    """(s1, s2) of each chunk of `data` (bytes, any dtype: its raw bytes are used): [n_chunks, 2]
    uint64. Every chunk holds chunk_bytes bytes except the last, which may be shorter."""
    raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    n_full = len(raw) // chunk_bytes
    sums = []
    if n_full and chunk_bytes % _WORD == 0:
        full = raw[:n_full * chunk_bytes]
        sums.append(_sums_of_words(full.view("<u8").reshape(n_full, chunk_bytes // _WORD)))
    else:
        sums += [_sums_of_words(_padded_words(raw[i * chunk_bytes:(i + 1) * chunk_bytes])[None])
                 for i in range(n_full)]
    if len(raw) > n_full * chunk_bytes:
        sums.append(_sums_of_words(_padded_words(raw[n_full * chunk_bytes:])[None]))
    return np.concatenate(sums) if sums else np.zeros((0, 2), np.uint64)


def as_stored(sums: np.ndarray) -> np.ndarray:
    """The sums as the int64 dataset stores them (the same 64 bits)."""
    return np.ascontiguousarray(sums, np.uint64).view(np.int64)


def mismatches(data: np.ndarray, chunk_bytes: int, stored: np.ndarray) -> np.ndarray:
    """Indices (into `stored`) of the chunks of `data` whose sums differ from `stored` [n, 2]."""
    got = chunk_sums(data, chunk_bytes)
    want = np.ascontiguousarray(stored).view(np.uint64).reshape(-1, 2)
    if got.shape != want.shape:
        return np.arange(len(want))
    return np.flatnonzero((got != want).any(axis=1))
