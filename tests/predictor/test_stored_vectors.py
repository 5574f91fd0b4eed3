"""Search by listing reads the vectors the index already holds (lookalike/predictor/index/stored.py), for
every index kind: exact, IVF-Flat (exactly), IVF-PQ (its re-ranking copy); a listing's first photo unless a
photo is named; unknown listings and photos are a 404; updates are followed."""
from __future__ import annotations

import numpy as np
import pytest

from lookalike.core.errors import status_of
from lookalike.predictor.index import PQ_FACTORY, UnknownListing, VectorIndex

from tests.predictor.test_index import MODEL, clustered

N = 2000


def _photos(n: int) -> tuple[list[str], list[str]]:
    """Two photos per listing: listing i has photos "0" (row 2i) and "1" (row 2i+1)."""
    return [f"listing-{i // 2:04d}" for i in range(n)], [str(i % 2) for i in range(n)]


@pytest.fixture(scope="module")
def data():
    return clustered(N, seed=3)


@pytest.mark.parametrize("factory, atol", [("Flat", 1e-6), ("IVF16,Flat", 1e-6), (PQ_FACTORY, 0.05)])
def test_a_listing_s_stored_vector_is_read_back(data, factory, atol):
    ids, photos = _photos(N)
    idx = VectorIndex.build(data, ids, photo_ids=photos, model_version=MODEL, factory=factory, target_recall=0.5,
                            tune_queries=50)
    vector, photo = idx.vector_of("listing-0123")
    assert photo == "0" and np.abs(vector - data[246]).max() < atol
    vector, photo = idx.vector_of("listing-0123", "1")
    assert photo == "1" and np.abs(vector - data[247]).max() < atol
    assert abs(np.linalg.norm(vector) - 1) < 1e-5
    # searching with it finds the listing itself first
    assert idx.search(vector[None], top_k=3).listing_ids[0][0] == "listing-0123"


def test_unknown_listings_and_photos_are_not_found(data):
    ids, photos = _photos(N)
    idx = VectorIndex.build(data, ids, photo_ids=photos, model_version=MODEL, factory="IVF16,Flat",
                            target_recall=0.5, tune_queries=50)
    for args in (("no-such-listing",), ("listing-0001", "7")):
        with pytest.raises(UnknownListing) as err:
            idx.vector_of(*args)
        assert status_of(err.value) == 404 and args[-1] in str(err.value)


def test_updates_are_followed_without_reading_a_moved_vector(data):
    ids, photos = _photos(N)
    idx = VectorIndex.build(data[:1000], ids[:1000], photo_ids=photos[:1000], model_version=MODEL,
                            factory="IVF16,Flat", target_recall=0.5, tune_queries=50)
    assert np.allclose(idx.vector_of("listing-0400")[0], data[800], atol=1e-6)  # the map is built now
    idx.remove(["listing-0000", "listing-0001", "listing-0002"])  # moves other vectors within their lists
    idx.add(data[1000:1200], ids[1000:1200], photo_ids=photos[1000:1200])
    for listing in range(3, 600, 7):
        assert np.allclose(idx.vector_of(f"listing-{listing:04d}")[0], data[2 * listing], atol=1e-6), listing
    with pytest.raises(UnknownListing):
        idx.vector_of("listing-0001")
