"""Versioned artifacts: a version is a folder of files in S3 that readers see whole or not at all.

Layout under a repository prefix (``models`` or ``indexes/<model_version>``)::

    <prefix>/<version>/<file>...          uploaded first, in any order
    <prefix>/<version>/MANIFEST.json      written last: every file's sha256 and size, plus metadata
    <prefix>/_aliases/<alias>.json        {"version": ...}: named pointers such as production, canary

A version without its MANIFEST.json is an interrupted publish and is invisible to readers. A reader
checks every file against the manifest and refuses a mismatch. Versions are never edited: publishing
to an existing complete version is refused, so an update always makes a new version.
"""
from __future__ import annotations

import hashlib
import json
import re
import secrets
import shutil
import tempfile
import time
from datetime import datetime, UTC
from pathlib import Path
from typing import Any

from lookalike.core.errors import NotFoundError, UnavailableError
from lookalike.core.leases import Lease
from lookalike.core.s3 import ObjectStore, StoreError
from lookalike.core.settings import cache_dir

MANIFEST = "MANIFEST.json"
ALIASES = "_aliases"
LEASES = "_leases"
RESERVED = (ALIASES, LEASES)  # folders beside the versions that are not versions
LATEST = "latest"
VERSION_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # also the names of aliases


class ArtifactError(UnavailableError):
    """A version is missing, incomplete, tampered with or not what was asked for (a server cannot use it: 503)."""


class ChecksumMismatch(ArtifactError):
    """A file of a version differs from what its manifest recorded."""


class VersionNotFound(ArtifactError, NotFoundError):
    """No complete version or alias of that name."""

    status = 404


_last_version_ms = 0


def new_version() -> str:
    """A fresh version name that sorts by time, to the millisecond: 20261124T010203457Z-3f9a1c.

    "latest" is the newest name, so names made one after another in a process must sort in that
    order even within one millisecond: the clock reading is bumped past the previous one.
    """
    global _last_version_ms
    now_ms = max(int(time.time() * 1000), _last_version_ms + 1)
    _last_version_ms = now_ms
    stamp = datetime.fromtimestamp(now_ms / 1000, UTC).strftime("%Y%m%dT%H%M%S")
    return f"{stamp}{now_ms % 1000:03d}Z-{secrets.token_hex(3)}"


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_manifest(local_dir: Path, version: str, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    files = {}
    for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(local_dir).as_posix()
        if rel == MANIFEST:
            continue
        files[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    if not files:
        raise ArtifactError(f"nothing to publish: {local_dir} holds no files")
    return {
        "version": version,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "files": files,
        "metadata": metadata or {},
    }


def verify_dir(local_dir: str | Path, manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check every file of a local version folder against its manifest; return the manifest.

    Used on what KServe's storage initializer copied into /mnt/models as well as on our own downloads.
    """
    local_dir = Path(local_dir)
    if manifest is None:
        path = local_dir / MANIFEST
        if not path.exists():
            raise ArtifactError(f"{local_dir} has no {MANIFEST}: it is not a complete published version")
        manifest = json.loads(path.read_text())
    for rel, entry in manifest["files"].items():
        path = local_dir / rel
        if not path.exists():
            raise ArtifactError(f"{rel} is listed in the manifest of {manifest['version']} but missing from "
                                f"{local_dir}")
        actual = sha256_file(path)
        if actual != entry["sha256"]:
            raise ChecksumMismatch(
                f"{rel} of version {manifest['version']} fails its checksum (sha256 {actual[:12]}… != "
                f"{entry['sha256'][:12]}…): the file was altered or corrupted. Republish the version; "
                f"do not use it"
            )
    return manifest


def default_cache_dir() -> Path:
    return cache_dir()


class ArtifactRepo:
    """The versions under one prefix of one bucket."""

    def __init__(self, store: ObjectStore, prefix: str):
        self.store = store
        self.prefix = prefix.strip("/")

    def __repr__(self) -> str:
        return f"ArtifactRepo({self.store.uri(self.prefix)})"

    def _key(self, version: str, rel: str) -> str:
        return f"{self.prefix}/{version}/{rel}"

    # ---- writing ---------------------------------------------------------------------------
    def next_version(self) -> str:
        """A fresh version name that sorts after every version published here, so "latest" finds it.

        Names sort by time to the millisecond; a version published by another process within the same
        millisecond as the newest (or by a machine whose clock is behind) must still come after it.
        """
        newest = (self.versions() or [""])[0]
        version = new_version()
        for attempt in range(64):
            if version > newest:
                return version
            if attempt == 32:
                time.sleep(1.0)
            version = new_version()
        raise ArtifactError(f"cannot name a version after {newest!r} under {self.store.uri(self.prefix)}: "
                            f"is this machine's clock far behind the one that published it?")

    def publish(self, local_dir: str | Path, version: str | None = None,
                metadata: dict[str, Any] | None = None) -> str:
        """Upload every file of `local_dir` as a new version; return the version name.

        The manifest goes up last, so an interrupted publish leaves nothing a reader would see.
        """
        local_dir = Path(local_dir)
        version = version or new_version()
        if not VERSION_NAME_RE.match(version) or version in (LATEST, *RESERVED):
            raise ArtifactError(f"invalid version name {version!r}: use letters, digits, '.', '_' and '-'")
        if self.store.exists(self._key(version, MANIFEST)):
            raise ArtifactError(f"{self.prefix}/{version} is already published; versions are never edited - "
                                f"publish a new version instead")
        manifest = build_manifest(local_dir, version, metadata)
        for rel in manifest["files"]:
            self.store.put_file(self._key(version, rel), local_dir / rel)
        self.store.put_bytes(self._key(version, MANIFEST), json.dumps(manifest, indent=2).encode(),
                             content_type="application/json")
        return version

    def set_alias(self, alias: str, version: str) -> None:
        """Point `alias` (production, canary, …) at a complete version."""
        if not VERSION_NAME_RE.match(alias) or alias == LATEST:
            raise ArtifactError(f"invalid alias name {alias!r}")
        self.manifest(version)  # refuses unknown or incomplete versions
        body = {"version": version, "updated": datetime.now(UTC).isoformat(timespec="seconds")}
        self.store.put_bytes(f"{self.prefix}/{ALIASES}/{alias}.json", json.dumps(body).encode(),
                             content_type="application/json")

    def alias_target(self, alias: str) -> str | None:
        """The version `alias` points at now, or None when it points nowhere yet."""
        key = f"{self.prefix}/{ALIASES}/{alias}.json"
        return json.loads(self.store.get_bytes(key))["version"] if self.store.exists(key) else None

    def lease(self, alias: str) -> Lease:
        """The lease under which a run reads `alias`, publishes and moves it (`with repo.lease(alias): …`), so
        runs that overlap move it one at a time (lookalike/core/leases.py)."""
        return Lease(self.store, f"{self.prefix}/{LEASES}/{alias}.json",
                     what=f"alias {alias} of {self.store.uri(self.prefix)}")

    # ---- reading ---------------------------------------------------------------------------
    def versions(self) -> list[str]:
        """Complete versions, newest first."""
        found = []
        for key in self.store.iter(self.prefix + "/", recursive=True):
            parts = key[len(self.prefix) + 1:].split("/")
            if len(parts) == 2 and parts[1] == MANIFEST and parts[0] not in RESERVED:
                found.append(parts[0])
        return sorted(found, reverse=True)

    def aliases(self) -> dict[str, str]:
        out = {}
        for key in self.store.iter(f"{self.prefix}/{ALIASES}/", recursive=True):
            name = key.rsplit("/", 1)[-1].removesuffix(".json")
            out[name] = json.loads(self.store.get_bytes(key))["version"]
        return out

    def resolve(self, ref: str = LATEST) -> str:
        """A version name from a version, an alias, or 'latest'."""
        if ref == LATEST:
            versions = self.versions()
            if not versions:
                raise VersionNotFound(f"no published version under {self.store.uri(self.prefix)}")
            return versions[0]
        alias_key = f"{self.prefix}/{ALIASES}/{ref}.json"
        if self.store.exists(alias_key):
            return json.loads(self.store.get_bytes(alias_key))["version"]
        if self.store.exists(self._key(ref, MANIFEST)):
            return ref
        known = ", ".join(self.versions()[:5]) or "none"
        raise VersionNotFound(f"{ref!r} is neither a complete version nor an alias under "
                              f"{self.store.uri(self.prefix)} (newest versions: {known})")

    def manifest(self, ref: str = LATEST) -> dict[str, Any]:
        version = self.resolve(ref)
        try:
            return json.loads(self.store.get_bytes(self._key(version, MANIFEST)))
        except StoreError as exc:
            raise VersionNotFound(f"{self.prefix}/{version} is not a complete version: {exc}") from exc

    def read_bytes(self, ref: str, rel: str) -> bytes:
        """One file of a version, checked against the manifest."""
        manifest = self.manifest(ref)
        entry = manifest["files"].get(rel)
        if entry is None:
            raise ArtifactError(f"version {manifest['version']} of {self.prefix} has no file {rel!r}")
        data = self.store.get_bytes(self._key(manifest["version"], rel))
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise ChecksumMismatch(f"{rel} of version {manifest['version']} fails its checksum: the file was "
                                   f"altered or corrupted. Republish the version; do not use it")
        return data

    def read_json(self, ref: str, rel: str) -> Any:
        return json.loads(self.read_bytes(ref, rel))

    def fetch(self, ref: str = LATEST, dest: str | Path | None = None) -> Path:
        """Download a version into `dest` (default: the local cache) and verify it; return the folder.

        A verified copy already in `dest` is reused. The download lands in a temporary folder first,
        so a half-finished download is never mistaken for a version.
        """
        manifest = self.manifest(ref)
        version = manifest["version"]
        dest = Path(dest) if dest else default_cache_dir() / self.store.bucket / self.prefix / version
        if (dest / MANIFEST).exists():
            try:
                verify_dir(dest, manifest)
                return dest
            except ArtifactError:
                shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=dest.parent))
        try:
            for rel in manifest["files"]:
                self.store.get_file(self._key(version, rel), staging / rel)
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
            verify_dir(staging, manifest)
            try:
                staging.rename(dest)
            except OSError:
                # Another process fetched the same version into the same cache first (shard predictors
                # starting side by side): keep its verified copy, which it may be reading already.
                if not _verified(dest, manifest):
                    shutil.rmtree(dest, ignore_errors=True)
                    staging.rename(dest)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        return dest

    def incomplete_versions(self) -> list[str]:
        """Version folders with files but no manifest: interrupted publishes (invisible to readers)."""
        seen, complete = set(), set(self.versions())
        for key in self.store.iter(self.prefix + "/", recursive=True):
            parts = key[len(self.prefix) + 1:].split("/")
            if len(parts) >= 2 and parts[0] not in RESERVED:
                seen.add(parts[0])
        return sorted(seen - complete, reverse=True)


def _verified(folder: Path, manifest: dict) -> bool:
    try:
        verify_dir(folder, manifest)
    except (ArtifactError, OSError):
        return False
    return True


def model_repo(store: ObjectStore) -> ArtifactRepo:
    """Published models: models/<model_version>/."""
    return ArtifactRepo(store, "models")


def index_repo(store: ObjectStore, model_version: str) -> ArtifactRepo:
    """Indexes built with one model: indexes/<model_version>/<index_version>/."""
    return ArtifactRepo(store, f"indexes/{model_version}")


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON to `path` atomically (temp file + rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=_json_default))
    tmp.replace(path)


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")




def sharded_index_repo(store: ObjectStore, model_version: str) -> ArtifactRepo:
    """Sharded indexes built with one model: indexes-sharded/<model_version>/<index_version>/, one MANIFEST
    over every shard's files (kept apart from `index_repo`, whose versions a one-index predictor loads)."""
    return ArtifactRepo(store, f"indexes-sharded/{model_version}")
