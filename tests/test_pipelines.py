"""The Kubeflow pipelines: compiled YAML current and valid, cluster settings where they belong, and local
runs (real kfp.local, real S3 server) that fail at the right step with a clear message."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from google.protobuf import json_format
from kfp.kubernetes import kubernetes_executor_config_pb2
from kfp.pipeline_spec import pipeline_spec_pb2

from pipelines.cluster import CPU_IMAGE, GPU_IMAGE, GPU_RESOURCE, S3_SECRET_KEYS
from pipelines.compile import COMPILED_DIR, compile_all
from pipelines.definitions import PIPELINES
from pipelines.local import PipelineFailed, run_local
from storage.artifacts import model_repo

GPU_COMPONENTS = {"train-model", "embed-catalog", "build-index"}
UNCACHED = {"prepare-catalog", "check-model-gates", "publish-model", "publish-index", "fetch-model", "update-index"}
NO_RETRY = {"check-model-gates", "check-index-gates", "evaluate-model", "evaluate-index"}


def _base(name: str) -> str:
    """comp-embed-catalog-2 / exec-embed-catalog-2 / embed-catalog-2 → embed-catalog."""
    for prefix in ("comp-", "exec-"):
        name = name.removeprefix(prefix)
    head, _, tail = name.rpartition("-")
    return head if tail.isdigit() else name


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
            assert config["nodeSelector"]["nodeSelectorJson"]["componentInputParameter"] == "gpu_node_selector"
            assert config["tolerations"][0]["tolerationJson"]["componentInputParameter"] == "gpu_toleration"
        else:
            assert accelerator is None, f"{label} is a CPU task but requests an accelerator"
            assert container["image"] == CPU_IMAGE
            assert "nodeSelector" not in config and "tolerations" not in config
        # Nothing is installed at task start: the image carries the project.
        command = " ".join(container["command"] + container.get("args", []))
        assert "pip install" not in command and "from pipelines import steps as work" in command
        # S3 keys from the Secret (named by a parameter), settings from the ConfigMap: never literals.
        if base != "check-index-gates":
            secret = config["secretAsEnv"][0]
            assert secret["secretNameParameter"] == {"componentInputParameter": "s3_secret"}
            assert {m["envVar"] for m in secret["keyToEnv"]} == set(S3_SECRET_KEYS.values())
            assert "LOOKALIKE_S3_SECRET_KEY" not in json.dumps(container.get("env", []))
    expected = {"train": {"train-model"}, "index": {"embed-catalog", "build-index"},
                "update": {"embed-catalog"}, "train-and-index": GPU_COMPONENTS}[name]
    assert seen_gpu == expected


@pytest.mark.parametrize("name", list(PIPELINES))
def test_caching_and_retries(name):
    spec_doc, _ = _load(name)
    tasks = spec_doc["root"]["dag"]["tasks"]
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
    from pipelines.commands.pipeline import describe_parameters, parse_params

    params = parse_params("train-and-index", ["min_recall_at_10=0.5", "seed=3", "check_images=false",
                                              'train_options={"max_steps": 4}', "catalog_uri=s3://b/c.jsonl"])
    assert params == {"min_recall_at_10": 0.5, "seed": 3, "check_images": False, "train_options": {"max_steps": 4},
                      "catalog_uri": "s3://b/c.jsonl"}
    with pytest.raises(ValueError, match="no parameter 'epoch'"):
        parse_params("train", ["epoch=1"])
    with pytest.raises(ValueError, match="expected a integer"):
        parse_params("train", ["seed=three"])
    assert "min_recall_at_10 (Float, default 0.2)" in describe_parameters("train")


def test_submit_to_unreachable_endpoint_says_what_to_check():
    from pipelines.submit import SubmitError, kfp_cron, submit

    assert kfp_cron("0 3 * * *") == "0 0 3 * * *"
    with pytest.raises(SubmitError, match="not a cron expression"):
        kfp_cron("daily")
    with pytest.raises(SubmitError, match="cannot reach the Kubeflow Pipelines API"):
        submit("train", "http://127.0.0.1:9", {})


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
    from storage.server import free_port

    monkeypatch.setenv("LOOKALIKE_S3_ENDPOINT", f"127.0.0.1:{free_port()}")
    with pytest.raises(PipelineFailed) as failed:
        run_local("train", {"catalog_uri": "s3://lookalike/catalogs/x/catalog.jsonl"}, root=tmp_path)
    assert failed.value.step == "prepare-catalog"
    assert "does not answer" in str(failed.value) and "lookalike store up" in str(failed.value)


def test_cuda_on_a_machine_without_gpu_fails_at_train(store, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from training.importers import import_fashion_mnist

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
