"""The transformer's answer: what an app displays for each match, joined from the listing metadata.

Per photo searched with, one `matches` JSON document:

    {"labels": {"category": {"label": "footwear", "probability": 0.93}, …},      predicted for the photo
     "box": {"box": [0.21, 0.3, 0.74, 0.83], "searched": "crop", "confidence": 0.82,
             "region": [0.15, 0.24, 0.8, 0.89]}                   where the product is; the part searched
     "matches": [{"listing_id": "L1", "title": "Red sneaker", "score": 0.91,
                  "labels": {"category": "footwear", "color": "red"},             all the listing's labels
                  "metadata": {"url": "https://…", "price": "49.00"},            its free-form fields
                  "photo_id": "side",                                            the photo that matched
                  "image_url": "https://… or a presigned store URL",            that photo, fetchable
                  "image_urls": ["…", "…"],                                      all its photos, fetchable
                  "category": "footwear", "image": "…"}, …]}                    (as before: labels["category"],
                                                                                 image_url)

and the BYTES tensors [N, k] `titles`, `categories`, `image_uris` (the matched photo, fetchable) and
`photo_ids` beside the predictor's `listing_ids` and `scores`. A photo is never answered as a bare
`s3://` URI (see `lookalike.transformer.metadata.PhotoUrls`); a catalog photo on the server's disk is answered by
its path in `image`/`image_uris` only (no app can fetch it: `image_url` is "").
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from lookalike.transformer.metadata import ListingMetadata, PhotoUrls


@dataclass
class Joined:
    """The per-match tensors [N, k] and one JSON document per photo."""

    titles: np.ndarray
    categories: np.ndarray
    image_uris: np.ndarray
    photo_ids: np.ndarray
    documents: np.ndarray


def shown_location(location: str, url: str) -> str:
    """What the old `image`/`image_uris` fields carry: the fetchable URL, else a local path, never s3://."""
    if url or location.startswith("s3://"):
        return url
    return location


def join(ids: np.ndarray, photo_ids: np.ndarray | None, scores: np.ndarray, labels: dict[str, list[str]],
         probs: dict[str, np.ndarray], metadata: ListingMetadata, urls: PhotoUrls,
         searched: list[dict[str, Any]] | None = None) -> Joined:
    """Join listing ids [N, k] (and the photo of each that matched, when the predictor says) with the
    catalogs' listings; `searched` is the box each photo searched (`lookalike.transformer.localise`)."""
    n, k = ids.shape
    titles = np.empty((n, k), dtype=object)
    cats = np.empty((n, k), dtype=object)
    shown = np.empty((n, k), dtype=object)
    photos = np.empty((n, k), dtype=object)
    documents = []
    for i in range(n):
        matches: list[dict[str, Any]] = []
        for j in range(k):
            lid = text(ids[i, j])
            photo_id = text(photo_ids[i, j]) if photo_ids is not None else ""
            if not lid:
                titles[i, j] = cats[i, j] = shown[i, j] = photos[i, j] = b""
                continue
            listing = metadata.get(lid)
            location = listing.photo(photo_id or None)
            url = urls.url(location) if location else ""
            image = shown_location(location, url)
            titles[i, j], cats[i, j] = listing.title.encode(), listing.category.encode()
            shown[i, j], photos[i, j] = image.encode(), photo_id.encode()
            every = [urls.url(loc) for _, loc in listing.photos]
            matches.append({"listing_id": lid, "title": listing.title, "score": round(float(scores[i, j]), 6),
                            "labels": dict(listing.labels), "metadata": dict(listing.metadata),
                            "photo_id": photo_id or (listing.photos[0][0] if listing.photos else ""),
                            "image_url": url, "image_urls": [u for u in every if u],
                            "category": listing.category, "image": image})
        document: dict[str, Any] = {
            "labels": {t: {"label": labels[t][i], "probability": round(float(probs[t][i]), 6)} for t in labels},
            "matches": matches}
        if searched is not None and i < len(searched):
            document["box"] = searched[i]
        documents.append(json.dumps(document, ensure_ascii=False).encode())
    return Joined(titles, cats, shown, photos, np.array(documents, dtype=object))


def text(value: Any) -> str:
    if isinstance(value, (bytes, bytearray, np.bytes_)):
        return bytes(value).decode("utf-8", "replace")
    return str(value)
