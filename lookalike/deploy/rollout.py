"""Canary rollouts of a model version (with its index version) on the InferenceService.

The state of a rollout lives in one file per overlay, `manifests/overlays/<overlay>/rollout.yaml`, a
Kustomize patch on the InferenceService holding

* `lookalike.io/model-version` / `lookalike.io/index-version`: what the predictor serves (the overlay's
  `replacements` copy them into the predictor's STORAGE_URI and LOOKALIKE_*_VERSION variables);
* `lookalike.io/previous-model-version` / `...previous-index-version`: the version the last `canary` or
  `set` replaced, which `rollback` returns to;
* `spec.predictor.canaryTrafficPercent`: while a canary runs, the share of traffic KServe sends to the
  newest predictor revision; the rest goes to the last revision that had 100%.

Every transition is written to that file and the overlay is rendered and validated before the file is
kept (a change that does not validate leaves the old file in place). With `apply`, the same change is
sent to the live InferenceService as a JSON merge patch through the `kubernetes` client; the patch
carries the predictor's whole rendered container list, because a merge patch replaces lists whole.

Transitions (P is a percent):

    set V        stable on V, no split             (first deploy, or a deliberate switch)
    canary V P   V gets P% of traffic, the stable version keeps the rest; again with another P to step
    promote      the canary takes all traffic (canaryTrafficPercent removed)
    rollback     during a canary: back to the previous version with 0% to the newest revision, so
                 traffic returns at once to the last revision that had 100%;
                 after a promote or set: back to the previous version as a normal roll-forward
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from lookalike.deploy.manifest_check import (ANNOTATION_INDEX, ANNOTATION_MODEL, KSERVE_CONTAINER, ManifestError,
                                              Report, find_object, overlay_path, validate_overlay)
from lookalike.core.artifacts import VERSION_NAME_RE
from lookalike.core.errors import InputError

ANNOTATION_PREVIOUS_MODEL = "lookalike.io/previous-model-version"
ANNOTATION_PREVIOUS_INDEX = "lookalike.io/previous-index-version"
ANNOTATION_ROLLED_BACK_FROM = "lookalike.io/rolled-back-from"
ROLLOUT_ANNOTATIONS = (ANNOTATION_MODEL, ANNOTATION_INDEX, ANNOTATION_PREVIOUS_MODEL, ANNOTATION_PREVIOUS_INDEX,
                       ANNOTATION_ROLLED_BACK_FROM)
ROLLOUT_FILE = "rollout.yaml"
ISVC_NAME = "lookalike"
GROUP, VERSION, PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"
LATEST_INDEX = "latest"

HEADER = """\
# Which model and index the predictor serves, and the canary split. Written by `lookalike rollout`
# (set, canary, promote, rollback); commit it for GitOps, or add --apply to patch the live service.
# The overlay's replacements copy these annotations into the predictor's STORAGE_URI and variables.
"""


class RolloutError(InputError):
    """A rollout step that cannot be taken from the current state: the message says why and what to do."""


@dataclass(frozen=True)
class RolloutState:
    model_version: str
    index_version: str = LATEST_INDEX
    canary_percent: int | None = None
    previous_model_version: str | None = None
    previous_index_version: str | None = None
    rolled_back_from: str | None = None

    @property
    def phase(self) -> str:
        if self.canary_percent is None:
            return "stable"
        return "rolled-back" if self.rolled_back_from and self.canary_percent == 0 else "canary"

    def annotations(self) -> dict[str, str | None]:
        """Every rollout annotation, None for the ones this state does not carry."""
        return {
            ANNOTATION_MODEL: self.model_version,
            ANNOTATION_INDEX: self.index_version,
            ANNOTATION_PREVIOUS_MODEL: self.previous_model_version,
            ANNOTATION_PREVIOUS_INDEX: self.previous_index_version if self.previous_model_version else None,
            ANNOTATION_ROLLED_BACK_FROM: self.rolled_back_from,
        }

    def describe(self) -> str:
        if self.model_version == "unset":
            return "no model chosen yet: deploy one with `lookalike rollout set --model-version V`"
        serving = f"model {self.model_version} index {self.index_version}"
        if self.phase == "canary":
            return (f"canary: {serving} takes {self.canary_percent}% of traffic; the last fully rolled-out "
                    f"revision (model {self.previous_model_version}) takes {100 - self.canary_percent}%")
        if self.phase == "rolled-back":
            return (f"rolled back from {self.rolled_back_from}: all traffic on the last fully rolled-out revision "
                    f"(model {self.model_version}); the spec names {serving}")
        return f"stable: {serving} takes all traffic"

    @classmethod
    def from_isvc(cls, isvc: dict[str, Any]) -> RolloutState:
        annotations = (isvc.get("metadata") or {}).get("annotations") or {}
        if ANNOTATION_MODEL not in annotations:
            raise ManifestError(f"the InferenceService carries no {ANNOTATION_MODEL} annotation: add it to "
                                f"{ROLLOUT_FILE} (see manifests/overlays/dev/{ROLLOUT_FILE})")
        pct = ((isvc.get("spec") or {}).get("predictor") or {}).get("canaryTrafficPercent")
        return cls(model_version=str(annotations[ANNOTATION_MODEL]),
                   index_version=str(annotations.get(ANNOTATION_INDEX, LATEST_INDEX)),
                   canary_percent=pct,
                   previous_model_version=annotations.get(ANNOTATION_PREVIOUS_MODEL),
                   previous_index_version=annotations.get(ANNOTATION_PREVIOUS_INDEX),
                   rolled_back_from=annotations.get(ANNOTATION_ROLLED_BACK_FROM))


# ----------------------------------------------------------------------------------------- transitions

def _check_version(value: str, what: str) -> str:
    if not VERSION_NAME_RE.match(value or ""):
        raise RolloutError(f"{what} {value!r} is not a version name (letters, digits, '.', '_', '-'; "
                           f"`lookalike store ls` lists the published ones)")
    return value


def _check_percent(percent: int) -> int:
    if not isinstance(percent, int) or not 0 <= percent <= 100:
        raise RolloutError(f"--percent {percent!r} must be an integer from 0 to 100")
    return percent


def pin_index(model_version: str, index_version: str | None) -> str:
    """The index version a rollout pins beside `model_version`: the one named, or when none is (or
    `latest`), the one that model's `production` index alias names in the store now (its newest complete
    index when it has no alias). Pods of one revision then all serve that index, and a rollback brings back
    the exact index the old model served. RolloutError when the store cannot say."""
    if index_version and index_version != LATEST_INDEX:
        return _check_version(index_version, "index version")
    from lookalike.core.artifacts import index_repo
    from lookalike.core.errors import LookalikeError
    from lookalike.core.s3 import connect

    try:
        repo = index_repo(connect(), model_version)
        return repo.alias_target("production") or repo.resolve(LATEST_INDEX)
    except LookalikeError as exc:
        raise RolloutError(f"cannot pin the index of model {model_version}: {exc}; name it with --index-version "
                           f"VERSION (`lookalike store ls`)") from None


def set_version(state: RolloutState, model_version: str, index_version: str = LATEST_INDEX) -> RolloutState:
    """Serve `model_version` on all traffic at once; the version it replaces is kept for rollback."""
    _check_version(model_version, "model version")
    _check_version(index_version, "index version")
    if state.phase == "canary":
        raise RolloutError(f"a canary of model {state.model_version} is running ({state.canary_percent}%): "
                           f"`lookalike rollout promote` or `rollback` it first")
    if state.model_version in ("unset", model_version):  # first deploy, or clearing a rollback's 0%
        return RolloutState(model_version, index_version, None, state.previous_model_version,
                            state.previous_index_version)
    return RolloutState(model_version, index_version, None, state.model_version, state.index_version)


def canary(state: RolloutState, model_version: str, percent: int,
           index_version: str = LATEST_INDEX) -> RolloutState:
    """Send `percent`% of traffic to `model_version`; again with the same version to move the split."""
    _check_version(model_version, "model version")
    _check_version(index_version, "index version")
    _check_percent(percent)
    if state.model_version == "unset":
        raise RolloutError("nothing serves yet, so there is nothing to split traffic with: deploy the first "
                           "version with `lookalike rollout set --model-version V`")
    if state.phase == "canary":
        if (model_version, index_version) != (state.model_version, state.index_version):
            raise RolloutError(f"a canary of model {state.model_version} index {state.index_version} is running: "
                               f"promote or roll it back before starting another")
        return replace(state, canary_percent=percent)
    if (model_version, index_version) == (state.model_version, state.index_version):
        raise RolloutError(f"model {model_version} index {index_version} already serves all traffic")
    return RolloutState(model_version, index_version, percent, state.model_version, state.index_version)


def promote(state: RolloutState) -> RolloutState:
    """The canary becomes the stable version: all traffic, no split. The replaced version stays recorded."""
    if state.phase != "canary":
        raise RolloutError(f"no canary to promote ({state.describe()})")
    return replace(state, canary_percent=None)


def rollback(state: RolloutState) -> RolloutState:
    """Return to the previous version (see the module docstring for how traffic moves)."""
    if not state.previous_model_version:
        raise RolloutError(f"no previous version is recorded to roll back to ({state.describe()})")
    # During a canary the last revision that had 100% is the previous version: 0% to the newest revision
    # moves every request back to it at once. After a promote the previous version has no such revision
    # any more, so it is rolled out again like any new spec.
    percent = 0 if state.phase == "canary" else None
    return RolloutState(state.previous_model_version, state.previous_index_version or LATEST_INDEX, percent,
                        None, None, rolled_back_from=state.model_version)


# ----------------------------------------------------------------------------------------- manifests

def rollout_file(overlay: str | Path, root: Path | None = None) -> Path:
    return overlay_path(overlay, root) / ROLLOUT_FILE


def patch_document(state: RolloutState) -> dict[str, Any]:
    """The Kustomize strategic-merge patch that `rollout.yaml` holds for this state."""
    doc: dict[str, Any] = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "InferenceService",
        "metadata": {"name": ISVC_NAME,
                     "annotations": {k: v for k, v in state.annotations().items() if v is not None}},
    }
    if state.canary_percent is not None:
        doc["spec"] = {"predictor": {"canaryTrafficPercent": state.canary_percent}}
    return doc


def read_state(overlay: str | Path, root: Path | None = None) -> RolloutState:
    path = rollout_file(overlay, root)
    if not path.is_file():
        raise ManifestError(f"{path} is missing: rollouts need an overlay that deploys the InferenceService and "
                            f"patches it with a {ROLLOUT_FILE} (as manifests/overlays/dev does)")
    return RolloutState.from_isvc(yaml.safe_load(path.read_text()) or {})


def write_state(overlay: str | Path, state: RolloutState, root: Path | None = None) -> Report:
    """Write `state` into the overlay, render and validate it; on any error keep the old file and raise."""
    path = rollout_file(overlay, root)
    old = path.read_text() if path.is_file() else None
    path.write_text(HEADER + yaml.safe_dump(patch_document(state), sort_keys=False))
    try:
        report = validate_overlay(overlay, root)
    except Exception:
        _restore(path, old)
        raise
    if not report.ok:
        _restore(path, old)
        raise ManifestError(f"the change does not validate, {path} left as it was:\n" + "\n".join(report.lines()))
    rendered = RolloutState.from_isvc(find_object(report.objects, "InferenceService", ISVC_NAME))
    if rendered != state:
        _restore(path, old)
        raise ManifestError(f"the overlay renders {rendered} instead of {state}: another patch of the overlay "
                            f"overrides {ROLLOUT_FILE}; {path} left as it was")
    return report


def _restore(path: Path, old: str | None) -> None:
    if old is None:
        path.unlink(missing_ok=True)
    else:
        path.write_text(old)


def merge_patch(isvc: dict[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that makes a live InferenceService match the rendered one.

    Only what a rollout changes: the rollout annotations (null deletes one), canaryTrafficPercent (null
    removes the split) and the predictor's containers, sent whole because a merge patch replaces lists.
    """
    state = RolloutState.from_isvc(isvc)
    predictor = isvc["spec"]["predictor"]
    if not any(c.get("name") == KSERVE_CONTAINER for c in predictor.get("containers") or []):
        raise ManifestError(f"the rendered predictor has no {KSERVE_CONTAINER!r} container")
    return {
        "metadata": {"annotations": state.annotations()},
        "spec": {"predictor": {"canaryTrafficPercent": state.canary_percent,
                               "containers": predictor["containers"]}},
    }


# ----------------------------------------------------------------------------------------- the cluster

def custom_objects_api(kubeconfig: str | None = None, context: str | None = None):
    """A CustomObjectsApi from a kubeconfig (or the in-cluster service account when there is none)."""
    import logging

    from kubernetes import client, config

    # Its retries of a refused connection would print one warning each; the final error says it all.
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
    try:
        if kubeconfig or context or not _in_cluster():
            api_client = config.new_client_from_config(config_file=kubeconfig, context=context)
        else:
            config.load_incluster_config()
            api_client = client.ApiClient()
    except (config.ConfigException, FileNotFoundError) as exc:
        raise RolloutError(f"no cluster to talk to: {exc}. Point --kubeconfig or KUBECONFIG at your cluster's "
                           f"kubeconfig") from None
    return client.CustomObjectsApi(api_client)


def _in_cluster() -> bool:
    import os

    return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


def apply_patch(isvc: dict[str, Any], api=None, **api_kwargs: Any) -> dict[str, Any]:
    """PATCH the live InferenceService named in `isvc` (its name and namespace) with `merge_patch(isvc)`."""
    from kubernetes.client.exceptions import ApiException

    meta = isvc["metadata"]
    api = api or custom_objects_api(**api_kwargs)
    try:
        return api.patch_namespaced_custom_object(GROUP, VERSION, meta.get("namespace", "default"), PLURAL,
                                                  meta["name"], merge_patch(isvc))
    except ApiException as exc:
        where = f"patch InferenceService {meta.get('namespace')}/{meta['name']}"
        raise RolloutError(_api_message(exc, where)) from None
    except _unreachable() as exc:
        raise RolloutError(f"cannot reach the cluster to patch {meta['name']}: {_reason(exc)}") from None


def live_status(name: str, namespace: str, api=None, **api_kwargs: Any) -> dict[str, Any]:
    """What the cluster reports: rollout annotations, readiness, URL and the predictor's traffic split."""
    from kubernetes.client.exceptions import ApiException

    api = api or custom_objects_api(**api_kwargs)
    try:
        obj = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except ApiException as exc:
        raise RolloutError(_api_message(exc, f"read InferenceService {namespace}/{name}")) from None
    except _unreachable() as exc:
        raise RolloutError(f"cannot reach the cluster to read {name}: {_reason(exc)}") from None
    status = obj.get("status") or {}
    predictor = (status.get("components") or {}).get("predictor") or {}
    ready = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {})
    return {
        "state": (RolloutState.from_isvc(obj) if ANNOTATION_MODEL in (obj["metadata"].get("annotations") or {})
                  else None),
        "ready": ready.get("status"),
        "reason": ready.get("message") or ready.get("reason"),
        "url": status.get("url"),
        "traffic": predictor.get("traffic") or [],
        "latest_ready_revision": predictor.get("latestReadyRevision"),
        "latest_created_revision": predictor.get("latestCreatedRevision"),
    }


def _unreachable() -> tuple[type[BaseException], ...]:
    """Transport failures: refused or timed-out connections surface as urllib3 errors, not OSError."""
    import urllib3

    return (OSError, urllib3.exceptions.HTTPError)


def _reason(exc: BaseException) -> str:
    return str(getattr(exc, "reason", None) or exc)


def _api_message(exc: Any, doing: str) -> str:
    import json

    try:
        detail = json.loads(exc.body).get("message")
    except (TypeError, ValueError, AttributeError):
        detail = None
    hint = {401: "the credentials were refused", 403: "your account may not do this (RBAC)",
            404: "it does not exist: deploy the overlay first with `kubectl apply -k`"}.get(exc.status, "")
    return f"cannot {doing}: HTTP {exc.status} {detail or exc.reason}{'; ' + hint if hint else ''}"
