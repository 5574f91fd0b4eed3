"""The Kustomize overlays render (real `kubectl kustomize`) and validate offline: built-in kinds with
kubernetes-validate --strict, the InferenceService against KServe's real CRD schema. Deliberately broken
copies of the tree are caught, each with a message naming the object and the field."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from lookalike.deploy import manifest_check as mc
from lookalike.deploy.dev_credentials import write_dev_credentials
from lookalike.cli.main import main

MANIFESTS = mc.repo_root() / "manifests"
ISVC_DEV = "InferenceService lookalike-dev/lookalike"


def copy_tree(dst: Path) -> Path:
    """A private copy of manifests/ (the schemas stay where they are) with its own generated dev credentials."""
    shutil.copytree(MANIFESTS, dst, ignore=shutil.ignore_patterns("schemas", "credentials"))
    write_dev_credentials(dst)
    return dst


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A private copy of manifests/ to break."""
    return copy_tree(tmp_path / "manifests")


def edit(path: Path, old: str, new: str, count: int = 1) -> None:
    text = path.read_text()
    assert text.count(old) >= 1, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, count))


def test_kubectl_and_schemas_are_found():
    assert Path(mc.find_kubectl()).name == "kubectl"
    assert (mc.kserve_schema_dir() / "serving.kserve.io_inferenceservices.yaml").is_file()


@pytest.mark.parametrize("overlay", ["dev", "production"])
def test_every_overlay_renders_and_validates(overlay, tree):
    assert overlay in mc.list_overlays()
    report = mc.validate_overlay(overlay, tree)
    assert report.ok, "\n".join(report.lines())
    isvc = mc.find_object(report.objects, "InferenceService", "lookalike")
    predictor, transformer = isvc["spec"]["predictor"], isvc["spec"]["transformer"]
    pc, tc = predictor["containers"][0], transformer["containers"][0]
    assert pc["command"] == ["python", "-m", "lookalike.predictor"] and "--model_name=lookalike" in pc["args"]
    assert tc["command"] == ["python", "-m", "lookalike.transformer"] and "--model_name=lookalike" in tc["args"]
    # Transformer -> predictor: binary gRPC v2 to the predictor's route (h2c) in this namespace.
    ns = isvc["metadata"]["namespace"]
    assert "--predictor_protocol=grpc-v2" in tc["args"]
    assert f"--predictor_host=lookalike-predictor.{ns}.svc.cluster.local:80" in tc["args"]
    assert pc["ports"] == [{"name": "h2c", "containerPort": 8081, "protocol": "TCP"}]
    assert "--grpc_port=8081" in pc["args"] and "--http_port=8080" in pc["args"]
    for container in (pc, tc):
        assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
        assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 8080}
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["runAsNonRoot"] is True
    env = mc.container_env(pc)
    version = isvc["metadata"]["annotations"][mc.ANNOTATION_MODEL]
    assert env["STORAGE_URI"] == f"s3://lookalike/models/{version}/"
    assert env["LOOKALIKE_MODEL_VERSION"] == version
    assert predictor["serviceAccountName"] == "lookalike-serving"
    sa = mc.find_object(report.objects, "ServiceAccount", "lookalike-serving")
    assert {"serving.kserve.io/s3-endpoint", "serving.kserve.io/s3-usehttps", "serving.kserve.io/s3-region"} <= set(
        sa["metadata"]["annotations"])
    kinds = {o["kind"] for o in report.objects}
    if overlay == "dev":
        # MinIO inside, no GPU needed, generated dev credentials only.
        assert {"Deployment", "Service", "PersistentVolumeClaim", "Job", "Secret", "ConfigMap",
                "NetworkPolicy"} <= kinds
        assert "nvidia.com/gpu" not in str(pc["resources"]) and "nodeSelector" not in predictor
        assert mc.find_object(report.objects, "Job", "minio-create-bucket")
    else:
        # GPU pool, autoscaling, more replicas, registry images; no Secret rendered at all.
        assert pc["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert predictor["nodeSelector"]["lookalike.io/pool"] == "gpu"
        assert any(t["key"] == "nvidia.com/gpu" for t in predictor["tolerations"])
        assert predictor["minReplicas"] >= 2 and predictor["maxReplicas"] > predictor["minReplicas"]
        assert predictor["scaleMetric"] == transformer["scaleMetric"] == "rps" and transformer["minReplicas"] >= 2
        assert re.fullmatch(r"registry\.example\.com/lookalike/predictor@sha256:[0-9a-f]{64}", pc["image"])
        assert {"Secret"} & kinds == set() and {"PrometheusRule", "NetworkPolicy"} <= kinds
        assert any("Secret 'lookalike-s3-serving'" in p.message for p in report.warnings)  # read-only, out of band


def test_pipeline_settings_point_at_the_dev_store(tree):
    report = mc.validate_overlay("dev-pipelines", tree)
    assert report.ok and not report.warnings, "\n".join(report.lines())
    settings = mc.find_object(report.objects, "ConfigMap", "lookalike-settings")
    assert settings["metadata"]["namespace"] == "kubeflow"
    assert settings["data"]["LOOKALIKE_S3_ENDPOINT"].startswith("minio.lookalike-dev.svc")
    assert set(mc.find_object(report.objects, "Secret", "lookalike-s3")["data"]) == {
        "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


def test_no_credential_in_the_tree():
    """No committed file of manifests/ holds a key: the dev ones are generated into git-ignored files."""
    import subprocess

    committed = subprocess.run(["git", "ls-files", "manifests"], cwd=mc.repo_root(), capture_output=True, text=True,
                               check=True).stdout.split()
    assert "manifests/base/kustomization.yaml" in committed
    for rel in committed:
        if rel.endswith((".yaml", ".yml", ".env", ".json")) and "schemas/" not in rel:
            text = (mc.repo_root() / rel).read_text()
            assert not re.search(r"AKIA[0-9A-Z]{16}", text), rel  # AWS access key ids
            assert not re.search(r"(AWS_SECRET_ACCESS_KEY|MINIO_ROOT_PASSWORD)\s*[:=]\s*\S", text), rel


BROKEN = [
    # (file, old, new, object, field, words in the message)
    ("base/inferenceservice.yaml", "        readinessProbe:", "        readinesProbe:",
     ISVC_DEV, "spec.transformer.containers[0].readinesProbe", "readinesProbe"),
    ("overlays/dev/minio-bucket-job.yaml", "  backoffLimit: 10", "  backofLimit: 10",
     "Job lookalike-dev/minio-create-bucket", "spec.backofLimit", "backofLimit"),
    ("base/inferenceservice.yaml", "    maxReplicas: 1\n", "    maxReplicas: one\n",
     ISVC_DEV, "spec.predictor.maxReplicas", "not of type 'integer'"),
    ("overlays/dev/minio.yaml", "containerPort: 9000", "containerPort: \"9000\"",
     "Deployment lookalike-dev/minio", "spec.template.spec.containers[0].ports[0].containerPort",
     "not of type 'integer'"),
    ("overlays/dev/rollout.yaml", "    lookalike.io/index-version: unset\n",
     "    lookalike.io/index-version: unset\nspec:\n  predictor:\n    canaryTrafficPercent: 150\n",
     ISVC_DEV, "spec.predictor.canaryTrafficPercent", "150 is outside 0-100"),
    ("overlays/dev/minio-bucket-job.yaml", "key: LOOKALIKE_S3_BUCKET", "key: LOOKALIKE_BUCKET",
     "Job lookalike-dev/minio-create-bucket", "spec.template.spec.containers[0].env[1].valueFrom.configMapKeyRef",
     "has no key 'LOOKALIKE_BUCKET'"),
    ("base/kustomization.yaml", "LOOKALIKE_S3_BUCKET=lookalike", "LOOKALIKE_S3_BUCKET=products",
     ISVC_DEV, "spec.predictor.containers[0].env[STORAGE_URI]", "not in bucket 'products'"),
    # The overlay's replacements gone: the predictor would load another model than the rollout says.
    ("overlays/dev/kustomization.yaml", "replacements:", "unused_replacements:",
     None, None, None),
    # More requests at once than the transformer's gate holds, or too little memory for their worst case.
    ("overlays/dev/cpu-only.yaml", "  value: 4\n", "  value: 20\n",
     ISVC_DEV, "spec.transformer.containerConcurrency", "set it to at most 4"),
    ("overlays/dev/cpu-only.yaml", "      memory: 1280Mi", "      memory: 900Mi",
     ISVC_DEV, "spec.transformer.containers[0].resources.limits.memory", "below the worst case of 4 requests"),
]


@pytest.mark.parametrize("case", BROKEN, ids=["misspelled-isvc-field", "misspelled-builtin-field",
                                              "wrong-type-isvc", "wrong-type-builtin", "canary-150",
                                              "missing-configmap-key", "other-bucket", "rollout-not-applied",
                                              "concurrency-over-the-gate", "memory-under-the-worst-case"])
def test_broken_copies_are_caught(tree, case):
    rel, old, new, obj, field, words = case
    if rel == "overlays/dev/kustomization.yaml":
        # kustomize refuses unknown kustomization fields itself; drop the block instead.
        text = (tree / rel).read_text()
        (tree / rel).write_text(text.split("# Copy the rollout annotations")[0])
        (tree / "overlays/dev/rollout.yaml").write_text(
            (tree / "overlays/dev/rollout.yaml").read_text().replace("model-version: unset", "model-version: m2"))
        field = "spec.predictor.containers[name=kserve-container].env[LOOKALIKE_MODEL_VERSION]"
        obj, words = ISVC_DEV, "'m2'"
    else:
        edit(tree / rel, old, new)
    report = mc.validate_overlay("dev", tree)
    assert not report.ok
    matching = [p for p in report.errors if p.obj == obj and p.field == field]
    assert matching, "\n".join(report.lines())
    assert words in matching[0].message
    assert obj in str(matching[0]) and field in str(matching[0])


def test_cli_validate_exit_status_and_messages(tree, capsys):
    assert main(["manifests", "validate", "--manifests", str(tree)]) == 0
    out = capsys.readouterr().out
    assert f"{len(mc.list_overlays(tree))} of {len(mc.list_overlays(tree))} overlays valid" in out
    # the transformer's, above its max 2
    edit(tree / "base/inferenceservice.yaml", "    minReplicas: 1\n", "    minReplicas: 3\n")
    assert main(["manifests", "validate", "--manifests", str(tree), "--overlay", "dev"]) == 1
    out = capsys.readouterr().out
    assert f"ERROR {ISVC_DEV}: spec.transformer.maxReplicas: maxReplicas 2 is below minReplicas 3" in out
    assert "0 of 1 overlays valid" in out


def test_cli_render_and_unknown_overlay(tree, capsys):
    assert main(["manifests", "render", "--manifests", str(tree), "--overlay", "production"]) == 0
    out = capsys.readouterr().out
    assert "kind: InferenceService" in out and "namespace: lookalike" in out
    assert main(["manifests", "render", "--manifests", str(tree), "--overlay", "staging"]) == 1
    err = capsys.readouterr().err
    assert "overlay 'staging' not found" in err and "dev, dev-pipelines, production" in err


def test_schema_folder_from_environment(tree, tmp_path, monkeypatch):
    # A schema folder of our own, whose InferenceService CRD lacks canaryTrafficPercent: when the
    # variable points there, a canary becomes an unknown field, proving that folder is the one used.
    schemas = tmp_path / "schemas"
    schemas.mkdir()
    crd = (mc.kserve_schema_dir() / "serving.kserve.io_inferenceservices.yaml").read_text()
    (schemas / "serving.kserve.io_inferenceservices.yaml").write_text(
        crd.replace("canaryTrafficPercent:", "canaryTrafficPercentRenamed:"))
    edit(tree / "overlays/dev/rollout.yaml", "    lookalike.io/index-version: unset\n",
         "    lookalike.io/index-version: unset\nspec:\n  predictor:\n    canaryTrafficPercent: 10\n")
    assert mc.validate_overlay("dev", tree).ok
    monkeypatch.setenv("LOOKALIKE_KSERVE_SCHEMAS", str(schemas))
    report = mc.validate_overlay("dev", tree)
    assert [p.field for p in report.errors] == ["spec.predictor.canaryTrafficPercent"]
    monkeypatch.setenv("LOOKALIKE_KSERVE_SCHEMAS", str(tmp_path / "nowhere"))
    with pytest.raises(mc.ManifestError, match="LOOKALIKE_KSERVE_SCHEMAS"):
        mc.validate_overlay("dev", tree)


def test_kustomize_failure_is_one_clear_error(tree):
    (tree / "base/serviceaccount.yaml").unlink()
    with pytest.raises(mc.ManifestError, match="kustomize could not render"):
        mc.render("dev", tree)


@pytest.mark.parametrize("overlay", ["dev", "production"])
def test_rendered_commands_are_accepted_by_the_real_entry_points(overlay, monkeypatch, tmp_path):
    """The containers' args and env parse with the servers' own parsers (strictly: no unknown flag)."""
    from lookalike.predictor.__main__ import build_parser as predictor_parser
    from lookalike.transformer.__main__ import build_parser as transformer_parser

    tree = copy_tree(tmp_path / "manifests")
    edit(tree / f"overlays/{overlay}/rollout.yaml", "model-version: unset", "model-version: m7")
    edit(tree / f"overlays/{overlay}/rollout.yaml", "index-version: unset", "index-version: i3")
    isvc = mc.find_object(mc.render(overlay, tree), "InferenceService", "lookalike")
    parsers = {"predictor": predictor_parser, "transformer": transformer_parser}
    parsed = {}
    for component, build in parsers.items():
        (container,) = isvc["spec"][component]["containers"]
        assert container["command"] == ["python", "-m", f"lookalike.{component}"]
        for name, value in mc.container_env(container).items():
            if value is not None:
                monkeypatch.setenv(name, value)
        parsed[component] = build().parse_args(container["args"])
    p, t = parsed["predictor"], parsed["transformer"]
    assert (p.model_name, p.http_port, p.grpc_port) == ("lookalike", 8080, 8081)
    assert (p.model_version, p.index_version, p.model_dir) == ("m7", "i3", "/mnt/models")
    assert t.predictor_protocol == "grpc-v2" and t.predictor_host.endswith(".svc.cluster.local:80")


# ----------------------------------------------------------------------------------------- images
# Docker cannot run here: the Dockerfiles are parsed with Docker's own parser (the `dockerfile`
# package wraps it), their shell steps are syntax-checked with `sh -n`, and their properties asserted.

IMAGES = {  # Dockerfile -> (the extra it installs, the package folders it may copy, the command)
    "transformer/Dockerfile": (".[transformer]", {"lookalike", "transformer"},
                               ["python", "-m", "lookalike.transformer"]),
    "predictor/Dockerfile": (".[predictor,gpu]", {"lookalike", "transformer", "training", "predictor"},
                             ["python", "-m", "lookalike.predictor"]),
    "pipelines/Dockerfile": (".[pipelines]", {"lookalike", "transformer", "training", "predictor", "pipelines"},
                             ["lookalike", "--help"]),
}


@pytest.mark.parametrize("path", sorted(IMAGES))
def test_dockerfiles(path):
    import subprocess

    import dockerfile

    extra, packages, command = IMAGES[path]
    root = mc.repo_root()
    steps = dockerfile.parse_file(str(root / path))
    cmds = [s.cmd for s in steps]
    # A pinned base (exact Python patch release), used by every stage.
    assert cmds[0] == "ARG" and re.fullmatch(r"BASE_IMAGE=python:3\.11\.\d+-slim-bookworm", steps[0].value[0])
    assert [s.value[0] for s in steps if s.cmd == "FROM"] == ["${BASE_IMAGE}", "${BASE_IMAGE}"]
    final = steps[max(i for i, c in enumerate(cmds) if c == "FROM"):]
    assert [s.value for s in final if s.cmd == "USER"] == [("10001:10001",)]  # non-root at run time
    assert list(next(s for s in final if s.cmd == "CMD").value) == command
    # Only what the unit needs is copied in, and .dockerignore admits exactly that.
    admitted = {line[1:].strip("/") for line in (root / ".dockerignore").read_text().splitlines()
                if line.startswith("!")}
    sources = {v.strip("/") for s in steps if s.cmd == "COPY" and not any("--from" in f for f in s.flags)
               for v in s.value[:-1]}
    assert sources - {"pyproject.toml", "setup.py", "constraints.txt", "README.md"} == packages
    assert sources <= admitted
    runs = [s for s in steps if s.cmd == "RUN"]
    assert any(f'"{extra}"' in " ".join(s.value) for s in runs), f"{path} does not install {extra}"
    for run in runs:  # every shell step parses
        proc = subprocess.run(["sh", "-n", "-c", " ".join(run.value)], capture_output=True, text=True)
        assert proc.returncode == 0, (path, run.start_line, proc.stderr)
    # No credentials baked in.
    for s in steps:
        if s.cmd in ("ENV", "ARG"):
            assert not re.search(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY)", " ".join(s.value), re.I), (path, s.original)


def test_serving_units_read_the_store_with_a_read_only_key(tree):
    """The transformer and predictor use the serving Secret (MinIO policy: read models/, indexes/,
    catalogs/ and nothing else); only the pipelines' Secret can write."""
    import json

    report = mc.validate_overlay("dev", tree)
    isvc = mc.find_object(report.objects, "InferenceService", "lookalike")
    for component in ("transformer", "predictor"):
        (container,) = isvc["spec"][component]["containers"]
        refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in container.get("env", []) if "valueFrom" in e
                and "secretKeyRef" in e["valueFrom"]}
        assert refs == {"lookalike-s3-serving"}, (component, refs)
    sa = mc.find_object(report.objects, "ServiceAccount", "lookalike-serving")
    assert [s["name"] for s in sa["secrets"]] == ["lookalike-s3-serving"]
    policies = mc.find_object(report.objects, "ConfigMap", "minio-policies")["data"]
    serving, pipelines = json.loads(policies["serving.json"]), json.loads(policies["pipelines.json"])
    actions = {a for s in serving["Statement"] for a in s["Action"]}
    assert actions == {"s3:GetObject", "s3:ListBucket"}  # nothing that writes or deletes
    # The pipelines write models/ and indexes/ only, and read catalogs/; no wildcard action anywhere.
    writes = {r for s in pipelines["Statement"] if "s3:PutObject" in s["Action"] for r in s["Resource"]}
    assert writes == {"arn:aws:s3:::lookalike/models/*", "arn:aws:s3:::lookalike/indexes/*"}
    assert not any("*" in a for s in serving["Statement"] + pipelines["Statement"] for a in s["Action"])
    job = mc.find_object(report.objects, "Job", "minio-create-bucket")
    assert "mc admin policy attach dev lookalike-serving" in str(job)
    assert "mc admin policy attach dev lookalike-pipelines" in str(job)
    # MinIO's root account is used by MinIO and the Job that creates the users, by nothing else.
    users = {mc.describe(o) for o in report.objects if "'name': 'minio-root'" in str(o) and o["kind"] != "Secret"}
    assert users == {"Deployment lookalike-dev/minio", "Job lookalike-dev/minio-create-bucket"}
