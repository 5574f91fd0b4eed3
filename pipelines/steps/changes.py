"""An update's change set: what one `update` run does to the index its alias pointed at, kept in the
updated index's folder so that, when another run published first, the publish step can apply the same
change again on the newer index (`publish_index`). Nothing an update was asked to do is lost that way:
its new and changed listings and, above all, its delistings.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FOLDER = "changes"


@dataclass
class ChangeSet:
    parent: str | None  # the index version the run read and changed
    vectors: np.ndarray  # [N, D]: every photo of the new and changed listings
    listing_ids: list[str]
    photo_ids: list[str]
    labels: dict[str, list[str | None]]  # per task, per row
    delisted: list[str]
    catalog: str | None
    ref: str = ""  # how the run named the index it read (an alias such as production, or a version)

    @staticmethod
    def present(index_dir: Path) -> bool:
        return (index_dir / FOLDER / "changes.json").is_file()

    def write(self, index_dir: Path) -> None:
        folder = index_dir / FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "vectors.npy", np.ascontiguousarray(self.vectors, np.float32))
        (folder / "changes.json").write_text(json.dumps({
            "parent": self.parent, "listing_ids": self.listing_ids, "photo_ids": self.photo_ids,
            "labels": self.labels, "delisted": self.delisted, "catalog": self.catalog, "ref": self.ref}))

    @classmethod
    def read(cls, index_dir: Path) -> ChangeSet:
        folder = index_dir / FOLDER
        doc = json.loads((folder / "changes.json").read_text())
        return cls(doc["parent"], np.load(folder / "vectors.npy"), doc["listing_ids"], doc["photo_ids"],
                   doc["labels"], doc["delisted"], doc.get("catalog"), doc.get("ref", ""))

    def _rows(self, index: Any) -> tuple[list[str], list[str], list[int], list[int]]:
        """What the change does to `index`: (delisted ids it holds, delisted ids it does not, rows replacing
        listings it keeps, rows of listings new to it). Delistings go first, so a listing delisted and
        listed again in one run is added back whole."""
        gone = [lid for lid in self.delisted if lid in index]
        absent = [lid for lid in self.delisted if lid not in index]
        kept = {lid for lid in self.listing_ids if lid in index} - set(gone)
        present = [i for i, lid in enumerate(self.listing_ids) if lid in kept]
        fresh = [i for i, lid in enumerate(self.listing_ids) if lid not in kept]
        return gone, absent, present, fresh

    def _batch(self, rows: list[int]) -> tuple[np.ndarray, list[str], dict[str, list[str | None]], dict[str, Any]]:
        return (self.vectors[rows], [self.listing_ids[i] for i in rows],
                {t: [v[i] for i in rows] for t, v in self.labels.items()},
                {"photo_ids": [self.photo_ids[i] for i in rows]})

    def apply(self, index: Any) -> dict[str, Any]:
        """Apply to `index` (a VectorIndex): remove the delisted listings (every photo), replace the listings
        it already holds (all their photos), add the new ones, record the catalog. Returns what changed."""
        gone, absent, present, fresh = self._rows(index)
        removed = index.remove(gone) if gone else 0

        def change(method, rows: list[int]) -> int:
            if not rows:
                return 0
            vectors, ids, labels, photos = self._batch(rows)
            return method(vectors, ids, labels, **photos)

        replaced = change(index.replace, present)
        added = change(index.add, fresh)
        if self.catalog:
            index.record_catalogs([self.catalog])
        return {"gone": gone, "absent": absent, "removed": removed, "replaced": replaced, "added": added,
                "listings_added": len({self.listing_ids[i] for i in fresh}),
                "listings_replaced": len({self.listing_ids[i] for i in present})}

    def apply_sharded(self, sharded: Any) -> list[int]:
        """Apply to a ShardedIndex the same way, each listing in its own shard only; return the shards that
        changed. The catalog is named on the version's card and on the shards that got its rows."""
        gone, _, present, fresh = self._rows(sharded)
        changed = set(sharded.remove(gone)) if gone else set()
        touched: set[int] = set()
        for method, rows in ((sharded.replace, present), (sharded.add, fresh)):
            if rows:
                vectors, ids, labels, photos = self._batch(rows)
                touched.update(method(vectors, ids, labels, **photos))
        if self.catalog:
            sharded.record_catalogs([self.catalog], shards=sorted(touched))
        return sorted(changed | touched)
