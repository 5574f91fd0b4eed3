"""The emoji development catalog: a small slice imported into the test S3 server, and its labels.

The design sets install with ./install.sh (Debian's fonts-noto-color-emoji and unicode-data, npm tarballs
in $LOOKALIKE_HOME/sources). A machine without them fails here with what to install: never a silent skip.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lookalike.core.s3 import ObjectStore, StoreError
from lookalike.catalogs.rows import CatalogError
from lookalike.catalogs.emoji import (DESIGN_SETS, SIZE, EmojiSources, color_of, find_sources, import_emoji,
                                      read_emoji_test)

REPO = Path(__file__).resolve().parents[2]
SOURCES_DIR = Path(os.environ.get("LOOKALIKE_HOME", REPO / ".lookalike")) / "sources"


@pytest.fixture(scope="module")
def sources() -> EmojiSources:
    found = find_sources(SOURCES_DIR)
    assert not found.missing, ("emoji sources are missing (./install.sh installs them):\n"
                               + "\n".join(found.missing.values()))
    return found


class _RecordingStore(ObjectStore):
    """Records the order of uploads; can die after a number of them, like a store that goes away."""

    def __init__(self, settings, dies_after: int | None = None):
        super().__init__(settings)
        self.keys: list[str] = []
        self.dies_after = dies_after

    def put_bytes(self, key, data, content_type="application/octet-stream"):
        if self.dies_after is not None and len(self.keys) >= self.dies_after:
            raise StoreError("cannot upload: the S3 server does not answer")
        super().put_bytes(key, data, content_type)
        self.keys.append(key)


def _jsonl(store: ObjectStore, name: str) -> list[dict]:
    return [json.loads(line) for line in store.get_bytes(f"catalogs/{name}/catalog.jsonl").decode().splitlines()]


def test_colour_labels_come_from_the_name_only():
    assert color_of("red apple") == "red"
    assert color_of("green book") == "green"
    assert color_of("light blue heart") == "blue"
    assert color_of("grey heart") == color_of("gray cat") == "grey"
    assert color_of("black large square") == "black"
    for name in ("grapes", "grinning face", "orangutan", "man: red hair", "person with white cane"):
        assert color_of(name) is None, name


def test_concepts_are_fully_qualified_without_skin_tones(sources):
    concepts = read_emoji_test(sources.emoji_test)
    ids = [c.listing_id for c in concepts]
    assert len(ids) == len(set(ids)) > 1500
    apple = next(c for c in concepts if c.name == "red apple")
    assert apple.listing_id == "emoji-1f34e" and apple.labels() == {
        "group": "Food & Drink", "subgroup": "food-fruit", "color": "red"}
    assert apple.metadata() == {"kind": "render", "codepoints": "1F34E"}
    assert not any(0x1F3FB <= cp <= 0x1F3FF for c in concepts for cp in c.codepoints)
    assert "thumbs up" in {c.name for c in concepts} and all(c.group != "Component" for c in concepts)


def test_a_slice_imports_as_a_multi_view_catalog_and_a_shopper_catalog(store, sources):
    recording = _RecordingStore(store.settings)
    result = import_emoji(recording, sources=sources, groups=["Food & Drink"], limit=24, workers=2, progress=False)
    catalog_sets = [s for s in DESIGN_SETS if s != "noto"]

    listings = _jsonl(store, "emoji")
    assert result.listings == len(listings) == 24
    assert [row["listing_id"] for row in listings][:2] == ["emoji-1f347", "emoji-1f348"]  # grapes, melon
    for row in listings:
        photos = row["images"]
        assert len(photos) >= 2 and len({p["photo_id"] for p in photos}) == len(photos)
        assert {p["photo_id"] for p in photos} <= set(catalog_sets)
        assert all(p["source"] == "catalog" for p in photos)
        assert all(p["uri"] == store.uri(f"catalogs/emoji/images/{row['listing_id']}/{p['photo_id']}.png")
                   for p in photos)
        assert row["metadata"]["kind"] == "render" and row["labels"]["group"] == "Food & Drink"
    by_title = {row["title"]: row for row in listings}
    assert by_title["red apple"]["labels"]["color"] == "red"
    assert by_title["green apple"]["labels"]["color"] == "green"
    assert "color" not in by_title["grapes"]["labels"]
    assert result.photos == {s: sum(p["photo_id"] == s for row in listings for p in row["images"])
                             for s in catalog_sets}

    shopper = _jsonl(store, "emoji-shopper")
    assert [row["listing_id"] for row in shopper] == [row["listing_id"] for row in listings]
    assert all([(p["photo_id"], p["source"]) for p in row["images"]] == [("noto", "user_photo")]
               for row in shopper)
    assert result.heldout_photos == len(shopper) and "renders, not photographs" in str(result)

    # Renders are colour, at the chosen size: RGB, and far from grey.
    apple = by_title["red apple"]
    for uri in [p["uri"] for p in apple["images"]] + [shopper[listings.index(apple)]["images"][0]["uri"]]:
        img = Image.open(io.BytesIO(store.get_bytes(uri.split("/", 3)[3])))
        assert img.mode == "RGB" and img.size == (SIZE, SIZE), uri
        pixels = np.asarray(img, dtype=np.int16)
        assert np.abs(pixels[..., 0] - pixels[..., 1]).mean() > 20, f"{uri} is not a colour image"
        assert (pixels[..., 0] > pixels[..., 2] + 60).mean() > 0.2, f"{uri}: a red apple is not red"

    # Each catalog's JSONL is written after all of its images.
    catalog_at = recording.keys.index("catalogs/emoji/catalog.jsonl")
    images = [i for i, k in enumerate(recording.keys) if k.startswith("catalogs/emoji/images/")]
    assert len(images) == sum(result.photos.values()) and max(images) < catalog_at
    shopper_at = recording.keys.index("catalogs/emoji-shopper/catalog.jsonl")
    assert all(i < shopper_at for i, k in enumerate(recording.keys) if k.startswith("catalogs/emoji-shopper/images/"))

    # A re-import renders nothing that is already there.
    again = _RecordingStore(store.settings)
    import_emoji(again, sources=sources, groups=["Food & Drink"], limit=24, workers=2, progress=False)
    assert not [k for k in again.keys if "/images/" in k]


def test_holdout_set_is_selectable_and_a_limited_slice_starts_in_unicode_order(store, sources):
    result = import_emoji(store, sources=sources, sets=["fluent", "twemoji", "noto"], holdout_set="twemoji",
                          limit=5, name="emoji-small", shopper_name="emoji-small-shopper", progress=False)
    listings = _jsonl(store, "emoji-small")
    assert [row["listing_id"] for row in listings][:1] == ["emoji-1f600"]  # grinning face: Unicode's first
    assert all({p["photo_id"] for p in row["images"]} == {"fluent", "noto"} for row in listings)
    assert {p["photo_id"] for row in _jsonl(store, "emoji-small-shopper") for p in row["images"]} == {"twemoji"}
    assert result.listings == 5


def test_interrupted_import_publishes_no_catalog(store, sources):
    dying = _RecordingStore(store.settings, dies_after=6)
    with pytest.raises(StoreError):
        import_emoji(dying, sources=sources, limit=8, workers=2, progress=False)
    assert not store.exists("catalogs/emoji/catalog.jsonl")
    assert not store.exists("catalogs/emoji-shopper/catalog.jsonl")


def test_missing_sources_say_how_to_get_them(tmp_path, store, sources):
    found = find_sources(tmp_path, sets=["fluent", "twemoji", "openmoji"])
    for name in ("fluent", "twemoji", "openmoji"):
        assert "npm pack" in found.missing[name] and str(tmp_path) in found.missing[name]
    # With one catalog set left there is no multi-view catalog: one clear error, nothing published.
    only = EmojiSources(sources.emoji_test, {s: sources.renderers[s] for s in ("fluent", "noto")},
                        {"twemoji": found.missing["twemoji"]}, tmp_path)
    with pytest.raises(CatalogError, match="two design sets.*npm pack"):
        import_emoji(store, sources=only, limit=3, progress=False)
    assert not store.list("catalogs/")
    with pytest.raises(CatalogError, match="unknown design set"):
        find_sources(tmp_path, sets=["apple"])
    with pytest.raises(CatalogError, match="--limit must be positive"):
        import_emoji(store, sources=sources, limit=0, progress=False)


def test_a_limited_import_spreads_over_every_group():
    from types import SimpleNamespace

    from lookalike.catalogs.emoji import spread_over_groups

    concepts = [SimpleNamespace(group=g, n=i) for g, size in (("Smileys", 50), ("Flags", 5), ("Food", 20))
                for i in range(size)]
    picked = spread_over_groups(concepts, 12)
    assert len(picked) == 12 and [c.group for c in picked].count("Flags") == 4
    assert {c.group for c in picked} == {"Smileys", "Flags", "Food"}
    assert picked == [c for c in concepts if c in picked]  # Unicode's order kept
    assert spread_over_groups(concepts, 12) == picked  # deterministic
    assert len(spread_over_groups(concepts, 500)) == len(concepts)
