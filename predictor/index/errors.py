"""The errors of the vector index, in the project's one error family (`lookalike.core.errors`).

Each says what is wrong and what to do about it, and carries the status a server answers with:

- `BadIndexInput` (400): vectors, ids, labels or search parameters a caller got wrong; nothing changed.
  It is an `InputError`, hence also a `ValueError`.
- `IndexMismatch` (503): an index built for another model version or dimension than the model in hand.
- `CorruptIndex` (503): an index folder that is incomplete, truncated or altered. It is an
  `IndexCardError` too (the card's own errors, `lookalike.core.index_card`), so whoever catches either
  catches a damaged index; the predictor turns the card's errors into `CorruptIndex` at its boundary.

Both 503s are `ArtifactError`s, like every other unusable artifact: a server cannot serve such an index.
"""
from __future__ import annotations

from lookalike.core.artifacts import ArtifactError
from lookalike.core.errors import InputError, LookalikeError
from lookalike.core.index_card import IndexCardError


class VectorIndexError(LookalikeError):
    """Base class of the index's errors."""


class BadIndexInput(VectorIndexError, InputError):
    """Vectors, ids, labels or search parameters that the index cannot accept; nothing was changed."""

    status = 400


class IndexMismatch(VectorIndexError, ArtifactError):
    """The index was built for another model version or embedding dimension than the one in hand."""

    status = 503


class CorruptIndex(VectorIndexError, IndexCardError):
    """An index folder that is incomplete, truncated or altered."""

    status = 503
