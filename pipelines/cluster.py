"""Where each pipeline task runs on Kubernetes: images, GPU node pool, S3 settings, caching, retries.

Kept apart from the pipeline definitions so the data flow reads on its own. Everything here is
kfp-kubernetes platform config, which `kfp.local` ignores: locally every task runs in this Python with
this environment (the S3 settings are inherited from it).

- Images are the project's own, built with everything installed (`pip install .[pipelines]`), so no
  task installs a package at start. GPU tasks use the CUDA image (CUDA torch, faiss-gpu).
- GPU tasks (train, embed, build) request one `nvidia.com/gpu` and carry the node selector and
  toleration of the GPU node pool, both given as pipeline parameters; CPU tasks carry neither.
- S3: the endpoint, bucket and region come from the `lookalike-settings` ConfigMap, the keys from the
  `lookalike-s3` Secret (the same objects the InferenceService reads; see manifests/base/).
- Caching is on for pure steps (the output is a function of the inputs) and off for steps that read
  something mutable (a catalog URI, an alias) or write to the store.
- Retries only on steps whose failure can be transient (store I/O, GPU scheduling); a gate never
  retries: its verdict would not change.
"""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from kfp import kubernetes
from kfp.dsl import PipelineTask

try:  # images are tagged with the package version they were built from
    IMAGE_TAG = version("lookalike")
except PackageNotFoundError:  # running from a source tree that is not installed
    IMAGE_TAG = "dev"
CPU_IMAGE = f"lookalike/pipelines:{IMAGE_TAG}"
GPU_IMAGE = f"lookalike/pipelines-gpu:{IMAGE_TAG}"
GPU_RESOURCE = "nvidia.com/gpu"

# The Secret and ConfigMap of manifests/base: keys on the left, environment variables on the right.
S3_SECRET = "lookalike-s3"
S3_SECRET_KEYS = {"AWS_ACCESS_KEY_ID": "LOOKALIKE_S3_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY": "LOOKALIKE_S3_SECRET_KEY"}
SETTINGS_CONFIG_MAP = "lookalike-settings"
SETTINGS_KEYS = ("LOOKALIKE_S3_ENDPOINT", "LOOKALIKE_S3_SECURE", "LOOKALIKE_S3_BUCKET", "LOOKALIKE_S3_REGION")

# Defaults of the GPU pool parameters: the labels and taint of NVIDIA's GPU operator / common node pools.
DEFAULT_GPU_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}
DEFAULT_GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def uses_store(task: PipelineTask, s3_secret: str | object = S3_SECRET) -> PipelineTask:
    """The task reads or writes S3: settings from the ConfigMap, keys from the Secret, as env vars."""
    kubernetes.use_config_map_as_env(task, SETTINGS_CONFIG_MAP, {k: k for k in SETTINGS_KEYS})
    kubernetes.use_secret_as_env(task, s3_secret, dict(S3_SECRET_KEYS))
    return task


def on_gpu(task: PipelineTask, node_selector, toleration, *, memory: str = "16G") -> PipelineTask:
    """Run on the GPU node pool: one GPU, the pool's node selector and toleration, the CUDA image."""
    task.set_container_image(GPU_IMAGE)
    task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(1)
    task.set_cpu_request("4").set_memory_request(memory)
    kubernetes.add_node_selector_json(task, node_selector)
    kubernetes.add_toleration_json(task, toleration)
    return task


def on_cpu(task: PipelineTask, *, cpu: str = "1", memory: str = "4G") -> PipelineTask:
    """Run anywhere: the CPU image, no accelerator, no GPU pool settings."""
    task.set_container_image(CPU_IMAGE)
    task.set_cpu_request(cpu).set_memory_request(memory)
    return task


def pure(task: PipelineTask) -> PipelineTask:
    """Cache it: the output depends on the inputs only."""
    return task.set_caching_options(True)


def impure(task: PipelineTask) -> PipelineTask:
    """Never cache it: it reads something that can change under the same name, or writes to the store."""
    return task.set_caching_options(False)


def transient(task: PipelineTask, retries: int = 2) -> PipelineTask:
    """Retry with backoff: failures of store I/O or of a preempted node are worth another try."""
    return task.set_retry(num_retries=retries, backoff_duration="30s", backoff_factor=2.0,
                          backoff_max_duration="600s")
