"""An index folder on disk: what `VectorIndex.save` writes and `VectorIndex.load` reads.

    index.faiss       the FAISS index (IVF with 64-bit ids, or exact IndexIDMap(Flat) for small catalogs)
    refine.faiss      codec of the re-ranking copy (IVF-PQ only), refine_codes.npy its codes
    listings.npz      64-bit photo keys, their listings' keys and label codes;
    listing_ids.json, photo_ids.json  the catalog's listing id and photo id of each row
    index.json        the index card (`lookalike.core.index_card.IndexCard`), written last, with the
                      sha256 and size of every file above
    MANIFEST.json     only in a published version: written by lookalike.core.artifacts

Reading checks, in this order: the card parses; it was built for the model version and dimension in
hand (`IndexMismatch`); the files are intact, verified once (`IndexCard.verify`: against MANIFEST.json
in a published folder, else against the card's `files`), unless the caller verified them already (a
download through `ArtifactRepo.fetch`); then that FAISS can read them and that they agree with each
other and with the card (`CorruptIndex`). Publishing is `VectorIndex.publish`: a saved folder uploaded
by `lookalike.core.artifacts` as a new version.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from lookalike.predictor.index.errors import BadIndexInput, CorruptIndex, IndexMismatch
from lookalike.predictor.index.refine import RefineCopy
from lookalike.predictor.index.table import ListingTable
from lookalike.core.artifacts import MANIFEST
from lookalike.core.index_card import IndexCard, IndexCardError

INDEX_FILE = "index.faiss"
REFINE_FILE = "refine.faiss"
REFINE_CODES_FILE = "refine_codes.npy"


class IndexFolder(NamedTuple):
    """The parts of a loaded index, ready for `VectorIndex(...)`."""

    index: Any
    table: ListingTable
    card: IndexCard
    refine: RefineCopy | None


@contextmanager
def card_errors_as_corrupt() -> Iterator[None]:
    """The card's errors, raised as the predictor's `CorruptIndex` (same message)."""
    try:
        yield
    except CorruptIndex:
        raise
    except IndexCardError as exc:
        raise CorruptIndex(str(exc)) from exc


def write_folder(directory: str | Path, index: Any, table: ListingTable, card: IndexCard,
                 refine: RefineCopy | None = None) -> Path:
    """Write the index files, then `card` (recording their checksums on it) last; return the folder.

    Refuses a published version folder: versions are never edited."""
    import faiss

    directory = Path(directory)
    if (directory / MANIFEST).exists():
        raise BadIndexInput(f"{directory} is a published version folder; versions are never edited - save "
                            f"to a new folder and publish it")
    directory.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(directory / INDEX_FILE))
    files = [INDEX_FILE]
    if refine is not None:
        faiss.write_index(refine.codec, str(directory / REFINE_FILE))
        np.save(directory / REFINE_CODES_FILE, refine.codes, allow_pickle=False)
        files += [REFINE_FILE, REFINE_CODES_FILE]
    faiss_bytes = sum((directory / name).stat().st_size for name in files)
    card.bytes_per_vector = round(faiss_bytes / card.count, 2) if card.count else None
    files += table.save(directory)
    card.write(directory, files)
    return directory


def read_folder(directory: str | Path, *, model_version: str | None = None, dim: int | None = None,
                verified: bool = False, mmap: bool = False) -> IndexFolder:
    """Read and check an index folder (see the module doc). `verified`: the caller has checked every file
    already (e.g. `ArtifactRepo.fetch` against the manifest), so nothing is hashed here. `mmap`: map the
    IVF lists from the file instead of reading them into memory (the OS pages in what searches touch, so
    a predictor can serve an index larger than its memory, at the cost of disk reads; updates then need
    a fresh copy: `add`/`remove` on a mapped index are refused by FAISS)."""
    import faiss

    directory = Path(directory)
    with card_errors_as_corrupt():
        card = IndexCard.read(directory)
    if model_version is not None and card.model_version != model_version:
        raise IndexMismatch(f"the index in {directory} was built with model version {card.model_version!r}, but "
                            f"the model in hand is {model_version!r}: its vectors are not comparable. Use the "
                            f"index built for {model_version!r} (or build one)")
    if dim is not None and card.dim != int(dim):
        raise IndexMismatch(f"the index in {directory} holds {card.dim}-d vectors (model {card.model_version!r}) "
                            f"but the model in hand embeds to {dim}-d")
    if not verified:
        with card_errors_as_corrupt():
            card.verify(directory)
    try:
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
        index = faiss.read_index(str(directory / INDEX_FILE), flags)
        refine = None
        if card.refine:
            refine = RefineCopy(faiss.read_index(str(directory / REFINE_FILE)),
                                np.load(directory / REFINE_CODES_FILE, allow_pickle=False),
                                card.refine["codec"], card.refine["k_factor"])
    except (RuntimeError, OSError, ValueError) as exc:
        raise CorruptIndex(f"FAISS cannot read the index in {directory} ({str(exc).splitlines()[0]}); "
                           f"re-fetch the index version") from exc
    table = ListingTable.load(directory, card.labels)
    problems = []
    if index.d != card.dim:
        problems.append(f"index.faiss is {index.d}-d, index.json says {card.dim}")
    if index.ntotal != card.count or len(table) != card.count:
        problems.append(f"index.faiss holds {index.ntotal} vectors and the table {len(table)} photos, "
                        f"index.json says {card.count}")
    if card.listing_count is not None and table.listing_count != card.listing_count:
        problems.append(f"the table holds {table.listing_count} listings, index.json says {card.listing_count}")
    if refine is not None and len(refine.codes) != card.count:
        problems.append(f"the re-ranking copy holds {len(refine.codes)} vectors, not {card.count}")
    if problems:
        raise CorruptIndex(f"the index in {directory} is inconsistent: {'; '.join(problems)}")
    # The checksums describe these files, not the index in memory, which updates change: save records new ones.
    card.files = {}
    return IndexFolder(index, table, card, refine)
