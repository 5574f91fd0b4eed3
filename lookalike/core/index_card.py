"""The index card: what an index version's `index.json` says, in one class.

    indexes/<model_version>/<index_version>/
        index.faiss, refine.faiss, refine_codes.npy, listings.npz, listing_ids.json, photo_ids.json
                            (the predictor's)
        index.json          this card: the model it was built with, dim, metric, factory, nlist, nprobe,
                            count (photos) and listing_count, measured recall, label vocabularies, every
                            catalog its listings came from, drift counters, and the sha256 and size of
                            every other file
        MANIFEST.json       sha256 of every file, written last by lookalike.core.artifacts when published

Everyone who reads an index.json reads it here: the predictor builds, saves and loads indexes with it;
the transformer reads it for the catalogs its listings came from: the build's catalog and each update's
(an update adds its own to its parent's, so a child version names every catalog it holds rows from).
That is why it lives in `transformer/` and imports only `storage`: no torch, no faiss, no predictor, so
the transformer's image can read it. How the FAISS files are made and read is the predictor's business
(`predictor/index*.py`).

Checksums are verified once: a published folder (it has a MANIFEST.json, which covers index.json too)
against the manifest, a folder saved but not published against the card's own `files`; a folder that
`ArtifactRepo.fetch` verified on the way in needs neither (`verify` is not called).
"""
from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from lookalike.core.artifacts import MANIFEST, ArtifactError, sha256_file, verify_dir, write_json

CARD_FILE = "index.json"
FORMAT = 1
KINDS = ("ivf", "exact")                 # an IVF index, or exact search (IndexIDMap(Flat)) for small catalogs
SUMMARY = ("model_version", "dim", "factory", "nlist", "nprobe", "count", "listing_count", "recall_at_10")


class IndexCardError(ArtifactError):
    """An index folder without a usable index.json, or whose files differ from what it records (503)."""


@dataclass(frozen=True)
class FileEntry:
    """The sha256 and size (bytes) of one file of an index folder."""

    sha256: str
    size: int

    @classmethod
    def of(cls, path: Path) -> FileEntry:
        return cls(sha256_file(path), path.stat().st_size)


@dataclass(kw_only=True)
class IndexCard:
    """index.json as typed fields. The predictor updates the counters of its own card in place (under its
    write lock); everyone else treats a card as read-only."""

    model_version: str
    dim: int
    metric: str                              # "inner_product": cosine similarity of L2-normalised vectors
    factory: str                             # the FAISS factory built, e.g. "IVF64,Flat" or "Flat"
    factory_setting: str | None = None       # what was asked for, e.g. "IVF{nlist},Flat"
    kind: str                                # one of KINDS
    exact_fallback: str | None = None        # why an IVF request became exact search
    nlist: int | None = None
    nprobe: int | None = None                # the tuned default
    count: int                               # vectors: one per photo
    listing_count: int | None = None         # distinct listings (None: an index from before, one photo each)
    recall_at_10: float | None = None        # of listings, at the default nprobe, against exact search
    target_recall: float | None = None
    target_reached: bool | None = None
    recall_curve: list[dict[str, Any]] = field(default_factory=list)   # [{nprobe, recall_at_10}]
    tune_queries: int = 0
    refine: dict[str, Any] | None = None     # {"codec": SQ8|SQfp16|Flat, "k_factor": int} for re-ranked PQ
    labels: dict[str, list[str]] = field(default_factory=dict)         # label vocabulary per task
    catalogs: list[str] | None = None        # every catalog URI the listings came from (the transformer's metadata)
    seed: int | None = None
    train_sample: int = 0
    built_on: str | None = None              # cpu | gpu | gpu-kmeans
    built_at: str | None = None
    updated_at: str | None = None
    build_seconds: float | None = None
    # drift counters: how far the index moved since its k-means was trained
    trained_count: int = 0
    added_since_training: int = 0
    removed_since_training: int = 0
    imbalance_at_training: float | None = None
    centroid_fit_at_training: float | None = None
    centroid_fit_added: float | None = None
    index_version: str | None = None
    parent_version: str | None = None
    faiss_version: str | None = None
    bytes_per_vector: float | None = None    # the FAISS files' bytes per vector: what a predictor holds in memory
    files: dict[str, FileEntry] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # fields of a newer writer: kept and written back

    def __repr__(self) -> str:
        return (f"IndexCard({self.factory}, {self.count} × {self.dim}-d, model {self.model_version}, "
                f"version {self.index_version})")

    def copy(self, **changes: Any) -> IndexCard:
        """A deep copy with some fields changed."""
        card = copy.deepcopy(self)
        for name, value in changes.items():
            if name not in _FIELDS:
                raise TypeError(f"IndexCard has no field {name!r}")
            setattr(card, name, value)
        return card

    def summary(self) -> dict[str, Any]:
        """The few fields a listing of versions shows (the MANIFEST's metadata)."""
        return {name: copy.deepcopy(getattr(self, name)) for name in SUMMARY}

    # ---- dicts ---------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = CARD_FILE) -> IndexCard:
        """Validate and type what an index.json holds; IndexCardError (saying what to do) if it is malformed."""
        if not isinstance(data, Mapping):
            raise IndexCardError(f"{where} is not a JSON object; re-fetch or rebuild the index")
        if data.get("format") != FORMAT:
            raise IndexCardError(f"{where} has format {data.get('format')!r}; this code reads format {FORMAT}. "
                                 f"Rebuild the index with the current code")
        check = _Checker(where, data)
        values: dict[str, Any] = {
            "model_version": check.text("model_version"),
            "dim": check.integer("dim", minimum=1),
            "metric": check.text("metric"),
            "factory": check.text("factory"),
            "factory_setting": check.text("factory_setting", optional=True),
            "kind": check.choice("kind", KINDS),
            "exact_fallback": check.text("exact_fallback", optional=True),
            "nlist": check.integer("nlist", minimum=1, optional=True),
            "nprobe": check.integer("nprobe", minimum=1, optional=True),
            "count": check.integer("count", minimum=0),
            "listing_count": check.integer("listing_count", minimum=0, optional=True),
            "recall_at_10": check.number("recall_at_10"),
            "target_recall": check.number("target_recall"),
            "target_reached": check.typed("target_reached", bool),
            "recall_curve": check.typed("recall_curve", list) or [],
            "tune_queries": check.integer("tune_queries", minimum=0, optional=True) or 0,
            "refine": check.refine(),
            "labels": check.labels(),
            "catalogs": check.catalogs(),
            "seed": check.integer("seed", optional=True),
            "train_sample": check.integer("train_sample", minimum=0, optional=True) or 0,
            "built_on": check.text("built_on", optional=True),
            "built_at": check.text("built_at", optional=True),
            "updated_at": check.text("updated_at", optional=True),
            "build_seconds": check.number("build_seconds"),
            "added_since_training": check.integer("added_since_training", minimum=0, optional=True) or 0,
            "removed_since_training": check.integer("removed_since_training", minimum=0, optional=True) or 0,
            "imbalance_at_training": check.number("imbalance_at_training"),
            "centroid_fit_at_training": check.number("centroid_fit_at_training"),
            "centroid_fit_added": check.number("centroid_fit_added"),
            "index_version": check.text("index_version", optional=True),
            "parent_version": check.text("parent_version", optional=True),
            "faiss_version": check.text("faiss_version", optional=True),
            "bytes_per_vector": check.number("bytes_per_vector"),
            "files": check.files(),
        }
        trained = check.integer("trained_count", minimum=0, optional=True)
        values["trained_count"] = values["count"] if trained is None else trained
        if values["kind"] == "ivf" and values["nlist"] is None:
            raise IndexCardError(f"{where} describes an IVF index without nlist; re-fetch or rebuild the index")
        extra = {k: copy.deepcopy(v) for k, v in data.items() if k not in _FIELDS and k != "format"}
        return cls(**values, extra=extra)

    def to_dict(self, *, files: bool = True) -> dict[str, Any]:
        """What index.json holds (a fresh copy); `files=False` leaves out the file checksums."""
        out: dict[str, Any] = {"format": FORMAT}
        for f in fields(self):
            if f.name in ("files", "extra") or (f.name == "catalogs" and self.catalogs is None):
                continue
            out[f.name] = copy.deepcopy(getattr(self, f.name))
        if files:
            out["files"] = {name: {"sha256": e.sha256, "size": e.size} for name, e in self.files.items()}
        out.update(copy.deepcopy(self.extra))
        return out

    # ---- folders -------------------------------------------------------------------------------
    @classmethod
    def read(cls, folder: str | Path) -> IndexCard:
        """Parse and validate `folder`/index.json (no checksums: see `verify`)."""
        path = Path(folder) / CARD_FILE
        if not path.is_file():
            raise IndexCardError(f"{folder} holds no {CARD_FILE}: it is not an index folder")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise IndexCardError(f"{path} cannot be read as JSON ({exc}); re-fetch or rebuild the index") from exc
        return cls.from_dict(data, where=str(path))

    def write(self, folder: str | Path, files: Iterable[str] | None = None) -> Path:
        """Write index.json into `folder` atomically; return its path.

        `files` (names inside `folder`, written before the card) are hashed first and recorded in `files`,
        replacing what the card listed.
        """
        folder = Path(folder)
        if (folder / MANIFEST).exists():
            raise IndexCardError(f"{folder} is a published version; versions are never edited - write to a new "
                                 f"folder and publish it")
        if files is not None:
            self.files = {name: FileEntry.of(folder / name) for name in files}
        path = folder / CARD_FILE
        write_json(path, self.to_dict())
        return path

    def verify_files(self, folder: str | Path) -> None:
        """Check the size and sha256 of every file the card lists; IndexCardError on the first that differs."""
        folder = Path(folder)
        if not self.files:
            raise IndexCardError(f"{folder / CARD_FILE} lists no checksummed files; re-save the index")
        for name, entry in self.files.items():
            path = folder / name
            if not path.is_file():
                raise IndexCardError(f"{name} is missing from {folder}; re-fetch the index version")
            size = path.stat().st_size
            if size != entry.size:
                raise IndexCardError(f"{name} in {folder} is {size} bytes, expected {entry.size}: the file is "
                                     f"truncated or altered; re-fetch the index version")
            if sha256_file(path) != entry.sha256:
                raise IndexCardError(f"{name} in {folder} fails its sha256 checksum: the file was altered or "
                                     f"corrupted; re-fetch the index version, do not use it")

    def verify(self, folder: str | Path) -> None:
        """Verify `folder` once: against its MANIFEST.json when it is a published version (the manifest covers
        index.json as well), else against the card's own `files`."""
        folder = Path(folder)
        if not (folder / MANIFEST).exists():
            self.verify_files(folder)
            return
        try:
            verify_dir(folder)
        except ArtifactError as exc:
            raise IndexCardError(str(exc)) from exc
        except (ValueError, KeyError, TypeError) as exc:  # an unreadable manifest
            raise IndexCardError(f"{folder / MANIFEST} cannot be read ({exc}); re-fetch the index version") from exc


_FIELDS = {f.name for f in fields(IndexCard)} - {"extra"}


class _Checker:
    """Typed reads of one index.json's fields, each failing with a message that names the field."""

    def __init__(self, where: str, data: Mapping[str, Any]) -> None:
        self.where, self.data = where, data

    def fail(self, name: str, why: str) -> IndexCardError:
        return IndexCardError(f"{self.where} is not a valid index description: {name} {why}; re-fetch or "
                              f"rebuild the index")

    def get(self, name: str, optional: bool) -> Any:
        if name not in self.data and not optional:
            raise self.fail(name, "is missing")
        return self.data.get(name)

    def typed(self, name: str, kind: type) -> Any:
        value = self.data.get(name)
        if value is not None and not isinstance(value, kind):
            raise self.fail(name, f"must be a {kind.__name__}, got {value!r}")
        return copy.deepcopy(value)

    def text(self, name: str, optional: bool = False) -> str | None:
        value = self.get(name, optional)
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value:
            raise self.fail(name, f"must be a non-empty string, got {value!r}")
        return value

    def choice(self, name: str, allowed: tuple[str, ...]) -> str:
        value = self.text(name)
        if value not in allowed:
            raise self.fail(name, f"must be one of {', '.join(allowed)}, got {value!r}")
        return value

    def integer(self, name: str, minimum: int | None = None, optional: bool = False) -> int | None:
        value = self.get(name, optional)
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
            raise self.fail(name, f"must be an integer{f' >= {minimum}' if minimum is not None else ''}, "
                                  f"got {value!r}")
        return value

    def number(self, name: str) -> float | None:
        value = self.data.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(name, f"must be a number, got {value!r}")
        return value

    def refine(self) -> dict[str, Any] | None:
        value = self.typed("refine", dict)
        if value is not None and (not isinstance(value.get("codec"), str) or isinstance(value.get("k_factor"), bool)
                                  or not isinstance(value.get("k_factor"), int) or value["k_factor"] < 1):
            raise self.fail("refine", f"must be {{codec: str, k_factor: int >= 1}}, got {value!r}")
        return value

    def labels(self) -> dict[str, list[str]]:
        value = self.typed("labels", dict) or {}
        for task, words in value.items():
            if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
                raise self.fail("labels", f"[{task!r}] must be a list of strings")
        return value

    def catalogs(self) -> list[str] | None:
        value = self.typed("catalogs", list)
        if value is not None and not all(isinstance(c, str) and c for c in value):
            raise self.fail("catalogs", "must be a list of catalog URIs")
        return value

    def files(self) -> dict[str, FileEntry]:
        value = self.typed("files", dict) or {}
        out = {}
        for name, entry in value.items():
            try:
                sha, size = entry["sha256"], entry["size"]
            except (TypeError, KeyError):
                raise self.fail("files", f"[{name!r}] must be {{sha256, size}}, got {entry!r}") from None
            if not isinstance(sha, str) or len(sha) != 64 or isinstance(size, bool) or not isinstance(size, int):
                raise self.fail("files", f"[{name!r}] must hold a 64-hex sha256 and a size in bytes")
            out[name] = FileEntry(sha, size)
        return out
