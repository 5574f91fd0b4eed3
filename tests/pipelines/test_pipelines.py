"""The Kubeflow pipelines: compiled YAML current and valid, cluster settings where they belong, parameters
declared once (training defaults from TrainConfig), the steps' errors and alias messages, and local runs
(real kfp.local, real S3 server) that fail at the right step with a clear message."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from google.protobuf import json_format
from kfp.kubernetes import kubernetes_executor_config_pb2
from kfp.pipeline_spec import pipeline_spec_pb2

from lookalike.pipelines.cluster import CPU_IMAGE, GPU_IMAGE, GPU_RESOURCE, S3_SECRET_KEYS
from lookalike.pipelines.compile import COMPILED_DIR, compile_all
from lookalike.pipelines.definitions import PIPELINES
from lookalike.pipelines.local import PipelineFailed, run_local
from lookalike.core.artifacts import model_repo
from lookalike.core.errors import LookalikeError

GPU_COMPONENTS = {"train-model", "embed-catalog", "build-index"}
UNCACHED = {"prepare-catalog", "check-model-gates", "publish-model", "publish-index", "fetch-model", "update-index"}
NO_RETRY = {"check-model-gates", "check-index-gates", "evaluate-model", "evaluate-index", "show-confusion-matrix"}
NO_STORE = {"check-index-gates", "show-confusion-matrix", "shard-numbers"}


def _base(name: str) -> str:
    """comp-embed-catalog-2 / exec-embed-catalog-2 / embed-catalog-2 → embed-catalog."""
    for prefix in ("comp-", "exec-"):
        name = name.removeprefix(prefix)
    head, _, tail = name.rpartition("-")
    return head if tail.isdigit() else name


def _tasks(spec_doc: dict) -> dict[str, dict]:
    """Every task that runs a container: the root DAG's and those inside loops (not the loops themselves)."""
    dags = [spec_doc["root"]["dag"]] + [c["dag"] for c in spec_doc["components"].values() if "dag" in c]
    return {name: task for dag in dags for name, task in dag["tasks"].items()
            if "dag" not in spec_doc["components"][task["componentRef"]["name"]]}


def _load(name: str) -> tuple[dict, dict]:
    docs = list(yaml.safe_load_all((COMPILED_DIR / f"{name}.yaml").read_text()))
    assert len(docs) == 2, f"{name}.yaml should hold the pipeline spec and the platform spec"
    return docs[0], docs[1]


def test_compiled_yaml_is_current(tmp_path):
    written = compile_all(tmp_path)
    assert {p.name for p in written} == {f"{n}.yaml" for n in PIPELINES}
    assert {p.name for p in COMPILED_DIR.glob("*.yaml")} == {p.name for p in written}
    for fresh in written:
        checked_in = (COMPILED_DIR / fresh.name).read_text()
        assert checked_in == fresh.read_text(), (
            f"pipelines/compiled/{fresh.name} is stale: run `lookalike pipeline compile` and commit it")


@pytest.mark.parametrize("name", list(PIPELINES))
def test_compiled_yaml_parses_strictly(name):
    spec_doc, platform_doc = _load(name)
    spec = json_format.ParseDict(spec_doc, pipeline_spec_pb2.PipelineSpec(), ignore_unknown_fields=False)
    assert spec.pipeline_info.name == f"lookalike-{name}"
    platform = json_format.ParseDict(platform_doc, pipeline_spec_pb2.PlatformSpec(), ignore_unknown_fields=False)
    executors = platform_doc["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(executors) <= set(spec.deployment_spec["executors"].keys())
    for config in executors.values():
        json_format.ParseDict(config, kubernetes_executor_config_pb2.KubernetesExecutorConfig(),
                              ignore_unknown_fields=False)
    assert "kubernetes" in platform.platforms
    # Every parameter is documented (the KFP UI and `lookalike pipeline run NAME --help` show it).
    for key, param in spec_doc["root"]["inputDefinitions"]["parameters"].items():
        assert param.get("description"), f"{name}: parameter {key} has no description"


@pytest.mark.parametrize("name", list(PIPELINES))
def test_gpu_settings_on_gpu_tasks_only(name):
    spec_doc, platform_doc = _load(name)
    executors = spec_doc["deploymentSpec"]["executors"]
    k8s = platform_doc["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    seen_gpu = set()
    for label, executor in executors.items():
        container, base = executor["container"], _base(label)
        accelerator = container.get("resources", {}).get("accelerator")
        config = k8s.get(label, {})
        if base in GPU_COMPONENTS:
            seen_gpu.add(base)
            assert accelerator and accelerator["resourceType"] == GPU_RESOURCE and accelerator["resourceCount"] == "1"
            assert container["image"] == GPU_IMAGE
            # Inside a loop (the embedding fan-out) a pipeline parameter reaches a task as a pipeline channel.
            selector = config["nodeSelector"]["nodeSelectorJson"]["componentInputParameter"]
            toleration = config["tolerations"][0]["tolerationJson"]["componentInputParameter"]
            assert selector.removeprefix("pipelinechannel--") == "gpu_node_selector"
            assert toleration.removeprefix("pipelinechannel--") == "gpu_toleration"
        else:
            assert accelerator is None, f"{label} is a CPU task but requests an accelerator"
            assert container["image"] == CPU_IMAGE
            assert "nodeSelector" not in config and "tolerations" not in config
        # Nothing is installed at task start: the image carries the project.
        command = " ".join(container["command"] + container.get("args", []))
        assert "pip install" not in command and "from lookalike.pipelines.steps import" in command
        # S3 keys from the Secret (named by a parameter), settings from the ConfigMap: never literals.
        if base not in NO_STORE:
            secret = config["secretAsEnv"][0]
            named_by = secret["secretNameParameter"]["componentInputParameter"]
            assert named_by.removeprefix("pipelinechannel--") == "s3_secret"
            assert {m["envVar"] for m in secret["keyToEnv"]} == set(S3_SECRET_KEYS.values())
            assert "LOOKALIKE_S3_SECRET_KEY" not in json.dumps(container.get("env", []))
    expected = {"train": {"train-model"}, "index": {"embed-catalog", "build-index"},
                "update": {"embed-catalog"}, "train-and-index": GPU_COMPONENTS}[name]
    assert seen_gpu == expected


@pytest.mark.parametrize("name", list(PIPELINES))
def test_caching_and_retries(name):
    spec_doc, _ = _load(name)
    tasks = _tasks(spec_doc)
    for task_name, task in tasks.items():
        base = _base(task_name)
        cached = task.get("cachingOptions", {}).get("enableCache", False)
        assert cached == (base not in UNCACHED), f"{task_name}: caching should be {'off' if cached else 'on'}"
        if base in NO_RETRY:
            assert "retryPolicy" not in task, f"{task_name} must not retry: its verdict would not change"
        if base.startswith("publish") or base in ("prepare-catalog", "train-model"):
            assert task["retryPolicy"]["maxRetryCount"] >= 1
    # Publishing is last: every publish task runs after the gates.
    for task_name, task in tasks.items():
        if _base(task_name) == "publish-model" or (_base(task_name) == "publish-index" and name != "train-and-index"):
            assert any("gates" in dep for dep in task["dependentTasks"]), task_name


def test_cli_parses_params_by_type():
    from lookalike.cli.commands.pipeline import describe_parameters, parse_params
    from lookalike.core.errors import InputError, is_user_error

    params = parse_params("train-and-index", ["min_recall_at_10=0.5", "seed=3", "check_images=false",
                                              "warmup_steps=4", 'task_weights={"color": 2}',
                                              "catalog_uri=fashion-mnist-test"])
    assert params == {"min_recall_at_10": 0.5, "seed": 3, "check_images": False, "warmup_steps": 4,
                      "task_weights": {"color": 2}, "catalog_uri": "fashion-mnist-test"}
    with pytest.raises(InputError, match="no parameter 'epoch'") as bad:
        parse_params("train", ["epoch=1"])
    assert is_user_error(bad.value)
    with pytest.raises(InputError, match="expected a integer"):
        parse_params("train", ["seed=three"])
    assert "min_recall_at_10 (Float, default 0.2)" in describe_parameters("train")


def test_local_run_refuses_unknown_pipelines_and_parameters_as_input_errors(tmp_path):
    from lookalike.core.errors import InputError

    with pytest.raises(InputError, match="unknown pipeline 'retrain'"):
        run_local("retrain", root=tmp_path)
    with pytest.raises(InputError, match="no parameter epoch"):
        run_local("train", {"epoch": 3}, root=tmp_path)
    with pytest.raises(InputError, match="needs new_listings_uri"):
        run_local("update", {}, root=tmp_path)
    assert issubclass(PipelineFailed, LookalikeError)


def test_train_and_index_takes_the_parameters_of_train_and_index():
    inputs = {name: PIPELINES[name].component_spec.inputs for name in PIPELINES}
    both = set(inputs["train"]) | (set(inputs["index"]) - {"model_ref"})  # it indexes the model it trains
    assert set(inputs["train-and-index"]) == both
    for key in inputs["train-and-index"]:
        source = inputs["train"].get(key) or inputs["index"][key]
        assert (inputs["train-and-index"][key].type, inputs["train-and-index"][key].default) == \
            (source.type, source.default), key


def test_a_user_error_is_one_marked_line_and_a_bug_gets_its_traceback(capsys):
    from lookalike.pipelines.steps import STEP_FAILED, GateFailed, StepError, run_step
    from lookalike.core.errors import is_user_error

    assert is_user_error(GateFailed("no")) and is_user_error(StepError("no"))

    def refuse():
        raise StepError("holdout_fraction must be in [0, 1)")

    def bug():
        raise ValueError("an index went out of range")

    with pytest.raises(SystemExit):
        run_step("prepare catalog", refuse)
    captured = capsys.readouterr()
    assert f"{STEP_FAILED} prepare catalog: holdout_fraction must be in [0, 1)" in captured.out
    assert "Traceback" not in captured.out + captured.err
    with pytest.raises(SystemExit):
        run_step("train", bug)
    captured = capsys.readouterr()
    assert f"{STEP_FAILED} train: an index went out of range" in captured.out
    assert "Traceback" in captured.err and "ValueError" in captured.err


def test_submit_to_unreachable_endpoint_says_what_to_check():
    from lookalike.pipelines.submit import SubmitError, kfp_cron, submit

    assert kfp_cron("0 3 * * *") == "0 0 3 * * *"
    with pytest.raises(SubmitError, match="not a cron expression"):
        kfp_cron("daily")
    with pytest.raises(SubmitError, match="cannot reach the Kubeflow Pipelines API"):
        submit("train", "http://127.0.0.1:9", {})


# ---- steps, as plain functions against a real S3 server ------------------------------------------

class _Artifact:
    """What KFP hands a step: a path, a metadata dict, and log_metric."""

    def __init__(self, path):
        self.path, self.metadata = str(path), {}

    def log_metric(self, key, value):
        self.metadata[key] = value


def _model_folder(folder: Path, version: str):
    """A model folder as the train step leaves it (the weights do not matter to publishing)."""
    from lookalike.core.model_card import ONNX_FILE, WEIGHTS_FILE, ModelCard
    from lookalike.core.preprocessing import PreprocessSpec

    card = ModelCard(model_version=version, architecture="tf_efficientnet_lite0", embedding_dim=4,
                     preprocessing=PreprocessSpec(size=32, resize=32, crop="none"), heads={"category": ["a", "b"]},
                     metrics={"train": {"steps": 1}})
    card.write(folder)
    (folder / WEIGHTS_FILE).write_bytes(b"weights")
    (folder / ONNX_FILE).write_bytes(b"graph")
    return card


def test_prepare_takes_a_catalog_by_name(store, tmp_path):
    from lookalike.pipelines.steps.prepare import prepare_catalog
    from lookalike.catalogs.importers import import_fashion_mnist

    import_fashion_mnist(store, split_names=("test",), limit=20, progress=False)
    parts = {part: _Artifact(tmp_path / f"{part}.jsonl") for part in ("catalog", "train_set", "eval_set")}
    summary = prepare_catalog("fashion-mnist-test", 0.2, 0, False, **parts)
    assert summary["catalog"] == store.uri("catalogs/fashion-mnist-test/catalog.jsonl")
    assert summary["rows"] == 20 == summary["train_rows"] + summary["eval_rows"]
    assert parts["catalog"].metadata["source"] == summary["catalog"]


def test_publish_steps_say_whose_alias_moved_and_never_edit_their_input(store, tmp_path, capsys):
    import numpy as np

    from lookalike.pipelines.steps.index import publish_index
    from lookalike.pipelines.steps.model import publish_model
    from lookalike.predictor.index import VectorIndex
    from lookalike.core.artifacts import new_version
    from lookalike.core.model_card import CARD_FILE, ModelCard

    version = new_version()
    _model_folder(tmp_path / "model", version)
    before = (tmp_path / "model" / CARD_FILE).read_bytes()
    (tmp_path / "evaluation.json").write_text(json.dumps({"phone_recall@10": 0.5}))
    assert publish_model(_Artifact(tmp_path / "model"), "candidate",
                         evaluation=_Artifact(tmp_path / "evaluation.json")) == version
    assert (tmp_path / "model" / CARD_FILE).read_bytes() == before  # the input artifact is untouched
    published = ModelCard.read(model_repo(store).fetch("candidate"))
    assert published.model_version == version
    assert published.metrics == {"train": {"steps": 1}, "evaluation": {"phone_recall@10": 0.5}}
    assert f"model alias candidate → {version}" in capsys.readouterr().out

    vectors = np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    VectorIndex.build(vectors, [f"l{i}" for i in range(20)], model_version=version).save(tmp_path / "index")
    index_version = publish_index(_Artifact(tmp_path / "index"), "candidate")
    said = capsys.readouterr().out
    assert f"index alias candidate of model {version} → {index_version}" in said and "production" not in said


# ---- local runs: bad input fails at the right step, nothing published ----------------------------

def _no_models(store) -> bool:
    return model_repo(store).versions() == [] and not store.list("models/")


def test_missing_catalog_fails_at_prepare(store, tmp_path):
    with pytest.raises(PipelineFailed) as failed:
        run_local("train", {"catalog_uri": store.uri("catalogs/nope/catalog.jsonl")}, root=tmp_path)
    assert failed.value.step == "prepare-catalog"
    assert "does not exist" in str(failed.value) and "Nothing was published" in str(failed.value)
    assert _no_models(store)


def test_invalid_catalog_lists_bad_rows(store, tmp_path):
    rows = [{"listing_id": "a", "image": store.uri("catalogs/bad/images/a.png"), "labels": {"category": "x"}},
            {"listing_id": "b", "labels": {"category": "y"}},
            "not json"]
    body = "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n"
    store.put_bytes("catalogs/bad/catalog.jsonl", body.encode())
    with pytest.raises(PipelineFailed) as failed:
        run_local("index", {"catalog_uri": store.uri("catalogs/bad/catalog.jsonl"), "model_ref": "latest"},
                  root=tmp_path)
    message = str(failed.value)
    assert failed.value.step in ("prepare-catalog", "fetch-model")
    if failed.value.step == "prepare-catalog":
        assert "line 2" in message and "line 3" in message
    else:  # no model published yet: the other first step says so
        assert "Run the train pipeline first" in message
    assert _no_models(store)


def test_unreachable_store_fails_at_first_step(s3_server, monkeypatch, tmp_path):
    from lookalike.core.store_server import free_port

    monkeypatch.setenv("LOOKALIKE_S3_ENDPOINT", f"127.0.0.1:{free_port()}")
    with pytest.raises(PipelineFailed) as failed:
        run_local("train", {"catalog_uri": "s3://lookalike/catalogs/x/catalog.jsonl"}, root=tmp_path)
    assert failed.value.step == "prepare-catalog"
    assert "does not answer" in str(failed.value) and "lookalike store up" in str(failed.value)


def test_cuda_on_a_machine_without_gpu_fails_at_train(store, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from lookalike.catalogs.importers import import_fashion_mnist

    uri = import_fashion_mnist(store, split_names=("test",), limit=40, progress=False)["test"]
    with pytest.raises(PipelineFailed) as failed:
        run_local("train", {"catalog_uri": uri, "device": "cuda", "holdout_fraction": 0.2}, root=tmp_path)
    assert failed.value.step == "train-model"
    assert "no CUDA GPU" in str(failed.value) and "device=auto" in str(failed.value)
    assert _no_models(store)


def test_cli_run_reports_the_failed_step_in_one_line(store, tmp_path):
    import subprocess
    import sys

    env = dict(os.environ, LOOKALIKE_HOME=str(tmp_path))
    lookalike = str(Path(sys.executable).parent / "lookalike")  # the installed entry point
    done = subprocess.run([lookalike, "pipeline", "run", "train", "--local",
                           "--param", f"catalog_uri={store.uri('catalogs/missing/catalog.jsonl')}"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1
    assert "error: pipeline train failed at step prepare-catalog:" in done.stderr
    assert "does not exist" in done.stderr and "Traceback" not in done.stderr + done.stdout
    assert "[1/5] prepare-catalog" in done.stdout  # progress, one line per step
