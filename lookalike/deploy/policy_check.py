"""Least privilege, checked offline on each overlay's sources and its render (part of `lookalike manifests
validate`):

* no credential committed: no secretGenerator `literals` or plain Secret with values in an overlay's own files,
  and a generator's `envs`/`files` must be ignored by git (the dev keys `lookalike manifests dev-secrets`
  writes); no container sets a credential-named variable to a literal value;
* production (an overlay whose folder name starts with `production`) renders no Secret at all (the keys are
  created out of band) and runs only fully qualified images pinned by digest;
* every workload's pods are behind a default-deny NetworkPolicy, each server's (the InferenceService's
  components, Deployments) also selected by one of its own that says who may connect, and only the
  transformer may open a connection to the predictor from inside the namespace;
* one credential per unit: the InferenceService reads the store only with the serving units' read-only key,
  which is nobody's root account;
* RBAC grants no wildcard and no cluster-admin;
* PrometheusRule expressions parse (`promtool check rules`, where Debian's prometheus is installed).
"""
from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml

from lookalike.deploy.problems import Problem

SERVING_SECRET = "lookalike-s3-serving"
CREDENTIAL_NAME = re.compile(r"(SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL)", re.I)
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob")


def _who(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace")
    return f"{obj.get('kind', '?')} {ns + '/' if ns else ''}{meta.get('name', '?')}"


def policy_problems(overlay: Path, objects: list[dict[str, Any]]) -> list[Problem]:
    problems = _committed_credentials(overlay) + _credential_env(objects) + _rbac(objects) + _rules(objects)
    problems += _network_policies(objects) + _serving_credentials(objects)
    if overlay.name.startswith("production"):
        problems += _production(objects)
    return problems


# ---- credentials ----------------------------------------------------------------------------------

def _ignored(overlay: Path, rel: str) -> bool:
    """Whether a .gitignore in the overlay folder ignores `rel` (a path relative to it)."""
    gitignore = overlay / ".gitignore"
    if not gitignore.is_file():
        return False
    for pattern in (p.strip() for p in gitignore.read_text().splitlines()):
        if not pattern or pattern.startswith("#"):
            continue
        pattern = pattern.lstrip("/")
        if fnmatch.fnmatch(rel, pattern) or (pattern.endswith("/") and rel.startswith(pattern)):
            return True
    return False


def _committed_credentials(overlay: Path) -> list[Problem]:
    where = f"{overlay.name}/kustomization.yaml"
    kustomization = yaml.safe_load((overlay / "kustomization.yaml").read_text()) or {}
    problems = []
    for i, gen in enumerate(kustomization.get("secretGenerator") or []):
        name = gen.get("name", "?")
        if gen.get("literals"):
            problems.append(Problem("error", where, f"secretGenerator[{i}].literals",
                                    f"Secret {name!r} has its values written in the overlay: a committed "
                                    f"credential; generate it (`lookalike manifests dev-secrets`) or create it out "
                                    f"of band (docs/operations.md)"))
        for source in (gen.get("envs") or []) + (gen.get("files") or []):
            rel = str(source).split("=", 1)[-1]
            if not _ignored(overlay, rel):
                problems.append(Problem("error", where, f"secretGenerator[{i}]",
                                        f"Secret {name!r} reads {rel}, which no .gitignore beside the kustomization "
                                        f"ignores: its credential would be committed"))
    for i, gen in enumerate(kustomization.get("configMapGenerator") or []):
        for literal in gen.get("literals") or []:
            key = str(literal).split("=", 1)[0]
            if CREDENTIAL_NAME.search(key):
                problems.append(Problem("error", where, f"configMapGenerator[{i}].literals[{key}]",
                                        "a credential in a ConfigMap: committed, and readable by anyone who may "
                                        "read ConfigMaps"))
    for path in sorted(overlay.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "Secret" and (doc.get("data") or doc.get("stringData")):
                problems.append(Problem("error", f"{overlay.name}/{path.name}", f"Secret {doc['metadata']['name']}",
                                        "a Secret with its values in the overlay: a committed credential"))
    return problems


def _containers(obj: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(field, container) of every container an object runs: workloads' pod templates and the
    InferenceService's components."""
    if obj.get("kind") == "InferenceService":
        specs = [(f"spec.{c}", (obj.get("spec") or {}).get(c) or {}) for c in ("predictor", "transformer", "explainer")]
    elif obj.get("kind") == "CronJob":
        specs = [("spec.jobTemplate.spec.template.spec",
                  ((((obj.get("spec") or {}).get("jobTemplate") or {}).get("spec") or {}).get("template") or {})
                  .get("spec") or {})]
    elif obj.get("kind") in WORKLOADS or obj.get("kind") == "Pod":
        spec = obj.get("spec") or {}
        specs = [("spec", spec)] if obj["kind"] == "Pod" else [("spec.template.spec",
                                                                 (spec.get("template") or {}).get("spec") or {})]
    else:
        return []
    out = []
    for where, spec in specs:
        for key in ("initContainers", "containers"):
            for i, c in enumerate(spec.get(key) or []):
                if isinstance(c, dict):
                    out.append((f"{where}.{key}[{i}]", c))
    return out


def _credential_env(objects: list[dict[str, Any]]) -> list[Problem]:
    problems = []
    for obj in objects:
        for where, container in _containers(obj):
            for env in container.get("env") or []:
                if CREDENTIAL_NAME.search(str(env.get("name", ""))) and env.get("value"):
                    problems.append(Problem("error", _who(obj), f"{where}.env[{env['name']}]",
                                            "a credential written as a literal value: read it from a Secret "
                                            "(valueFrom.secretKeyRef)"))
    return problems


def _serving_credentials(objects: list[dict[str, Any]]) -> list[Problem]:
    """The serving units read the store with their own read-only key, and that key is no one's root account."""
    problems = []
    for obj in objects:
        for where, container in _containers(obj):
            for env in container.get("env") or []:
                ref = ((env.get("valueFrom") or {}).get("secretKeyRef") or {}).get("name")
                if ref is None:
                    continue
                if obj.get("kind") == "InferenceService" and ref != SERVING_SECRET:
                    problems.append(Problem("error", _who(obj), f"{where}.env[{env.get('name')}]",
                                            f"reads Secret {ref!r}: the serving units use only their own read-only "
                                            f"key, {SERVING_SECRET!r}"))
                if ref == SERVING_SECRET and str(env.get("name", "")).startswith("MINIO_ROOT"):
                    problems.append(Problem("error", _who(obj), f"{where}.env[{env.get('name')}]",
                                            f"{SERVING_SECRET!r} is the serving units' read-only key, not a root "
                                            f"account"))
    return problems


# ---- production -----------------------------------------------------------------------------------

def qualified(image: str) -> bool:
    """Whether an image names its registry (a host with a dot or a port, or localhost) before its path."""
    first = image.split("/", 1)[0]
    return "/" in image and ("." in first or ":" in first or first == "localhost")


def _production(objects: list[dict[str, Any]]) -> list[Problem]:
    problems = []
    for obj in objects:
        if obj.get("kind") == "Secret":
            problems.append(Problem("error", _who(obj), "", "production renders a Secret: its values would be in "
                                                             "the repository; create it out of band"))
        for where, container in _containers(obj):
            image = str(container.get("image", ""))
            if not qualified(image):
                problems.append(Problem("error", _who(obj), f"{where}.image",
                                        f"{image!r} is not fully qualified (registry/name): which registry serves it "
                                        f"depends on the node's configuration"))
            if not DIGEST.search(image):
                problems.append(Problem("error", _who(obj), f"{where}.image",
                                        f"{image!r} is not pinned by digest: a re-pushed tag would change what runs; "
                                        f"pin it with `lookalike manifests pin-image NAME=REGISTRY/NAME@sha256:...`"))
    return problems


# ---- network policies -----------------------------------------------------------------------------

def _selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels only, as ours are) selects pods with `labels`."""
    if selector is None:
        return False
    wanted = selector.get("matchLabels") or {}
    return all(labels.get(k) == v for k, v in wanted.items()) and not selector.get("matchExpressions")


def _pod_labels(objects: list[dict[str, Any]]) -> list[tuple[dict[str, Any], str, dict[str, str]]]:
    """(object, namespace, pod labels) of every workload; KServe labels an InferenceService's pods with its
    name and the component."""
    out = []
    for obj in objects:
        ns = (obj.get("metadata") or {}).get("namespace")
        if obj.get("kind") == "InferenceService":
            for component in ("predictor", "transformer"):
                if (obj.get("spec") or {}).get(component):
                    out.append((obj, ns, {"serving.kserve.io/inferenceservice": obj["metadata"]["name"],
                                          "component": component}))
        elif obj.get("kind") in WORKLOADS:
            template = (obj.get("spec") or {}).get("template") or {}
            out.append((obj, ns, (template.get("metadata") or {}).get("labels") or {}))
    return out


def _network_policies(objects: list[dict[str, Any]]) -> list[Problem]:
    policies = [o for o in objects if o.get("kind") == "NetworkPolicy"]
    problems = []
    for obj, ns, labels in _pod_labels(objects):
        mine = [p for p in policies if (p["metadata"].get("namespace") == ns
                                        and "Ingress" in (p.get("spec") or {}).get("policyTypes", ["Ingress"])
                                        and _selects((p.get("spec") or {}).get("podSelector"), labels))]
        what = f"pods {labels.get('component', '')}".rstrip()
        if not any((p["spec"].get("podSelector") or {}) == {} and not p["spec"].get("ingress") for p in mine):
            problems.append(Problem("error", _who(obj), what, "no default-deny NetworkPolicy covers these pods: any "
                                                              "pod of the cluster could connect to them"))
        serves = obj.get("kind") in ("InferenceService", "Deployment", "StatefulSet", "DaemonSet")
        if serves and not any((p["spec"].get("podSelector") or {}) != {} for p in mine):
            problems.append(Problem("error", _who(obj), what, "no NetworkPolicy of their own says who may connect"))
        if labels.get("component") == "predictor":
            # its own InferenceService's transformer, or (an index shard's predictor) another's in the namespace
            transformers = [{**labels, "component": "transformer"}] + [
                t for _, t_ns, t in _pod_labels(objects) if t_ns == ns and t.get("component") == "transformer"]
            for p in mine:
                for i, rule in enumerate(p["spec"].get("ingress") or []):
                    for j, peer in enumerate(rule.get("from") or [{}]):
                        if ("namespaceSelector" not in peer and "ipBlock" not in peer
                                and not any(_selects(peer.get("podSelector"), t) for t in transformers)):
                            problems.append(Problem("error", _who(p), f"spec.ingress[{i}].from[{j}]",
                                                    "lets pods other than the transformer reach the predictor"))
    return problems


# ---- RBAC and rules --------------------------------------------------------------------------------

def _rbac(objects: list[dict[str, Any]]) -> list[Problem]:
    problems = []
    roles = {(o.get("kind"), o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objects
             if o.get("kind") in ("Role", "ClusterRole")}
    for obj in objects:
        if obj.get("kind") in ("Role", "ClusterRole"):
            for i, rule in enumerate(obj.get("rules") or []):
                for key in ("apiGroups", "resources", "verbs"):
                    if "*" in (rule.get(key) or []):
                        problems.append(Problem("error", _who(obj), f"rules[{i}].{key}",
                                                "a wildcard grants whatever the API adds: name what is needed"))
        if obj.get("kind") in ("RoleBinding", "ClusterRoleBinding"):
            ref = obj.get("roleRef") or {}
            if ref.get("name") in ("cluster-admin", "admin", "edit"):
                problems.append(Problem("error", _who(obj), "roleRef", f"binds the built-in {ref['name']!r} role: "
                                                                      f"grant a Role of this project's own instead"))
            elif ref.get("kind") == "Role" and ("Role", obj["metadata"].get("namespace"), ref.get("name")) not in roles:
                problems.append(Problem("warning", _who(obj), "roleRef", f"Role {ref.get('name')!r} is not in "
                                                                        f"this render: it must exist in the cluster"))
    return problems


def _rules(objects: list[dict[str, Any]]) -> list[Problem]:
    rules = [o for o in objects if o.get("kind") == "PrometheusRule"]
    if not rules:
        return []
    promtool = shutil.which("promtool")
    if promtool is None:
        return [Problem("warning", _who(rules[0]), "spec.groups", "promtool (Debian's `prometheus`) is not "
                                                                 "installed: the rule expressions were not parsed")]
    problems = []
    for obj in rules:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "rules.yml"
            path.write_text(yaml.safe_dump({"groups": (obj.get("spec") or {}).get("groups") or []}))
            proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            detail = " ".join((proc.stdout + proc.stderr).replace(str(path), "rules").split())
            problems.append(Problem("error", _who(obj), "spec.groups", f"promtool check rules: {detail}"))
    return problems
