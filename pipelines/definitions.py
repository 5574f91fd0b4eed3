"""The pipelines: `train`, `index`, `update` and `train-and-index`.

Each publishes last, and only after its gates pass: a gate that fails fails the run at the gate step
with a message saying what to do, nothing is published and the `production` aliases stay where they
were. The same definitions compile to IR YAML for Kubeflow (`pipelines.compile`) and run on one
machine with `kfp.local` (`pipelines.local`).

    train             prepare → train (GPU) → evaluate → model gates → publish model
    index             fetch model, prepare → embed (GPU) → build (GPU) → evaluate → index gates → publish index
    update            fetch model, prepare new listings → embed (GPU) → add/remove in the published
                      index without re-clustering (drift is reported) → evaluate → index gates → publish
                      index; schedule `index` too (e.g. weekly) for the full rebuild that re-clusters
    train-and-index   train and index in one run; the model and its index are published together at
                      the end, only when both pass their gates

Parameters are documented in each pipeline's docstring (the KFP UI and `lookalike pipeline run NAME
--help` show them). The defaults are for a GPU cluster and a full catalog; `lookalike demo` passes
small ones.
"""

from typing import NamedTuple

from kfp import dsl

from pipelines import components as c
from pipelines.cluster import (DEFAULT_GPU_NODE_SELECTOR, DEFAULT_GPU_TOLERATION, S3_SECRET, impure, on_cpu,
                               on_gpu, pure, transient, uses_store)

DEFAULT_CATALOG = "s3://lookalike/catalogs/fashion-mnist-train/catalog.jsonl"
DEFAULT_ARCHITECTURE = "tf_efficientnet_lite0"


class _Pool:
    """The cluster placement of one run's tasks, from its parameters."""

    def __init__(self, gpu_node_selector, gpu_toleration, s3_secret):
        self.selector, self.toleration, self.secret = gpu_node_selector, gpu_toleration, s3_secret

    def gpu(self, task, name: str):
        return uses_store(on_gpu(task.set_display_name(name), self.selector, self.toleration), self.secret)

    def cpu(self, task, name: str, *, store: bool = True):
        task = on_cpu(task.set_display_name(name))
        return uses_store(task, self.secret) if store else task


# ---- building blocks (plain functions that add tasks to the pipeline being defined) ------------------

def _prepare(pool: _Pool, catalog_uri, holdout_fraction, seed, check_images, name="prepare catalog",
             for_training=True):
    task = c.prepare_catalog(catalog_uri=catalog_uri, holdout_fraction=holdout_fraction, seed=seed,
                             check_images=check_images, for_training=for_training)
    # Not cached: a catalog can change under the same URI (a re-import), and a stale split would follow.
    return transient(impure(pool.cpu(task, name)))


def _train_and_gate(pool: _Pool, prepared, *, architecture, image_size, embedding_dim, trainable_blocks,
                    steps, samples_per_task, learning_rate, train_options, seed, device, phone_queries,
                    min_recall_at_10, min_head_accuracy, max_regression, compare_to):
    sets = prepared.outputs
    train = c.train_model(train_set=sets["train_set"], architecture=architecture,
                          image_size=image_size, embedding_dim=embedding_dim, trainable_blocks=trainable_blocks,
                          steps=steps, samples_per_task=samples_per_task, learning_rate=learning_rate,
                          train_options=train_options, seed=seed, device=device)
    train = transient(pure(pool.gpu(train, "train (GPU)")), retries=1)
    evaluate = c.evaluate_model(model=train.outputs["model"], eval_set=sets["eval_set"],
                                catalog=sets["catalog"], phone_queries=phone_queries, seed=seed)
    evaluate = pure(pool.cpu(evaluate, "evaluate model"))
    gates = c.check_model_gates(model=train.outputs["model"], metrics=evaluate.outputs["metrics"],
                                eval_set=sets["eval_set"], catalog=sets["catalog"],
                                min_recall_at_10=min_recall_at_10, min_head_accuracy=min_head_accuracy,
                                max_regression=max_regression, compare_to=compare_to,
                                phone_queries=phone_queries, seed=seed)
    # Not cached: it reads what `compare_to` points at now.
    gates = impure(pool.cpu(gates, "model gates"))
    return train, evaluate, gates


def _index_and_gate(pool: _Pool, model, catalog, queries, *, batch_size, index_factory, device, phone_queries,
                    seed, min_index_recall, min_recall_at_10, after=()):
    embed = c.embed_catalog(model=model, catalog=catalog, batch_size=batch_size, device=device)
    embed = transient(pure(pool.gpu(embed, "embed catalog (GPU)")), retries=1)
    if after:
        embed.after(*after)
    build = c.build_index(embeddings=embed.outputs["embeddings"], model=model, index_factory=index_factory,
                          min_index_recall=min_index_recall, seed=seed, device=device)
    build = transient(pure(pool.gpu(build, "build index (GPU)")), retries=1)
    evaluate = c.evaluate_index(index=build.outputs["index"], model=model, queries=queries,
                                phone_queries=phone_queries, seed=seed)
    evaluate = pure(pool.cpu(evaluate, "evaluate index"))
    gates = c.check_index_gates(build_metrics=build.outputs["metrics"], search_metrics=evaluate.outputs["metrics"],
                                min_index_recall=min_index_recall, min_recall_at_10=min_recall_at_10)
    gates = pure(pool.cpu(gates, "index gates", store=False))
    return build, gates


def _publish_model(pool: _Pool, model, evaluation, alias, after):
    task = c.publish_model(model=model, evaluation=evaluation.outputs["metrics"], report=evaluation.outputs["report"],
                           alias=alias).after(*after)
    return transient(impure(pool.cpu(task, "publish model")))


def _publish_index(pool: _Pool, index, alias, after):
    task = c.publish_index(index=index, alias=alias).after(*after)
    return transient(impure(pool.cpu(task, "publish index")))


# ---- the pipelines ------------------------------------------------------------------------------

@dsl.pipeline(name="lookalike-train", description="Fine-tune the multitask embedding model on a catalog, "
                                                   "evaluate it, and publish it if it passes the gates.")
def train_pipeline(
    catalog_uri: str = DEFAULT_CATALOG,
    holdout_fraction: float = 0.1,
    seed: int = 0,
    check_images: bool = True,
    architecture: str = DEFAULT_ARCHITECTURE,
    image_size: int = 112,
    embedding_dim: int = 128,
    trainable_blocks: int = 2,
    steps: int = 1200,
    samples_per_task: int = 16,
    learning_rate: float = 2e-3,
    train_options: dict = {},
    phone_queries: int = 500,
    min_recall_at_10: float = 0.2,
    min_head_accuracy: float = 0.5,
    max_regression: float = 0.02,
    compare_to: str = "production",
    publish_alias: str = "production",
    device: str = "auto",
    gpu_node_selector: dict = DEFAULT_GPU_NODE_SELECTOR,
    gpu_toleration: dict = DEFAULT_GPU_TOLERATION,
    s3_secret: str = S3_SECRET,
) -> str:
    """Train, evaluate and (if the gates pass) publish a model; returns the published model version.

    Args:
        catalog_uri: s3:// URI (or path) of the catalog.jsonl to train on.
        holdout_fraction: share of listings held out of training, to evaluate on (chosen by a hash of the listing id).
        seed: seed of the split, the training and the simulated phone photos.
        check_images: decode every catalog image while validating (slower, catches broken images early).
        architecture: timm backbone with packaged ImageNet weights (tf_efficientnet_lite0 or tf_efficientnet_lite1).
        image_size: input side in pixels the model sees (its preprocessing spec).
        embedding_dim: dimension of the shared embedding (the index's vector size).
        trainable_blocks: final backbone stages fine-tuned; the earlier ones stay frozen (-1: all).
        steps: optimiser steps.
        samples_per_task: rows of every task in each balanced batch.
        learning_rate: peak learning rate.
        train_options: any other training setting by name (see training/train.py), e.g. {"max_steps": 100}.
        phone_queries: simulated phone photos of held-out listings used to measure recall@k.
        min_recall_at_10: gate: phone-photo recall@10 of the held-out listings must reach this.
        min_head_accuracy: gate: every head's accuracy on held-out rows must reach this.
        max_regression: gate: no gated metric may be lower than the compare_to model's by more than this.
        compare_to: alias (or version) of the model to compare with; skipped when it does not exist.
        publish_alias: alias pointed at the new version once published ("" to publish without an alias).
        device: auto, cpu or cuda for training and embedding (cuda fails on a machine without a GPU).
        gpu_node_selector: node selector of the GPU node pool (GPU tasks only).
        gpu_toleration: toleration of the GPU node pool's taint (GPU tasks only).
        s3_secret: Kubernetes Secret holding AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY of the store.
    """
    pool = _Pool(gpu_node_selector, gpu_toleration, s3_secret)
    prepared = _prepare(pool, catalog_uri, holdout_fraction, seed, check_images)
    train, evaluate, gates = _train_and_gate(
        pool, prepared, architecture=architecture, image_size=image_size, embedding_dim=embedding_dim,
        trainable_blocks=trainable_blocks, steps=steps, samples_per_task=samples_per_task, learning_rate=learning_rate,
        train_options=train_options, seed=seed, device=device, phone_queries=phone_queries,
        min_recall_at_10=min_recall_at_10, min_head_accuracy=min_head_accuracy,
        max_regression=max_regression, compare_to=compare_to)
    publish = _publish_model(pool, train.outputs["model"], evaluate, publish_alias, [gates])
    return publish.output


@dsl.pipeline(name="lookalike-index", description="Embed a catalog with a published model, build the IVF "
                                                   "index, evaluate it, and publish it if it passes the gates.")
def index_pipeline(
    catalog_uri: str = DEFAULT_CATALOG,
    model_ref: str = "production",
    check_images: bool = False,
    batch_size: int = 64,
    index_factory: str = "",
    phone_queries: int = 500,
    seed: int = 0,
    min_index_recall: float = 0.9,
    min_recall_at_10: float = 0.2,
    publish_alias: str = "production",
    device: str = "auto",
    gpu_node_selector: dict = DEFAULT_GPU_NODE_SELECTOR,
    gpu_toleration: dict = DEFAULT_GPU_TOLERATION,
    s3_secret: str = S3_SECRET,
) -> str:
    """Build and (if the gates pass) publish an index of the whole catalog; returns the index version.

    Args:
        catalog_uri: s3:// URI (or path) of the catalog.jsonl to index (every row).
        model_ref: published model to embed with: a version, an alias (production) or latest.
        check_images: decode every image while validating the catalog (embedding decodes them anyway).
        batch_size: images per embedding batch.
        index_factory: FAISS factory string ("": IVF-Flat with the lists chosen from the catalog size; "Flat": exact).
        phone_queries: simulated phone photos of catalog listings used to measure recall@k.
        seed: seed of the simulated phone photos.
        min_index_recall: gate: recall@10 of the IVF index against exact search must reach this (nprobe is tuned for it).
        min_recall_at_10: gate: phone-photo recall@10 of the exact listing must reach this.
        publish_alias: alias pointed at the new index version once published ("" for none).
        device: auto, cpu or cuda for embedding and building (cuda fails on a machine without a GPU).
        gpu_node_selector: node selector of the GPU node pool (GPU tasks only).
        gpu_toleration: toleration of the GPU node pool's taint (GPU tasks only).
        s3_secret: Kubernetes Secret holding AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY of the store.
    """
    pool = _Pool(gpu_node_selector, gpu_toleration, s3_secret)
    model = transient(impure(pool.cpu(c.fetch_model(model_ref=model_ref), "fetch model")))
    prepared = _prepare(pool, catalog_uri, 0.0, seed, check_images, for_training=False)
    build, gates = _index_and_gate(
        pool, model.outputs["model"], prepared.outputs["catalog"], prepared.outputs["catalog"],
        batch_size=batch_size, index_factory=index_factory, device=device, phone_queries=phone_queries,
        seed=seed, min_index_recall=min_index_recall, min_recall_at_10=min_recall_at_10)
    publish = _publish_index(pool, build.outputs["index"], publish_alias, [gates])
    return publish.output


@dsl.pipeline(name="lookalike-update", description="Add new listings to the published index (and drop "
                                                    "delisted ones) without retraining; publish a new index version.")
def update_pipeline(
    new_listings_uri: str,
    delisted_uri: str = "",
    model_ref: str = "production",
    index_ref: str = "production",
    check_images: bool = True,
    batch_size: int = 64,
    phone_queries: int = 200,
    seed: int = 0,
    min_index_recall: float = 0.9,
    min_recall_at_10: float = 0.2,
    publish_alias: str = "production",
    device: str = "auto",
    gpu_node_selector: dict = DEFAULT_GPU_NODE_SELECTOR,
    gpu_toleration: dict = DEFAULT_GPU_TOLERATION,
    s3_secret: str = S3_SECRET,
) -> str:
    """Update the published index with new and delisted listings; returns the new index version.

    Args:
        new_listings_uri: s3:// URI (or path) of a catalog.jsonl of the listings to add.
        delisted_uri: s3:// URI (or path) of listing ids to remove, one per line ("" for none).
        model_ref: the published model the index was built with: a version, an alias or latest.
        index_ref: the published index to update: a version, an alias or latest (of that model).
        check_images: decode every new image while validating the new listings.
        batch_size: images per embedding batch.
        phone_queries: simulated phone photos of new listings used to measure recall@k.
        seed: seed of the simulated phone photos.
        min_index_recall: gate: recall@10 of the IVF index against exact search must reach this (nprobe is tuned for it).
        min_recall_at_10: gate: phone-photo recall@10 of the exact new listing must reach this.
        publish_alias: alias pointed at the new index version once published ("" for none).
        device: auto, cpu or cuda for embedding (cuda fails on a machine without a GPU).
        gpu_node_selector: node selector of the GPU node pool (GPU tasks only).
        gpu_toleration: toleration of the GPU node pool's taint (GPU tasks only).
        s3_secret: Kubernetes Secret holding AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY of the store.
    """
    pool = _Pool(gpu_node_selector, gpu_toleration, s3_secret)
    model = transient(impure(pool.cpu(c.fetch_model(model_ref=model_ref), "fetch model")))
    prepared = _prepare(pool, new_listings_uri, 0.0, seed, check_images, name="prepare new listings",
                        for_training=False)
    embed = c.embed_catalog(model=model.outputs["model"], catalog=prepared.outputs["catalog"],
                            batch_size=batch_size, device=device)
    embed = transient(pure(pool.gpu(embed, "embed new listings (GPU)")), retries=1)
    update = c.update_index(model=model.outputs["model"], embeddings=embed.outputs["embeddings"],
                            index_ref=index_ref, delisted_uri=delisted_uri)
    # Not cached: it reads what index_ref points at now.
    update = transient(impure(pool.cpu(update, "update index")))
    evaluate = c.evaluate_index(index=update.outputs["index"], model=model.outputs["model"],
                                queries=prepared.outputs["catalog"], phone_queries=phone_queries, seed=seed)
    evaluate = pure(pool.cpu(evaluate, "evaluate index"))
    gates = c.check_index_gates(build_metrics=update.outputs["metrics"], search_metrics=evaluate.outputs["metrics"],
                                min_index_recall=min_index_recall, min_recall_at_10=min_recall_at_10)
    gates = pure(pool.cpu(gates, "index gates", store=False))
    publish = _publish_index(pool, update.outputs["index"], publish_alias, [gates])
    return publish.output


class TrainAndIndexOutputs(NamedTuple):
    model_version: str
    index_version: str


@dsl.pipeline(name="lookalike-train-and-index", description="Train, evaluate and index in one run; publish the "
                                                             "model and its index together if both pass their gates.")
def train_and_index_pipeline(
    catalog_uri: str = DEFAULT_CATALOG,
    holdout_fraction: float = 0.1,
    seed: int = 0,
    check_images: bool = True,
    architecture: str = DEFAULT_ARCHITECTURE,
    image_size: int = 112,
    embedding_dim: int = 128,
    trainable_blocks: int = 2,
    steps: int = 1200,
    samples_per_task: int = 16,
    learning_rate: float = 2e-3,
    train_options: dict = {},
    embed_batch_size: int = 64,
    index_factory: str = "",
    phone_queries: int = 500,
    min_recall_at_10: float = 0.2,
    min_head_accuracy: float = 0.5,
    max_regression: float = 0.02,
    min_index_recall: float = 0.9,
    compare_to: str = "production",
    publish_alias: str = "production",
    device: str = "auto",
    gpu_node_selector: dict = DEFAULT_GPU_NODE_SELECTOR,
    gpu_toleration: dict = DEFAULT_GPU_TOLERATION,
    s3_secret: str = S3_SECRET,
) -> TrainAndIndexOutputs:
    """Train a model and index the whole catalog with it; publish both (model first) if every gate passes.

    Args:
        catalog_uri: s3:// URI (or path) of the catalog.jsonl to train on and index (every row is indexed).
        holdout_fraction: share of listings held out of training, to evaluate on (chosen by a hash of the listing id).
        seed: seed of the split, the training and the simulated phone photos.
        check_images: decode every catalog image while validating (slower, catches broken images early).
        architecture: timm backbone with packaged ImageNet weights (tf_efficientnet_lite0 or tf_efficientnet_lite1).
        image_size: input side in pixels the model sees (its preprocessing spec).
        embedding_dim: dimension of the shared embedding (the index's vector size).
        trainable_blocks: final backbone stages fine-tuned; the earlier ones stay frozen (-1: all).
        steps: optimiser steps.
        samples_per_task: rows of every task in each balanced batch.
        embed_batch_size: images per embedding batch.
        learning_rate: peak learning rate.
        train_options: any other training setting by name (see training/train.py), e.g. {"max_steps": 100}.
        index_factory: FAISS factory string ("": IVF-Flat with the lists chosen from the catalog size; "Flat": exact).
        phone_queries: simulated phone photos of held-out listings used to measure recall@k.
        min_recall_at_10: gate: phone-photo recall@10 of the held-out listings must reach this, exact and through the index.
        min_head_accuracy: gate: every head's accuracy on held-out rows must reach this.
        max_regression: gate: no gated metric may be lower than the compare_to model's by more than this.
        min_index_recall: gate: recall@10 of the IVF index against exact search must reach this (nprobe is tuned for it).
        compare_to: alias (or version) of the model to compare with; skipped when it does not exist.
        publish_alias: alias pointed at the new model and index versions once published ("" for none).
        device: auto, cpu or cuda for training, embedding and building (cuda fails on a machine without a GPU).
        gpu_node_selector: node selector of the GPU node pool (GPU tasks only).
        gpu_toleration: toleration of the GPU node pool's taint (GPU tasks only).
        s3_secret: Kubernetes Secret holding AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY of the store.
    """
    pool = _Pool(gpu_node_selector, gpu_toleration, s3_secret)
    prepared = _prepare(pool, catalog_uri, holdout_fraction, seed, check_images)
    train, evaluate, model_gates = _train_and_gate(
        pool, prepared, architecture=architecture, image_size=image_size, embedding_dim=embedding_dim,
        trainable_blocks=trainable_blocks, steps=steps, samples_per_task=samples_per_task, learning_rate=learning_rate,
        train_options=train_options, seed=seed, device=device, phone_queries=phone_queries,
        min_recall_at_10=min_recall_at_10, min_head_accuracy=min_head_accuracy,
        max_regression=max_regression, compare_to=compare_to)
    model = train.outputs["model"]
    # Embedding waits for the model gates: a model that will not be published is not worth indexing.
    build, index_gates = _index_and_gate(
        pool, model, prepared.outputs["catalog"], prepared.outputs["eval_set"], batch_size=embed_batch_size,
        index_factory=index_factory, device=device, phone_queries=phone_queries, seed=seed,
        min_index_recall=min_index_recall, min_recall_at_10=min_recall_at_10, after=[model_gates])
    publish_model = _publish_model(pool, model, evaluate, publish_alias, [model_gates, index_gates])
    publish_index = _publish_index(pool, build.outputs["index"], publish_alias, [publish_model])
    return TrainAndIndexOutputs(model_version=publish_model.output, index_version=publish_index.output)


PIPELINES = {
    "train": train_pipeline,
    "index": index_pipeline,
    "update": update_pipeline,
    "train-and-index": train_and_index_pipeline,
}
