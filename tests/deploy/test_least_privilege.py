"""`lookalike manifests validate` holds the overlays to least privilege: each case plants one fault in a private
copy of the tree (a credential literal, an unpinned or unqualified image, a NetworkPolicy that lets another pod
reach the predictor, an RBAC wildcard, scaling that disagrees with the capacity plan, a broken alert) and sees it
refused with the object and field named. The dev credentials are generated, random and git-ignored."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from test_manifests import copy_tree, edit

from lookalike.cli.main import main
from lookalike.deploy import manifest_check as mc
from lookalike.deploy.autoscaling import plan
from lookalike.deploy.dev_credentials import credential_files, write_dev_credentials

ISVC = "InferenceService lookalike/lookalike"
PROD = "overlays/production/kustomization.yaml"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return copy_tree(tmp_path / "manifests")


def errors(tree: Path, overlay: str = "production") -> list[str]:
    report = mc.validate_overlay(overlay, tree)
    return [str(p) for p in report.errors]


def test_the_committed_overlays_hold_to_least_privilege(tree):
    for overlay in mc.list_overlays(tree):
        assert errors(tree, overlay) == [], overlay


def test_a_credential_literal_in_production_is_refused(tree):
    edit(tree / PROD, "configMapGenerator:", "secretGenerator:\n  - name: lookalike-s3-serving\n    literals:\n"
                                            "      - AWS_ACCESS_KEY_ID=prod\n      - AWS_SECRET_ACCESS_KEY=hunter2\n\n"
                                            "configMapGenerator:")
    found = errors(tree)
    assert any("production/kustomization.yaml: secretGenerator[0].literals" in e and "committed credential" in e
               for e in found), found
    assert any("Secret lookalike/lookalike-s3-serving" in e and "production renders a Secret" in e for e in found)


def test_a_secret_file_or_a_literal_variable_in_production_is_refused(tree):
    (tree / "overlays/production/s3.yaml").write_text(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: lookalike-s3-serving\nstringData:\n"
        "  AWS_SECRET_ACCESS_KEY: hunter2\n")
    edit(tree / PROD, "  - ../../monitoring\n", "  - ../../monitoring\n  - s3.yaml\n")
    edit(tree / "base/inferenceservice.yaml", "          - name: LOOKALIKE_MODEL_DIR\n            value: /mnt/models\n",
         "          - name: LOOKALIKE_MODEL_DIR\n            value: /mnt/models\n"
         "          - name: AWS_SECRET_ACCESS_KEY\n            value: hunter2\n")
    found = errors(tree)
    assert any("production/s3.yaml: Secret lookalike-s3-serving" in e for e in found), found
    assert any("env[AWS_SECRET_ACCESS_KEY]" in e and "literal value" in e for e in found), found


def test_an_unpinned_or_unqualified_image_in_production_is_refused(tree):
    text = (tree / PROD).read_text()
    start = text.index("    digest: sha256:", text.index("name: lookalike/predictor"))
    (tree / PROD).write_text(text[:start] + "    newTag: 0.1.0\n" + text[text.index("\n", start) + 1:])
    found = errors(tree)
    field = "spec.predictor.containers[0].image"
    assert [e for e in found if field in e] == [
        f"ERROR {ISVC}: {field}: 'registry.example.com/lookalike/predictor:0.1.0' is not pinned by digest: a "
        f"re-pushed tag would change what runs; pin it with `lookalike manifests pin-image "
        f"NAME=REGISTRY/NAME@sha256:...`"]
    # The command the docs give pins it again.
    digest = "sha256:" + "ab" * 32
    assert main(["manifests", "pin-image", "--manifests", str(tree),
                 f"lookalike/predictor=registry.example.com/lookalike/predictor@{digest}"]) == 0
    assert errors(tree) == []
    assert mc.find_object(mc.render("production", tree), "InferenceService")["spec"]["predictor"]["containers"][0][
        "image"] == f"registry.example.com/lookalike/predictor@{digest}"
    # A tag or a bare name is not a pin.
    assert main(["manifests", "pin-image", "--manifests", str(tree), "lookalike/predictor=lookalike/predictor:1"]) == 1
    edit(tree / PROD, "newName: registry.example.com/lookalike/transformer", "newName: lookalike/transformer")
    assert any("spec.transformer.containers[0].image" in e and "not fully qualified" in e for e in errors(tree))


def test_network_policies_are_required_and_the_predictor_stays_the_transformers(tree):
    policy = tree / "base/networkpolicy.yaml"
    text = policy.read_text()
    # Any pod of the namespace may now reach the predictor.
    i = text.index("name: lookalike-predictor-ingress")
    allowed = "              component: transformer"
    j = text.index(allowed, i)
    policy.write_text(text[:j] + allowed.replace("transformer", "anything") + text[j + len(allowed):])
    found = errors(tree)
    assert any("NetworkPolicy lookalike/lookalike-predictor-ingress: spec.ingress[0].from[0]" in e
               and "other than the transformer" in e for e in found), found
    # Without the default deny, every server is open to the cluster.
    policy.write_text(text.split("---\n", 1)[1])
    found = errors(tree, "dev")
    assert any("Deployment lookalike-dev/minio" in e and "default-deny" in e for e in found), found
    assert any(f"{ISVC.replace('lookalike/', 'lookalike-dev/')}: pods predictor" in e for e in found), found


def test_rbac_wildcards_are_refused(tree):
    edit(tree / "pipelines/rbac.yaml", 'verbs: ["create", "patch"]', 'verbs: ["*"]')
    found = errors(tree, "production-pipelines")
    assert found == ["ERROR Role kubeflow/lookalike-pipelines: rules[0].verbs: a wildcard grants whatever the API "
                     "adds: name what is needed"]


def test_scaling_must_match_the_capacity_plan(tree):
    want = plan("predictor")
    edit(tree / "overlays/production/scaling.yaml", f"scaleTarget: {want.target_rps}", "scaleTarget: 100")
    found = errors(tree)
    assert any("spec.predictor.scaleTarget: is 100, the capacity plan says 48" in e and "0.6 x 80 req/s" in e
               for e in found), found
    assert want.target_rps == 48 and want.max_replicas == 8 and plan("transformer").target_rps == 80


def test_prometheus_rule_is_checked_against_its_crd_and_by_promtool(tree):
    rule = tree / "monitoring/prometheusrule.yaml"
    text = rule.read_text()
    edit(rule, "    for: 10m\n", "    fore: 10m\n")
    found = errors(tree)
    assert any("PrometheusRule lookalike/lookalike: spec.groups[0].rules[0].fore" in e and "CRD schema" in e
               for e in found), found
    rule.write_text(text.replace("> 0.25", "> > 0.25"))
    found = errors(tree)
    assert any("promtool check rules" in e and "LookalikeLatencyP99AboveSLO" in e for e in found), found


def test_dev_credentials_are_generated_random_and_ignored(tmp_path, capsys):
    tree = tmp_path / "manifests"
    copy_tree(tree)
    for paths in credential_files(tree).values():
        for path in paths:
            path.unlink()
    assert main(["manifests", "dev-secrets", "--manifests", str(tree)]) == 0
    assert "4 credential files written" in capsys.readouterr().out
    files = credential_files(tree)
    keys = {unit: paths[0].read_text() for unit, paths in files.items()}
    assert len(set(keys.values())) == 3 and all(len(k) > 60 for k in keys.values())
    assert files["pipelines"][0].read_text() == files["pipelines"][1].read_text()  # dev and dev-pipelines agree
    assert write_dev_credentials(tree) == []  # kept unless rotated
    write_dev_credentials(tree, rotate=True)
    assert files["serving"][0].read_text() != keys["serving"]
    # A render generates missing dev keys itself; a generator file it does not know is an error.
    for path in files["serving"]:
        path.unlink()
    assert mc.find_object(mc.render("dev", tree), "Secret", "lookalike-s3-serving")
    assert files["serving"][0].read_text() != keys["serving"]
    edit(tree / "overlays/dev/kustomization.yaml", "credentials/serving.env", "credentials/other.env")
    with pytest.raises(mc.ManifestError, match="run `lookalike manifests dev-secrets` first"):
        mc.render("dev", tree)
    # The real tree's files are ignored by git.
    for path in credential_files(mc.repo_root() / "manifests")["pipelines"]:
        check = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=mc.repo_root())
        assert check.returncode == 0, path
