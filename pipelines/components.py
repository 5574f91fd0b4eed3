"""The Kubeflow components: thin wrappers that hand typed artifacts to the work in `lookalike.pipelines.steps`.

Each component runs in the project's own image (`lookalike.pipelines.cluster`), where the project is installed,
so the function body only imports it: nothing is pip-installed at task start (`install_kfp_package=False`
and no `packages_to_install`). Locally, `kfp.local.SubprocessRunner(use_venv=False)` runs the same body
in this Python. Each body imports the module of `pipelines/steps/` that holds its work (as `work`) and
hands it to `run_step`, which turns any failure into one marked line.

Artifacts: catalogs and embeddings are `Dataset`s, the model and the index are `Model`s (folders),
evaluation lands as `Metrics` (scalars), an `HTML` report and a confusion matrix per head (JSON, then one
`ClassificationMetrics` per head of the model, which the KFP UI draws); gate verdicts and catalog
summaries are `Markdown`.
"""

from kfp import dsl
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

from lookalike.pipelines.cluster import CPU_IMAGE

component = dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)


@component
def prepare_catalog(catalog_uri: str, holdout_fraction: float, seed: int, check_images: bool, for_training: bool,
                    catalog: Output[Dataset], train_set: Output[Dataset], eval_set: Output[Dataset],
                    report: Output[Markdown]):
    """Validate the catalog, reporting every bad row, and hold out an evaluation set."""
    from lookalike.pipelines.steps import prepare as work
    from lookalike.pipelines.steps.runner import run_step

    run_step("prepare catalog", work.prepare_catalog, catalog_uri=catalog_uri,
             holdout_fraction=holdout_fraction, seed=seed, check_images=check_images,
             for_training=for_training, catalog=catalog, train_set=train_set, eval_set=eval_set,
             report=report)


@component
def train_model(train_set: Input[Dataset], settings: dict, seed: int, model: Output[Model], metrics: Output[Metrics]):
    """Fine-tune the pretrained backbone with one head per label set; export the model folder."""
    from lookalike.pipelines.steps import model as work
    from lookalike.pipelines.steps.runner import run_step

    run_step("train", work.train_model, train_set=train_set, settings=settings, seed=seed, model=model,
             metrics=metrics)


@component
def evaluate_model(model: Input[Model], eval_set: Input[Dataset], catalog: Input[Dataset],
                   phone_queries: int, seed: int, metrics: Output[Metrics], report: Output[HTML],
                   confusion_matrices: Output[Artifact]) -> list[str]:
    """Per-head accuracy, retrieval recall@k on held-out items (catalog and simulated phone photos),
    beside the ImageNet-pretrained baseline; an HTML report with the plots; a confusion matrix of every
    head (JSON). Returns the model's heads."""
    from lookalike.pipelines.steps import evaluation as work
    from lookalike.pipelines.steps.runner import run_step

    return run_step("evaluate model", work.evaluate_model, model=model, eval_set=eval_set, catalog=catalog,
                    phone_queries=phone_queries, seed=seed, metrics=metrics, report=report,
                    confusion_matrices=confusion_matrices)


@component
def show_confusion_matrix(matrices: Input[Artifact], head: str, confusion: Output[ClassificationMetrics]):
    """One head's confusion matrix on held-out rows, as the ClassificationMetrics the KFP UI draws (a
    component's outputs are fixed when it is compiled, so the pipeline runs this once per head)."""
    from lookalike.pipelines.steps import evaluation as work
    from lookalike.pipelines.steps.runner import run_step

    run_step(f"confusion matrix of {head}", work.show_confusion_matrix, matrices=matrices, head=head,
             confusion=confusion)


@component
def check_model_gates(model: Input[Model], metrics: Input[Metrics], eval_set: Input[Dataset],
                      catalog: Input[Dataset], min_recall_at_10: float, min_head_accuracy: float,
                      max_regression: float, compare_to: str, phone_queries: int, seed: int,
                      pretrained_margin: float, verdict: Output[Markdown]):
    """Fail the run unless the model meets every gate, is not worse than the ImageNet-pretrained model
    (within `pretrained_margin`) nor than `compare_to` (within `max_regression`), measured on the same
    held-out items."""
    from lookalike.pipelines.steps import gates as work
    from lookalike.pipelines.steps.runner import run_step

    run_step("model gates", work.check_model_gates, model=model, metrics=metrics, eval_set=eval_set,
             catalog=catalog, min_recall_at_10=min_recall_at_10, min_head_accuracy=min_head_accuracy,
             max_regression=max_regression, compare_to=compare_to, phone_queries=phone_queries,
             seed=seed, pretrained_margin=pretrained_margin, verdict=verdict)


@component
def publish_model(model: Input[Model], evaluation: Input[Metrics], report: Input[HTML], alias: str) -> str:
    """Publish the model folder, with its evaluation and report, as a new version (whole or not at all);
    point `alias` at it."""
    from lookalike.pipelines.steps import model as work
    from lookalike.pipelines.steps.runner import run_step

    return run_step("publish model", work.publish_model, model=model, evaluation=evaluation, report=report,
                    alias=alias)


@component
def fetch_model(model_ref: str, model: Output[Model]):
    """Download a published model version (a version, an alias or `latest`), checked against its manifest."""
    from lookalike.pipelines.steps import model as work
    from lookalike.pipelines.steps.runner import run_step

    run_step("fetch model", work.fetch_model, model_ref=model_ref, model=model)


@component
def shard_numbers(shards: int) -> list:
    """0 .. shards-1: the items the embedding fan-out loops over (a pipeline parameter sets how many)."""
    from lookalike.pipelines.steps import embed as work
    from lookalike.pipelines.steps.runner import run_step

    return run_step("plan shards", work.shard_numbers, shards=shards)


@component
def embed_catalog(model: Input[Model], catalog: Input[Dataset], batch_size: int, device: str, shard: int,
                  shards: int, embeddings: Output[Dataset]):
    """Embed every photo of one shard of the catalog with the model, through the serving preprocessing."""
    from lookalike.pipelines.steps import embed as work
    from lookalike.pipelines.steps.runner import run_step

    run_step("embed catalog", work.embed_catalog, model=model, catalog=catalog, batch_size=batch_size,
             device=device, embeddings=embeddings, shard=shard, shards=shards)


@component
def build_index(embeddings: Input[list[Dataset]], model: Input[Model], index_factory: str, memory_budget: str,
                min_index_recall: float,
                seed: int, device: str, index: Output[Model], metrics: Output[Metrics]):
    """Train the IVF centroids, add every vector with its listing id, tune nprobe until the index finds
    what exact search finds (recall@10 of at least 0.95, or min_index_recall if higher)."""
    from lookalike.pipelines.steps import index as work
    from lookalike.pipelines.steps.runner import run_step

    run_step("build index", work.build_index, embeddings=embeddings, model=model,
             index_factory=index_factory, memory_budget=memory_budget, min_index_recall=min_index_recall,
             seed=seed, device=device,
             index=index, metrics=metrics)


@component
def evaluate_index(index: Input[Model], model: Input[Model], queries: Input[Dataset], phone_queries: int,
                   seed: int, metrics: Output[Metrics], report: Output[Markdown]):
    """Search the index with simulated phone photos of listings in `queries` (held-out items when there
    was training): recall@k of the exact listing, through the serving preprocessing."""
    from lookalike.pipelines.steps import index as work
    from lookalike.pipelines.steps.runner import run_step

    run_step("evaluate index", work.evaluate_index, index=index, model=model, queries=queries,
             phone_queries=phone_queries, seed=seed, metrics=metrics, report=report)


@component
def check_index_gates(build_metrics: Input[Metrics], search_metrics: Input[Metrics], min_index_recall: float,
                      min_recall_at_10: float, verdict: Output[Markdown]):
    """Fail the run unless the IVF index finds what exact search finds, and the search itself works."""
    from lookalike.pipelines.steps import gates as work
    from lookalike.pipelines.steps.runner import run_step

    run_step("index gates", work.check_index_gates, build_metrics=build_metrics,
             search_metrics=search_metrics, min_index_recall=min_index_recall,
             min_recall_at_10=min_recall_at_10, verdict=verdict)


@component
def publish_index(index: Input[Model], alias: str, model_alias: str, index_shards: int) -> str:
    """Publish the index as a new version under the model version it was built with; point `alias` at it
    (under a lease; an update whose alias moved meanwhile is applied again on the new target); with
    `index_shards` > 0 publish its sharded version too (an update changes only its listings' shards); then
    point the model's `model_alias` at its model ("" for none): a model alias never moves before its index
    exists."""
    from lookalike.pipelines.steps import index as work
    from lookalike.pipelines.steps.runner import run_step

    return run_step("publish index", work.publish_index, index=index, alias=alias, model_alias=model_alias,
                    index_shards=index_shards)


@component
def update_index(model: Input[Model], embeddings: Input[list[Dataset]], index_ref: str, delisted_uri: str,
                 index: Output[Model], metrics: Output[Metrics]):
    """Add new listings to the published index without retraining its centroids and remove delisted
    ids; report drift (a due rebuild is the index pipeline's job)."""
    from lookalike.pipelines.steps import index as work
    from lookalike.pipelines.steps.runner import run_step

    run_step("update index", work.update_index, model=model, embeddings=embeddings,
             index_ref=index_ref, delisted_uri=delisted_uri, index=index, metrics=metrics)
