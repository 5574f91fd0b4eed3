"""The index steps: build the FAISS index from a catalog's embeddings (every photo of every listing), search
it with simulated phone photos (recall of the photographed listing), update a published index with new,
changed and delisted listings, and publish an index version under the model version it was built with.

Every index version names on its card every catalog it holds listings from (the build's, then each
update's), so the transformer finds the title, labels, metadata and photos of each listing it returns."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from lookalike.pipelines.steps.prepare import open_catalog
from lookalike.predictor.index import parse_bytes
from lookalike.pipelines.steps.changes import ChangeSet
from lookalike.pipelines.steps.embed import load_embedder, load_embeddings
from lookalike.pipelines.steps.model import read_card
from lookalike.pipelines.steps.runner import StepError, check_device, progress, write_metrics
from lookalike.pipelines.steps.sharded import check_index_shards, publish_sharded


def _labels_by_task(labels: list[dict[str, str]]) -> dict[str, list[str | None]]:
    tasks = sorted({t for lab in labels for t in lab})
    return {t: [lab.get(t) for lab in labels] for t in tasks}


def _index_metrics(index) -> dict[str, float]:
    info = index.info
    out = {"count": float(info["count"]), "listings": float(index.listing_count),
           "nlist": float(info.get("nlist") or 0), "nprobe": float(info.get("nprobe") or 0),
           "index_recall@10": float(info.get("recall_at_10") or 0.0),
           "exact": 1.0 if info.get("kind") == "exact" else 0.0}
    if info.get("build_seconds") is not None:
        out["build_seconds"] = float(info["build_seconds"])
    return out


def _paths(embeddings) -> list[str]:
    """The folders of an embed step's output: one artifact, or the list a fan-out collected (shard order)."""
    return [a.path for a in embeddings] if isinstance(embeddings, (list, tuple)) else [embeddings.path]


def _alias_moved(alias: str, model_version: str, index_version: str) -> str:
    return f"; index alias {alias} of model {model_version} → {index_version}" if alias else ""


def build_index(embeddings, model, index_factory: str, min_index_recall: float, seed: int, device: str,
                index, metrics, memory_budget: str = "") -> dict[str, Any]:
    """Train the IVF centroids, add every vector with its listing id, tune nprobe for recall@10 against
    exact search of at least 0.95 (or the gate's bar, if higher), so the gate has headroom."""
    from lookalike.predictor.index import VectorIndex

    device = check_device(device)
    vectors, ids, labels, info = load_embeddings(_paths(embeddings))
    model_version = read_card(model).model_version
    if info.get("model_version") != model_version:
        raise StepError(f"the embeddings were made with model {info.get('model_version')}, not {model_version}")
    built = VectorIndex.build(vectors, ids, _labels_by_task(labels), model_version=model_version,
                              photo_ids=info["photo_ids"], factory=index_factory or None,
                              memory_budget=parse_bytes(memory_budget),
                              target_recall=min(1.0, max(min_index_recall, 0.95)),
                              seed=seed, use_gpu=None if device == "auto" else device == "cuda",
                              progress=progress(), catalogs=[info["catalog"]] if info.get("catalog") else None)
    built.save(index.path)
    values = _index_metrics(built)
    write_metrics(metrics, values)
    index.metadata.update({"model_version": model_version, "count": len(ids), "listings": built.listing_count,
                           "factory": built.info["factory"]})
    print(f"built {built.info['factory']} index of {len(ids)} photos of {built.listing_count} listings: nprobe "
          f"{built.info.get('nprobe')}, recall@10 of listings vs exact {values['index_recall@10']:.3f}", flush=True)
    return values


def evaluate_index(index, model, queries, phone_queries: int, seed: int, metrics, report=None) -> dict[str, float]:
    """Simulated phone photos of listings in `queries`, through the serving preprocessing and the
    index: recall@1/5/10 of the photographed listing."""
    import numpy as np

    from lookalike.predictor.index import VectorIndex
    from lookalike.training.phone_photos import SIMULATED_NOTE, make_phone_queries
    from lookalike.core.preprocessing import preprocess

    embedder = load_embedder(model.path, "auto")
    built = VectorIndex.load(index.path, model_version=embedder.model_version)
    catalog = open_catalog(queries.path)
    indexed = {lid: set(built.photos_of(lid)) for lid in catalog.listings() if lid in built}
    # photos the index holds (an unreadable one was left out by the embed step)
    known = catalog.subset([r for r in catalog.rows if r.photo_id in indexed.get(r.listing_id, ())])
    if not known.rows:
        raise StepError("none of the query listings are in the index: nothing to evaluate")
    photos = make_phone_queries(known, phone_queries, seed)
    spec = embedder.card.preprocessing
    hits = {1: 0, 5: 0, 10: 0}
    k = min(10, built.listing_count)
    for start in range(0, len(photos), 32):
        chunk = photos[start:start + 32]
        vectors, _ = embedder.embed(np.stack([preprocess(img.convert("RGB"), spec) for _, img in chunk]))
        found = built.search(vectors, top_k=k).listing_ids
        for (lid, _), ids in zip(chunk, found):
            for cut in hits:
                hits[cut] += lid in ids[:cut]
    n = max(1, len(photos))
    values = {f"phone_recall@{cut}": hits[cut] / n for cut in hits} | {"phone_queries": float(len(photos)),
                                                                       "count": float(built.count),
                                                                       "listings": float(built.listing_count)}
    write_metrics(metrics, values)
    text = (f"# Index search\n\n{len(photos)} simulated phone photos of listings in the index, searched with "
            f"nprobe {built.info.get('nprobe')} over {built.listing_count} listings ({built.count} photos):\n\n"
            + "\n".join(f"- recall@{cut}: {values[f'phone_recall@{cut}']:.3f}" for cut in hits)
            + f"\n\n_{SIMULATED_NOTE}_\n")
    if report is not None:
        Path(report.path).write_text(text)
    print(f"index search: phone recall@10 {values['phone_recall@10']:.3f} over {len(photos)} simulated photos",
          flush=True)
    return values


def publish_index(index, alias: str, model_alias: str = "", index_shards: int = 0) -> str:
    """Publish the index folder as a new version under its model and point `alias` at it; then, when
    `model_alias` is set, point the model's alias at the index's model (a model alias never moves before
    an index for it exists: train-and-index publishes the pair this way).

    The alias moves under a lease (`lookalike.core.leases`), so runs that overlap move it one at a time.
    An update read the index its alias pointed at when it began (`parent_version`); when the alias has
    moved since (another update published), this run's change set is applied again on the index the alias
    points at now, so neither run's additions nor its delistings are lost.

    With `index_shards` > 0, a sharded version of the very index published follows it, under the same
    alias name in the sharded repo (`lookalike.pipelines.steps.sharded`): an update applies its change set
    to the sharded version the alias names, so only its listings' shards change.
    """
    from lookalike.core.artifacts import index_repo, model_repo
    from lookalike.core.s3 import connect
    from lookalike.predictor.index import VectorIndex

    shards = check_index_shards(index_shards)  # before anything is published
    store = connect()
    built = VectorIndex.load(index.path)
    models = model_repo(store)
    if built.model_version not in models.versions():
        raise StepError(f"the index was built with model {built.model_version}, which is not published: publish "
                        f"the model first (the pipelines do)")
    repo = index_repo(store, built.model_version)
    changes = ChangeSet.read(Path(index.path)) if ChangeSet.present(Path(index.path)) else None
    base = changes.parent if changes is not None else None  # the index version the update changed
    if not alias:
        version = built.publish(store)
        print(f"published index {version} of model {built.model_version} (no alias moved)", flush=True)
        if shards:
            publish_sharded(store, built, "", shards, changes, base)
        return version
    # One lease, the index alias's, covers the index and its sharded version: the sharded version is made
    # from the index just published, so the pair must move together. Under two leases an overlapping run
    # could publish its pair between this run's index and its sharded version, whose alias would then
    # name a sharded version without that run's changes.
    with repo.lease(alias):
        target = repo.alias_target(alias)
        # An update that read this alias, which has moved since: apply its changes on where it points now.
        if changes is not None and changes.ref == alias and target not in (None, changes.parent):
            print(f"index alias {alias} moved from {changes.parent} to {target} while this run worked (another "
                  f"run published): applying this run's changes again on {target}", flush=True)
            built = VectorIndex.fetch(store, built.model_version, target)
            changes.apply(built)
            base = target
        version = built.publish(store)
        repo.set_alias(alias, version)
        print(f"published index {version} of model {built.model_version} ({built.listing_count} listings, "
              f"{built.count} photos){_alias_moved(alias, built.model_version, version)}", flush=True)
        if shards:  # after the index: a sharded version's parent always exists
            publish_sharded(store, built, alias, shards, changes, base)
    if model_alias:
        with models.lease(model_alias):
            models.set_alias(model_alias, built.model_version)
        print(f"model alias {model_alias} → {built.model_version} (its index {version} is published)", flush=True)
    return version


def _read_ids(uri: str) -> list[str]:
    from lookalike.core.s3 import ObjectStore, S3Settings, parse_s3_uri

    if uri.startswith("s3://"):
        bucket, key = parse_s3_uri(uri)
        text = ObjectStore(S3Settings.from_env().with_bucket(bucket)).get_bytes(key).decode()
    else:
        text = Path(uri).read_text()
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def update_index(model, embeddings, index_ref: str, delisted_uri: str, index, metrics) -> dict[str, Any]:
    """The published index plus the new catalog's listings minus delisted ones, without retraining the
    centroids. A listing already in the index is replaced whole (its photos become the new catalog's:
    photos added, changed and dropped); a new one is added; a delisted id removes every photo of its
    listing, and one that is not in the index is reported (one line) and changes nothing. The new catalog
    is recorded on the card beside the ones the index already names. Reports drift: when a rebuild is due,
    run the index pipeline."""
    from lookalike.predictor.index import VectorIndex
    from lookalike.core.artifacts import VersionNotFound
    from lookalike.core.s3 import connect

    store = connect()
    model_version = read_card(model).model_version
    vectors, ids, labels, info = load_embeddings(_paths(embeddings))
    photos = info["photo_ids"]
    if info.get("model_version") != model_version:
        raise StepError(f"the new listings were embedded with model {info.get('model_version')}, not {model_version}")
    try:
        current = VectorIndex.fetch(store, model_version, index_ref or "production")
    except VersionNotFound as exc:
        raise StepError(f"{exc}. Build one first with the index pipeline") from None
    parent = current.info.get("index_version")
    delisted = list(dict.fromkeys(_read_ids(delisted_uri))) if delisted_uri else []
    changes = ChangeSet(parent, vectors, list(ids), list(photos), _labels_by_task(labels), delisted,
                        info.get("catalog"), ref=index_ref or "production")
    done = changes.apply(current)
    gone, absent = done["gone"], done["absent"]
    if absent:
        shown = ", ".join(absent[:10]) + (f" … ({len(absent)} in all)" if len(absent) > 10 else "")
        print(f"delisted ids not in index {parent}, nothing to remove for them: {shown}", flush=True)
    removed, replaced, added = done["removed"], done["replaced"], done["added"]
    drift = current.drift()
    current.save(index.path)
    changes.write(Path(index.path))  # kept beside the index: publishing applies it again if the alias moved
    changed = {"added": done["listings_added"], "replaced": done["listings_replaced"]}
    values = {**_index_metrics(current), "added": float(changed["added"]), "replaced": float(changed["replaced"]),
              "removed": float(len(gone)), "delisted_not_found": float(len(absent)), "photos_added": float(added),
              "photos_replaced": float(replaced), "photos_removed": float(removed),
              "rebuild_due": 1.0 if drift["rebuild_due"] else 0.0}
    write_metrics(metrics, values)
    index.metadata.update({"model_version": model_version, "parent_version": parent, "drift": drift["why"]})
    print(f"updated index {parent}: +{changed['added']} new listings, {changed['replaced']} replaced, "
          f"-{len(gone)} delisted ({len(absent)} delisted ids were not in it); {current.listing_count} listings, "
          f"{current.count} photos; drift: {drift['why']}", flush=True)
    if drift["rebuild_due"]:
        print("a full rebuild is due: run the index pipeline (lookalike pipeline run index) to re-cluster", flush=True)
    return values
