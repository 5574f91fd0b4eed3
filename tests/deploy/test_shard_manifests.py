"""The sharded production overlay: an embedding predictor, 4 shard predictors that the transformer fans out
to, every shard's versions following the one InferenceService's rollout annotations, and only the
transformer allowed to reach a shard."""
from __future__ import annotations

from pathlib import Path

from lookalike.deploy import manifest_check as mc
from tests.deploy.test_manifests import copy_tree, edit

MODEL = "20261124T010203457Z-abcdef"
SHARDED = "20261125T010203457Z-123456"
PREVIOUS = "20261124T030203457Z-654321"


def test_sharded_overlay_validates_and_moves_every_shard_with_the_rollout(tmp_path: Path):
    tree = copy_tree(tmp_path / "manifests")
    rollout = tree / "overlays/production/rollout.yaml"
    edit(rollout, "lookalike.io/model-version: unset", f"lookalike.io/model-version: {MODEL}")
    edit(rollout, "lookalike.io/index-version: unset", "lookalike.io/index-version: 20261124T020203457Z-fedcba")
    edit(tree / "overlays/production-sharded/embedder.yaml", "  value: unset", f"  value: {SHARDED}")
    edit(tree / "overlays/production-sharded/embedder.yaml", "  value: none", f"  value: {PREVIOUS}")
    report = mc.validate_overlay("production-sharded", tree)
    assert report.ok, "\n".join(report.lines())
    main = mc.find_object(report.objects, "InferenceService", "lookalike")
    assert main["spec"]["predictor"]["containers"][0]["command"] == ["python", "-m", "lookalike.predictor.parts"]
    assert main["spec"]["predictor"]["containers"][0]["args"][0] == "embed"
    hosts = next(a for a in main["spec"]["transformer"]["containers"][0]["args"] if a.startswith("--shard_hosts="))
    assert hosts.split("=", 1)[1].split(",") == [f"lookalike-shard-{i}-predictor.lookalike.svc.cluster.local:80"
                                                 for i in range(4)]
    for i in range(4):
        shard = mc.find_object(report.objects, "InferenceService", f"lookalike-shard-{i}")
        container = shard["spec"]["predictor"]["containers"][0]
        env = mc.container_env(container)
        assert container["args"][0] == "shard" and env["LOOKALIKE_SHARD"] == str(i)
        assert env["LOOKALIKE_MODEL_VERSION"] == MODEL and env["LOOKALIKE_INDEX_VERSION"] == SHARDED
        assert env["LOOKALIKE_PREVIOUS_INDEX_VERSION"] == PREVIOUS  # held too while the swap rolls out
        assert shard["metadata"]["annotations"]["lookalike.io/index-version"] == SHARDED
        assert "@sha256:" in container["image"] and container["resources"]["requests"]["memory"] == "12Gi"


def test_a_shard_open_to_other_pods_is_refused(tmp_path: Path):
    tree = copy_tree(tmp_path / "manifests")
    edit(tree / "overlays/production-sharded/shards-networkpolicy.yaml",
         "              serving.kserve.io/inferenceservice: lookalike\n              component: transformer",
         "              app: anything")
    report = mc.validate_overlay("production-sharded", tree)
    assert any("lets pods other than the transformer reach the predictor" in line for line in report.lines())
