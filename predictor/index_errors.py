"""The errors of the vector index: each says what is wrong and what to do about it.

`BadIndexInput` is a `ValueError` (a caller's mistake: the server answers 400); the others are about
artifacts (a mismatched or damaged index: the server refuses to load it).
"""
from __future__ import annotations


class VectorIndexError(RuntimeError):
    """Base class of the index's errors."""


class BadIndexInput(VectorIndexError, ValueError):
    """Vectors, ids, labels or search parameters that the index cannot accept; nothing was changed."""


class IndexMismatch(VectorIndexError):
    """The index was built for another model version or embedding dimension than the one in hand."""


class CorruptIndex(VectorIndexError):
    """An index folder that is incomplete, truncated or altered."""
