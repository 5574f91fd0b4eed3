"""Custom resources checked against their CRDs' own `openAPIV3Schema`, made strict the way `kubectl apply`
(server-side field validation) is: an unknown field is an error.

The schemas are vendored data, each folder with a README naming its source and licence:
manifests/schemas/kserve (KServe's kinds; $LOOKALIKE_KSERVE_SCHEMAS points elsewhere) and
manifests/schemas/prometheus-operator (PrometheusRule).
"""
from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import yaml

from lookalike.core.settings import kserve_schemas_override
from lookalike.deploy.problems import ManifestError

SCHEMAS = Path(__file__).resolve().parents[2] / "manifests" / "schemas"
KSERVE_GROUP = "serving.kserve.io"
MONITORING_GROUP = "monitoring.coreos.com"
# group -> kind -> CRD file name. The KServe kinds beyond InferenceService are validated when their CRD
# file is in the schema folder.
CRDS = {
    KSERVE_GROUP: {
        "InferenceService": "serving.kserve.io_inferenceservices.yaml",
        "ServingRuntime": "serving.kserve.io_servingruntimes.yaml",
        "ClusterServingRuntime": "serving.kserve.io_clusterservingruntimes.yaml",
        "InferenceGraph": "serving.kserve.io_inferencegraphs.yaml",
    },
    MONITORING_GROUP: {"PrometheusRule": "monitoring.coreos.com_prometheusrules.yaml"},
}


def kserve_schema_dir() -> Path:
    """The KServe CRD folder: $LOOKALIKE_KSERVE_SCHEMAS first, then the copy in manifests/schemas/kserve."""
    env = kserve_schemas_override()
    path = env or SCHEMAS / "kserve"
    first = CRDS[KSERVE_GROUP]["InferenceService"]
    if not (path / first).is_file():
        source = "LOOKALIKE_KSERVE_SCHEMAS" if env else "the vendored copy"
        raise ManifestError(f"no KServe CRD schemas in {path} ({source}): point LOOKALIKE_KSERVE_SCHEMAS at a folder "
                            f"holding {first} (KServe's config/crd/full/)")
    return path


def schema_dir(group: str) -> Path:
    return kserve_schema_dir() if group == KSERVE_GROUP else SCHEMAS / "prometheus-operator"


def schema_errors(obj: dict[str, Any]) -> list[tuple[str, str]]:
    """(field, message) for each way `obj`, a kind of one of CRDS' groups, breaks its CRD's schema."""
    import jsonschema

    group, version = obj["apiVersion"].split("/", 1)
    kind = obj["kind"]
    if kind not in CRDS[group]:
        return [("kind", f"unknown {group} kind {kind!r}")]
    folder = schema_dir(group)
    schema = _schema(str(folder), group, kind, version)
    if schema is None:
        return [("apiVersion", f"the {kind} CRD in {folder} serves no version {version!r}")]
    validator = jsonschema.Draft7Validator(schema)
    problems = []
    for error in sorted(validator.iter_errors(obj), key=lambda e: [str(p) for p in e.absolute_path]):
        error = jsonschema.exceptions.best_match([error]) if error.context else error
        problems.append((field_of(error), f"{error.message} ({kind} CRD schema)"))
    return problems


@functools.lru_cache(maxsize=8)
def _schema(folder: str, group: str, kind: str, version: str) -> dict[str, Any] | None:
    crd_file = Path(folder) / CRDS[group][kind]
    if not crd_file.is_file():
        raise ManifestError(f"no CRD file for {kind}: {crd_file} is missing")
    crd = yaml.load(crd_file.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    for served in crd["spec"]["versions"]:
        if served["name"] == version:
            return _strict(copy.deepcopy(served["schema"]["openAPIV3Schema"]))
    return None


def _strict(schema: dict[str, Any]) -> dict[str, Any]:
    """Map Kubernetes' OpenAPI extensions onto JSON Schema and reject unknown fields.

    The API server prunes unknown fields of a structural schema; `kubectl apply` (strict field
    validation, the default) turns each into an error. `additionalProperties: false` does the same here
    except where the schema says `x-kubernetes-preserve-unknown-fields`.
    """
    if schema.get("x-kubernetes-int-or-string") and "anyOf" not in schema:
        schema.pop("type", None)
        schema["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable") and "type" in schema:
        schema["type"] = [schema["type"], "null"] if isinstance(schema["type"], str) else schema["type"] + ["null"]
    if "format" in schema and schema["format"] in ("int32", "int64"):
        bits = 31 if schema["format"] == "int32" else 63
        schema.setdefault("minimum", -(2 ** bits))
        schema.setdefault("maximum", 2 ** bits - 1)
    props = schema.get("properties")
    if isinstance(props, dict):
        for sub in props.values():
            _strict(sub)
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            _strict(schema[key])
    for key in ("anyOf", "oneOf", "allOf"):
        for sub in schema.get(key, []):
            _strict(sub)
    return schema


def field_of(error: Any) -> str:
    """A dotted path to the field at fault; for an unknown field, the unknown field itself."""
    parts = list(error.absolute_path)
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        known = set((error.schema or {}).get("properties", {}))
        extra = sorted(k for k in error.instance if k not in known)
        if extra:
            parts.append(extra[0])
    return dotted(parts)


def dotted(parts: list[Any]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out
