"""The pipelines: `train`, `index`, `update` and `train-and-index`.

Each publishes last, and only after its gates pass: a gate that fails fails the run at the gate step
with a message saying what to do, nothing is published and the `production` aliases stay where they
were. The same definitions compile to IR YAML for Kubeflow (`lookalike.pipelines.compile`) and run on one
machine with `kfp.local` (`lookalike.pipelines.local`).

    train             prepare → train (GPU) → evaluate (+ a confusion matrix per head) → model gates → publish model
    index             fetch model, prepare → embed (GPU, `embed_shards` tasks in parallel) → build (GPU) →
                      evaluate → index gates → publish index (and, with `index_shards` K, its K-shard version)
    update            fetch model, prepare new listings → embed (GPU) → add new listings, replace changed
                      ones (all their photos), remove delisted ones in the published index without
                      re-clustering (drift is reported; the new catalog joins the ones the index card
                      names) → evaluate → index gates → publish index (with `index_shards`, the sharded
                      version too: only the shards of the listings changed); schedule `index` too (e.g.
                      weekly) for the full rebuild that re-clusters
    train-and-index   train and index in one run; the model and its index are published together at
                      the end, only when both pass their gates

Parameters are declared once, in `PARAMETERS`: type, default and the description the KFP UI and
`lookalike pipeline run NAME --help` show. Each pipeline names the groups it takes (`CATALOG`,
`TRAINING`, `MODEL_GATES`, `INDEXING`, `RUNNING`) and `_pipeline` builds the signature KFP compiles
from them; the body reads them as `p.<name>`. The training defaults are `lookalike.training.train.TrainConfig`'s,
the one source `lookalike train` reads too, so both train the same model unless told otherwise. Left at
0 (image_size, steps) or -2 (trainable_blocks), they are chosen from the catalog (`training/defaults.py`:
224 px and 2 stages for photos, 80 px and 3 stages for thumbnails, a length in epochs); on a GPU pool
raise them with --param; `lookalike demo` passes smaller ones.

Why `train-and-index` does not run the `train` and `index` pipelines as tasks: kfp.local 2.17 can run a
pipeline nested in another (its enhanced DAG orchestrator runs sub-DAGs, as KFP does), but `train`
publishes its model as soon as the model gates pass, and `index` embeds with a model it fetches from
the store, so it needs that model published first. Nested, they would publish the model before its
index had passed its gates, which is what train-and-index exists to prevent. Unpublished sub-pipelines
would not remove the repetition either: a pipeline's parameters are its own signature, and the outer
pipeline would still list each one to pass it down. So the steps are shared as building blocks
(`_prepare`, `_train_and_gate`, `_index_and_gate`, `_publish_*`) and the parameters as one table.
"""

import inspect
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Any, NamedTuple
from collections.abc import Callable

from kfp import dsl

from lookalike.pipelines import components as c
from lookalike.pipelines.cluster import (DEFAULT_GPU_NODE_SELECTOR, DEFAULT_GPU_TOLERATION, S3_SECRET, impure, on_cpu,
                                         on_gpu, pure, transient, uses_store)
from lookalike.training.settings import pipeline_parameters

EMBED_PARALLELISM = 8  # embedding tasks running at once (KFP fixes a loop's parallelism when it compiles)
DEFAULT_CATALOG = "fashion-mnist-train"  # a catalog name: catalogs/<name>/catalog.jsonl in the configured bucket
REQUIRED = inspect.Parameter.empty


@dataclass(frozen=True)
class Param:
    """One pipeline parameter: its type, its default (REQUIRED for none) and what it means."""

    type: type
    default: Any
    help: str

    def but(self, **changes: Any) -> "Param":
        return replace(self, **changes)


_CATALOG_FORMS = ("a name such as fashion-mnist-train (catalogs/<name>/catalog.jsonl in the configured bucket), "
                  "an s3:// URI or a path of a catalog.jsonl")

PARAMETERS: dict[str, Param] = {
    # the catalog and its split
    "catalog_uri": Param(str, DEFAULT_CATALOG, f"catalog to train on: {_CATALOG_FORMS}."),
    "holdout_fraction": Param(float, 0.1, "share of listings held out of training, to evaluate on (chosen by a "
                                          "hash of the listing id)."),
    "seed": Param(int, 0, "seed of the split, the training and the simulated phone photos (those the pipeline has)."),
    "check_images": Param(bool, True, "decode every catalog image while validating (slower, catches broken "
                                      "images early)."),
    # evaluation and the model gates
    "min_recall_at_10": Param(float, 0.2, "gate: phone-photo recall@10 of the photographed listing must reach "
                                          "this, in each evaluation the pipeline runs (the model's exact search "
                                          "over held-out listings, the search through the index)."),
    "min_head_accuracy": Param(float, 0.5, "gate: every head's accuracy on held-out rows must reach this."),
    "max_regression": Param(float, 0.02, "gate: no gated metric may be lower than the compare_to model's by "
                                         "more than this."),
    "compare_to": Param(str, "production", "alias (or version) of the model to compare with; skipped when it "
                                           "does not exist."),
    "pretrained_margin": Param(float, 0.0, "gate: the model's same-listing recall@10 (held-out photos, simulated "
                                           "phone photos) and every label's precision@10 may be lower than the "
                                           "ImageNet-pretrained model's, measured on the same queries, by at most "
                                           "this (0: never lower; 1: no comparison)."),
    # indexing
    "model_ref": Param(str, "production", "published model to embed with (the one the index belongs to): a "
                                          "version, an alias such as production, or latest."),
    "embed_batch_size": Param(int, 64, "images decoded per batch by each embedding task (a CPU embeds them 4 at a "
                                       "time, a GPU all at once)."),
    "embed_shards": Param(int, 1, f"shards the catalog is embedded in, one GPU task each, at most "
                                  f"{EMBED_PARALLELISM} at a time (a listing's photos stay in one shard); the "
                                  f"shards' vectors are collected into one index."),
    "index_factory": Param(str, "", 'FAISS factory string ("": IVF-Flat with the lists chosen from the catalog '
                                    'size; "Flat": exact).'),
    "index_memory_budget": Param(str, "", 'memory a predictor may give the index, e.g. "8GiB": without an '
                                          'index_factory, IVF-Flat when it fits, else the compact IVF-PQ re-ranked '
                                          'from an 8-bit copy ("": no budget, IVF-Flat).'),
    "index_shards": Param(int, 0, "also publish the index as a sharded version of this many shards (1-256; 0: "
                                  "none), for `lookalike serve --shards K`: under indexes-sharded/<model>/, after "
                                  "the index and under the same alias; listings go to shards by a hash of their "
                                  "id, every shard keeps the index's centroids. An update changes only the shards "
                                  "of the listings it adds, replaces or delists; it splits the updated index "
                                  "instead when the alias names no sharded version, one of another shard count, "
                                  "or one made from another index version."),
    "min_index_recall": Param(float, 0.9, "gate: recall@10 of the IVF index against exact search must reach "
                                          "this (nprobe is tuned for it)."),
    # updating a published index
    "new_listings_uri": Param(str, REQUIRED, f"the listings to add, or to replace with all their photos when "
                                             f"already indexed: {_CATALOG_FORMS}."),
    "delisted_uri": Param(str, "", 's3:// URI (or path) of listing ids to remove with all their photos, one per '
                                   'line ("" for none); an id not in the index is reported and skipped.'),
    "index_ref": Param(str, "production", "the published index to update: a version, an alias or latest (of "
                                          "that model)."),
    # publishing, and where the tasks run
    "publish_alias": Param(str, "production", "alias pointed at what the run publishes (the model, the index, "
                                              'or both) once its gates pass ("" for none).'),
    "gpu_node_selector": Param(dict, DEFAULT_GPU_NODE_SELECTOR, "node selector of the GPU node pool (GPU tasks "
                                                                "only)."),
    "gpu_toleration": Param(dict, DEFAULT_GPU_TOLERATION, "toleration of the GPU node pool's taint (GPU tasks only)."),
    "s3_secret": Param(str, S3_SECRET, "Kubernetes Secret holding AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY of "
                                       "the store."),
}
# Every training setting a pipeline takes, declared once in lookalike/training/settings.py: its name,
# type, default and help are the ones `lookalike train` shows. `phone_queries` also sizes the
# evaluation steps, `device` places every GPU step.
PARAMETERS.update({name: Param(kind, default, help) for name, (kind, default, help) in pipeline_parameters().items()})

CATALOG = ("catalog_uri", "holdout_fraction", "seed", "check_images")
TRAINING = tuple(name for name in pipeline_parameters() if name not in ("phone_queries", "device"))
MODEL_GATES = ("phone_queries", "min_recall_at_10", "min_head_accuracy", "max_regression", "compare_to",
               "pretrained_margin")
INDEXING = ("embed_batch_size", "embed_shards", "index_factory", "index_memory_budget", "index_shards",
            "min_index_recall")
RUNNING = ("publish_alias", "device", "gpu_node_selector", "gpu_toleration", "s3_secret")


def _pipeline(name: str, description: str, *groups: tuple[str, ...],
              changes: dict[str, dict[str, Any]] | None = None) -> Callable:
    """Make `body(p)` the pipeline `lookalike-<name>` taking the PARAMETERS named in `groups` (each once,
    in order; `changes` alters one pipeline's default or description of a parameter).

    KFP reads a pipeline's parameters from its function's signature and docstring: both are built here
    from the table, and KFP's call with the parameters as pipeline channels reaches `body` as `p`.
    """
    params = {key: PARAMETERS[key] for group in groups for key in group}
    for key, change in (changes or {}).items():
        params[key] = params[key].but(**change)
    order = sorted(params, key=lambda key: params[key].default is not REQUIRED)  # required first, else stable

    def define(body: Callable[[SimpleNamespace], Any]):
        signature = inspect.Signature(
            [inspect.Parameter(key, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=params[key].default,
                               annotation=params[key].type) for key in order],
            return_annotation=inspect.signature(body).return_annotation)

        def pipeline(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            return body(SimpleNamespace(**bound.arguments))

        pipeline.__signature__ = signature
        pipeline.__name__ = pipeline.__qualname__ = body.__name__
        pipeline.__module__ = body.__module__
        pipeline.__doc__ = (inspect.getdoc(body) + "\n\nArgs:\n"
                            + "\n".join(f"    {key}: {params[key].help}" for key in order))
        return dsl.pipeline(name=f"lookalike-{name}", description=description)(pipeline)

    return define


class _Pool:
    """The cluster placement of one run's tasks, from its parameters."""

    def __init__(self, p):
        self.selector, self.toleration, self.secret = p.gpu_node_selector, p.gpu_toleration, p.s3_secret

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


def _train_and_gate(pool: _Pool, prepared, p):
    sets = prepared.outputs
    # The training settings travel as one dict (KFP fills in each parameter's value at run time); the
    # step reads each back with its declared type.
    settings = {name: getattr(p, name) for name in (*TRAINING, "phone_queries", "device")}
    train = c.train_model(train_set=sets["train_set"], settings=settings, seed=p.seed)
    train = transient(pure(pool.gpu(train, "train (GPU)")), retries=1)
    evaluate = c.evaluate_model(model=train.outputs["model"], eval_set=sets["eval_set"], catalog=sets["catalog"],
                                phone_queries=p.phone_queries, seed=p.seed)
    evaluate = pure(pool.cpu(evaluate, "evaluate model"))
    # One ClassificationMetrics per head the model has (its card's heads, returned by evaluate): a
    # component's outputs are fixed at compile time, the heads are not.
    with dsl.ParallelFor(evaluate.outputs["Output"], name="each head") as head:
        show = c.show_confusion_matrix(matrices=evaluate.outputs["confusion_matrices"], head=head)
        pure(pool.cpu(show, "confusion matrix", store=False))
    gates = c.check_model_gates(model=train.outputs["model"], metrics=evaluate.outputs["metrics"],
                                eval_set=sets["eval_set"], catalog=sets["catalog"],
                                min_recall_at_10=p.min_recall_at_10, min_head_accuracy=p.min_head_accuracy,
                                max_regression=p.max_regression, compare_to=p.compare_to,
                                phone_queries=p.phone_queries, seed=p.seed, pretrained_margin=p.pretrained_margin)
    # Not cached: it reads what `compare_to` points at now.
    gates = impure(pool.cpu(gates, "model gates"))
    return train, evaluate, gates


def _embed(pool: _Pool, model, catalog, p, name: str, after=()):
    """The catalog embedded in `embed_shards` parallel GPU tasks; their vectors, collected in shard order."""
    plan = c.shard_numbers(shards=p.embed_shards)
    plan = pure(pool.cpu(plan, "plan shards", store=False))
    if after:
        plan.after(*after)
    with dsl.ParallelFor(plan.output, parallelism=EMBED_PARALLELISM, name="each shard") as shard:
        embed = c.embed_catalog(model=model, catalog=catalog, batch_size=p.embed_batch_size, device=p.device,
                                shard=shard, shards=p.embed_shards)
        embed = transient(pure(pool.gpu(embed, name)), retries=1)
    return dsl.Collected(embed.outputs["embeddings"])


def _index_and_gate(pool: _Pool, model, catalog, queries, p, after=()):
    vectors = _embed(pool, model, catalog, p, "embed catalog (GPU)", after)
    build = c.build_index(embeddings=vectors, model=model, index_factory=p.index_factory,
                          memory_budget=p.index_memory_budget,
                          min_index_recall=p.min_index_recall, seed=p.seed, device=p.device)
    build = transient(pure(pool.gpu(build, "build index (GPU)")), retries=1)
    evaluate = c.evaluate_index(index=build.outputs["index"], model=model, queries=queries,
                                phone_queries=p.phone_queries, seed=p.seed)
    evaluate = pure(pool.cpu(evaluate, "evaluate index"))
    gates = _index_gates(pool, build, evaluate, p)
    return build, gates


def _index_gates(pool: _Pool, build, evaluate, p):
    gates = c.check_index_gates(build_metrics=build.outputs["metrics"], search_metrics=evaluate.outputs["metrics"],
                                min_index_recall=p.min_index_recall, min_recall_at_10=p.min_recall_at_10)
    return pure(pool.cpu(gates, "index gates", store=False))


def _fetch_model(pool: _Pool, model_ref):
    # Not cached: it reads what model_ref points at now.
    return transient(impure(pool.cpu(c.fetch_model(model_ref=model_ref), "fetch model")))


def _publish_model(pool: _Pool, model, evaluation, alias, after):
    task = c.publish_model(model=model, evaluation=evaluation.outputs["metrics"], report=evaluation.outputs["report"],
                           alias=alias).after(*after)
    return transient(impure(pool.cpu(task, "publish model")))


def _publish_index(pool: _Pool, index, p, after, model_alias=""):
    task = c.publish_index(index=index, alias=p.publish_alias, model_alias=model_alias,
                           index_shards=p.index_shards).after(*after)
    return transient(impure(pool.cpu(task, "publish index")))


# ---- the pipelines ------------------------------------------------------------------------------

@_pipeline("train", "Fine-tune the multitask embedding model on a catalog, evaluate it, and publish it if it "
                    "passes the gates.", CATALOG, TRAINING, MODEL_GATES, RUNNING)
def train_pipeline(p) -> str:
    """Train, evaluate and (if the gates pass) publish a model; returns the published model version."""
    pool = _Pool(p)
    prepared = _prepare(pool, p.catalog_uri, p.holdout_fraction, p.seed, p.check_images)
    train, evaluate, gates = _train_and_gate(pool, prepared, p)
    return _publish_model(pool, train.outputs["model"], evaluate, p.publish_alias, [gates]).output


@_pipeline("index", "Embed a catalog with a published model, build the IVF index, evaluate it, and publish it "
                    "if it passes the gates.",
           ("catalog_uri", "model_ref", "check_images", "seed"), ("phone_queries", "min_recall_at_10"), INDEXING,
           RUNNING,
           changes={"catalog_uri": {"help": f"catalog to index (every row): {_CATALOG_FORMS}."},
                    "check_images": {"default": False,
                                     "help": "decode every image while validating the catalog (embedding decodes "
                                             "them anyway)."}})
def index_pipeline(p) -> str:
    """Build and (if the gates pass) publish an index of the whole catalog; returns the index version."""
    pool = _Pool(p)
    model = _fetch_model(pool, p.model_ref)
    prepared = _prepare(pool, p.catalog_uri, 0.0, p.seed, p.check_images, for_training=False)
    build, gates = _index_and_gate(pool, model.outputs["model"], prepared.outputs["catalog"],
                                   prepared.outputs["catalog"], p)
    return _publish_index(pool, build.outputs["index"], p, [gates]).output


@_pipeline("update", "Add new and changed listings to the published index (and drop delisted ones) without "
                     "retraining; publish a new index version.",
           ("new_listings_uri", "delisted_uri", "model_ref", "index_ref", "check_images", "seed"),
           ("phone_queries", "min_recall_at_10", "embed_batch_size", "embed_shards", "index_shards",
            "min_index_recall"), RUNNING,
           changes={"phone_queries": {"default": 200}})
def update_pipeline(p) -> str:
    """Update the published index with new and delisted listings; returns the new index version."""
    pool = _Pool(p)
    model = _fetch_model(pool, p.model_ref)
    prepared = _prepare(pool, p.new_listings_uri, 0.0, p.seed, p.check_images, name="prepare new listings",
                        for_training=False)
    vectors = _embed(pool, model.outputs["model"], prepared.outputs["catalog"], p, "embed new listings (GPU)")
    update = c.update_index(model=model.outputs["model"], embeddings=vectors,
                            index_ref=p.index_ref, delisted_uri=p.delisted_uri)
    # Not cached: it reads what index_ref points at now.
    update = transient(impure(pool.cpu(update, "update index")))
    evaluate = c.evaluate_index(index=update.outputs["index"], model=model.outputs["model"],
                                queries=prepared.outputs["catalog"], phone_queries=p.phone_queries, seed=p.seed)
    evaluate = pure(pool.cpu(evaluate, "evaluate index"))
    gates = _index_gates(pool, update, evaluate, p)
    return _publish_index(pool, update.outputs["index"], p, [gates]).output


class TrainAndIndexOutputs(NamedTuple):
    model_version: str
    index_version: str


@_pipeline("train-and-index", "Train, evaluate and index in one run; publish the model and its index together "
                              "if both pass their gates.", CATALOG, TRAINING, MODEL_GATES, INDEXING, RUNNING,
           changes={"catalog_uri": {"help": f"catalog to train on and index (every row is indexed): "
                                            f"{_CATALOG_FORMS}."}})
def train_and_index_pipeline(p) -> TrainAndIndexOutputs:
    """Train a model and index the whole catalog with it; publish both if every gate passes (the model,
    then its index, then the model alias: `production` never names a model without an index)."""
    pool = _Pool(p)
    prepared = _prepare(pool, p.catalog_uri, p.holdout_fraction, p.seed, p.check_images)
    train, evaluate, model_gates = _train_and_gate(pool, prepared, p)
    model = train.outputs["model"]
    # Embedding waits for the model gates: a model that will not be published is not worth indexing.
    build, index_gates = _index_and_gate(pool, model, prepared.outputs["catalog"], prepared.outputs["eval_set"], p,
                                         after=[model_gates])
    # The model is published without its alias; the index step moves the index's alias, then the model's:
    # a crash between the two leaves the aliases on the previous complete pair, never a model without index.
    publish_model = _publish_model(pool, model, evaluate, "", [model_gates, index_gates])
    publish_index = _publish_index(pool, build.outputs["index"], p, [publish_model], model_alias=p.publish_alias)
    return TrainAndIndexOutputs(model_version=publish_model.output, index_version=publish_index.output)


PIPELINES = {
    "train": train_pipeline,
    "index": index_pipeline,
    "update": update_pipeline,
    "train-and-index": train_and_index_pipeline,
}
