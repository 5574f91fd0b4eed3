"""Canary rollouts: the transitions, the manifests they write (rendered and validated for real), and
the patches `--apply` sends.

No Kubernetes API server can run here, so `--apply` and `status --live` talk to a local HTTP endpoint
on 127.0.0.1 that records every request and answers like the API server would (a stand-in for the
cluster, the only mock in these tests). The real `kubernetes` client is used, configured from a real
kubeconfig file, so the path, headers and body asserted are what a cluster would receive.
"""
from __future__ import annotations

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from lookalike.deploy import manifest_check as mc
from lookalike.deploy import rollout as ro
from lookalike.cli.main import main

PATH = "/apis/serving.kserve.io/v1beta1/namespaces/lookalike-dev/inferenceservices/lookalike"


# ----------------------------------------------------------------------------------------- transitions

def test_transitions_forward_and_back():
    s = ro.set_version(ro.RolloutState("unset"), "m1", "i1")
    assert (s.model_version, s.index_version, s.canary_percent, s.previous_model_version) == ("m1", "i1", None, None)
    c = ro.canary(s, "m2", 10, "i2")
    assert c.phase == "canary" and c.canary_percent == 10
    assert (c.previous_model_version, c.previous_index_version) == ("m1", "i1")
    c50 = ro.canary(c, "m2", 50, "i2")  # same version again: move the split
    assert c50.canary_percent == 50 and c50.previous_model_version == "m1"
    back = ro.rollback(c50)  # during a canary: previous version, 0% to the newest revision
    assert (back.model_version, back.index_version, back.canary_percent) == ("m1", "i1", 0)
    assert back.phase == "rolled-back" and back.rolled_back_from == "m2"
    p = ro.promote(ro.canary(s, "m2", 10, "i2"))
    assert p.phase == "stable" and p.canary_percent is None and p.previous_model_version == "m1"
    after = ro.rollback(p)  # after a promote: roll the previous version out again, no split
    assert (after.model_version, after.canary_percent) == ("m1", None)
    index_only = ro.canary(s, "m1", 10, "i9")  # a new index of the same model goes through a canary too
    assert (index_only.index_version, index_only.previous_index_version) == ("i9", "i1")
    assert ro.rollback(index_only).index_version == "i1"


@pytest.mark.parametrize("step, message", [
    (lambda: ro.promote(ro.RolloutState("m1")), "no canary to promote"),
    (lambda: ro.rollback(ro.RolloutState("m1")), "no previous version"),
    (lambda: ro.canary(ro.RolloutState("unset"), "m2", 10), "nothing serves yet"),
    (lambda: ro.canary(ro.RolloutState("m1"), "m2", 150), "0 to 100"),
    (lambda: ro.canary(ro.RolloutState("m1"), "../etc", 10), "not a version name"),
    (lambda: ro.canary(ro.RolloutState("m1"), "m1", 10), "already serves all traffic"),
    (lambda: ro.canary(ro.RolloutState("m2", canary_percent=10, previous_model_version="m1"), "m3", 10),
     "promote or roll it back"),
    (lambda: ro.set_version(ro.RolloutState("m2", canary_percent=10, previous_model_version="m1"), "m3"),
     "is running"),
])
def test_refused_steps_say_why(step, message):
    with pytest.raises(ro.RolloutError, match=message):
        step()


# ----------------------------------------------------------------------------------------- manifests

@pytest.fixture
def tree(tmp_path: Path) -> Path:
    dst = tmp_path / "manifests"
    shutil.copytree(mc.repo_root() / "manifests", dst, ignore=shutil.ignore_patterns("schemas"))
    return dst


def predictor_env(report: mc.Report) -> dict:
    isvc = mc.find_object(report.objects, "InferenceService", "lookalike")
    return mc.container_env(isvc["spec"]["predictor"]["containers"][0])


@pytest.mark.parametrize("overlay", ["dev", "production"])
def test_each_step_writes_a_manifest_that_validates(tree, overlay):
    state = ro.read_state(overlay, tree)
    for step in (lambda s: ro.set_version(s, "m1", "i1"), lambda s: ro.canary(s, "m2", 10, "i2"),
                 lambda s: ro.canary(s, "m2", 60, "i2"), ro.promote, ro.rollback):
        state = step(state)
        report = ro.write_state(overlay, state, tree)
        assert report.ok
        assert ro.read_state(overlay, tree) == state
        env = predictor_env(report)
        assert env["STORAGE_URI"] == f"s3://lookalike/models/{state.model_version}/"
        assert (env["LOOKALIKE_MODEL_VERSION"], env["LOOKALIKE_INDEX_VERSION"]) == (state.model_version,
                                                                                    state.index_version)
        isvc = mc.find_object(report.objects, "InferenceService", "lookalike")
        assert isvc["spec"]["predictor"].get("canaryTrafficPercent") == state.canary_percent
    assert state.model_version == "m1" and state.rolled_back_from == "m2"


def test_a_change_that_does_not_validate_leaves_the_file_alone(tree):
    path = ro.rollout_file("dev", tree)
    before = path.read_text()
    # Break the overlay so that any render fails validation, then try a step.
    kust = tree / "overlays/dev/kustomization.yaml"
    kust.write_text(kust.read_text().split("# Copy the rollout annotations")[0])
    with pytest.raises(mc.ManifestError, match="does not validate"):
        ro.write_state("dev", ro.set_version(ro.read_state("dev", tree), "m1"), tree)
    assert path.read_text() == before


# ----------------------------------------------------------------------------------------- --apply

class Recorder(BaseHTTPRequestHandler):
    """Answers like the API server for one InferenceService and records every request."""

    requests: list[dict] = []
    live: dict = {}
    fail_with: int | None = None

    def _answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _record(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        entry = {"method": self.command, "path": self.path,
                 "headers": {k.lower(): v for k, v in self.headers.items()},
                 "body": json.loads(raw) if raw else None}
        type(self).requests.append(entry)
        return entry

    def do_PATCH(self):  # noqa: N802 - http.server's naming
        entry = self._record()
        if self.fail_with:
            return self._answer(self.fail_with, {"kind": "Status", "message": 'inferenceservices "lookalike" not found',
                                                 "code": self.fail_with})
        self._answer(200, {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
                           "metadata": {"name": "lookalike", "namespace": "lookalike-dev",
                                        **{"annotations": entry["body"]["metadata"]["annotations"]}}})

    def do_GET(self):  # noqa: N802
        self._record()
        self._answer(200, type(self).live)

    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture
def cluster(tmp_path):
    Recorder.requests, Recorder.fail_with = [], None
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "local", "cluster": {"server": f"http://127.0.0.1:{server.server_address[1]}"}}],
        "users": [{"name": "operator", "user": {"token": "test-token"}}],
        "contexts": [{"name": "test", "context": {"cluster": "local", "user": "operator"}}],
    }))
    yield str(kubeconfig)
    server.shutdown()
    server.server_close()


def run(tree: Path, kubeconfig: str, *argv: str) -> int:
    return main(["rollout", *argv, "--manifests", str(tree), "--apply", "--kubeconfig", kubeconfig])


def test_apply_sends_the_right_merge_patches(tree, cluster, capsys):
    assert run(tree, cluster, "set", "--model-version", "m1", "--index-version", "i1") == 0
    assert run(tree, cluster, "canary", "--model-version", "m2", "--index-version", "i2", "--percent", "10") == 0
    assert run(tree, cluster, "promote") == 0
    assert run(tree, cluster, "canary", "--model-version", "m3", "--index-version", "i3", "--percent", "25") == 0
    assert run(tree, cluster, "rollback") == 0
    assert [r["method"] for r in Recorder.requests] == ["PATCH"] * 5
    for r in Recorder.requests:
        assert r["path"] == PATH
        assert r["headers"]["content-type"] == "application/merge-patch+json"
        assert r["headers"]["authorization"] == "Bearer test-token"
        assert set(r["body"]) == {"metadata", "spec"} and set(r["body"]["spec"]) == {"predictor"}
    bodies = [r["body"] for r in Recorder.requests]

    def annotations(i):
        return bodies[i]["metadata"]["annotations"]

    def env(i):
        (container,) = bodies[i]["spec"]["predictor"]["containers"]
        assert container["name"] == "kserve-container" and container["image"] == "lookalike/predictor:0.1.0"
        return {e["name"]: e.get("value") for e in container["env"]}

    # set m1: no split; null deletes what the state does not carry.
    assert bodies[0]["spec"]["predictor"]["canaryTrafficPercent"] is None
    assert annotations(0) == {"lookalike.io/model-version": "m1", "lookalike.io/index-version": "i1",
                              "lookalike.io/previous-model-version": None,
                              "lookalike.io/previous-index-version": None, "lookalike.io/rolled-back-from": None}
    assert env(0)["STORAGE_URI"] == "s3://lookalike/models/m1/"
    # canary m2 at 10%: the new version in the container, the old one recorded for rollback.
    assert bodies[1]["spec"]["predictor"]["canaryTrafficPercent"] == 10
    assert annotations(1)["lookalike.io/previous-model-version"] == "m1"
    assert (env(1)["STORAGE_URI"], env(1)["LOOKALIKE_MODEL_VERSION"], env(1)["LOOKALIKE_INDEX_VERSION"]) == (
        "s3://lookalike/models/m2/", "m2", "i2")
    # promote: the split removed (null), the version unchanged.
    assert bodies[2]["spec"]["predictor"]["canaryTrafficPercent"] is None
    assert env(2)["LOOKALIKE_MODEL_VERSION"] == "m2"
    # canary m3 then rollback: back to m2 with 0% to the newest revision.
    assert bodies[3]["spec"]["predictor"]["canaryTrafficPercent"] == 25
    assert bodies[4]["spec"]["predictor"]["canaryTrafficPercent"] == 0
    assert env(4)["STORAGE_URI"] == "s3://lookalike/models/m2/" and env(4)["LOOKALIKE_INDEX_VERSION"] == "i2"
    assert annotations(4)["lookalike.io/rolled-back-from"] == "m3"
    # The whole predictor container is sent (a merge patch replaces lists), exactly as rendered.
    rendered = mc.find_object(mc.render("dev", tree), "InferenceService", "lookalike")
    assert bodies[4]["spec"]["predictor"]["containers"] == rendered["spec"]["predictor"]["containers"]
    assert "patched InferenceService lookalike-dev/lookalike" in capsys.readouterr().out


def test_status_live_reports_the_cluster(tree, cluster, capsys):
    ro.write_state("dev", ro.canary(ro.set_version(ro.read_state("dev", tree), "m1", "i1"), "m2", 20, "i2"), tree)
    Recorder.live = {
        "apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
        "metadata": {"name": "lookalike", "namespace": "lookalike-dev",
                     "annotations": {"lookalike.io/model-version": "m1", "lookalike.io/index-version": "latest"}},
        "spec": {"predictor": {}},
        "status": {"url": "http://lookalike.lookalike-dev.example.com",
                   "conditions": [{"type": "Ready", "status": "True"}],
                   "components": {"predictor": {"traffic": [
                       {"revisionName": "lookalike-predictor-00002", "percent": 20, "latestRevision": True},
                       {"revisionName": "lookalike-predictor-00001", "percent": 80, "tag": "prev"}]}}},
    }
    assert main(["rollout", "status", "--live", "--manifests", str(tree), "--kubeconfig", cluster]) == 0
    out = capsys.readouterr().out
    assert [(r["method"], r["path"]) for r in Recorder.requests] == [("GET", PATH)]
    assert "canary: model m2 index i2 takes 20% of traffic" in out
    assert "ready=True url=http://lookalike.lookalike-dev.example.com" in out
    assert " 20% -> lookalike-predictor-00002 (latest)" in out and " 80% -> lookalike-predictor-00001 (prev)" in out
    assert "DIFFERS from the manifest" in out


def test_apply_error_is_one_clear_line(tree, cluster, capsys):
    Recorder.fail_with = 404
    assert run(tree, cluster, "set", "--model-version", "m1", "--index-version", "i1") == 1
    err = capsys.readouterr().err
    assert "HTTP 404" in err and "deploy the overlay first" in err and "Traceback" not in err


def test_unreachable_cluster_is_one_clear_line_and_the_manifest_stays_written(tree, tmp_path, capsys):
    import socket

    with socket.socket() as sock:  # a loopback port with nothing listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    kubeconfig = tmp_path / "closed"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}]}))
    assert run(tree, str(kubeconfig), "set", "--model-version", "m1", "--index-version", "i1") == 1
    err = capsys.readouterr().err
    assert "cannot reach the cluster" in err and "The manifest is updated" in err and "Traceback" not in err
    assert ro.read_state("dev", tree).model_version == "m1"



def test_a_rollout_pins_the_index_the_model_serves_now(store, tree, capsys):
    """Without --index-version the rollout names the index the model's production alias points at now, so
    every pod serves that one and a rollback restores it; with no store to ask it says what to pass."""
    import numpy as np

    from lookalike.cli.main import main as cli
    from lookalike.core.artifacts import index_repo, new_version
    from lookalike.deploy.rollout import RolloutError, pin_index
    from lookalike.predictor.index import VectorIndex

    model = new_version()
    x = np.eye(4, dtype=np.float32)
    pinned = VectorIndex.build(x, ["a", "b", "c", "d"], model_version=model).publish(store, alias="production")
    VectorIndex.build(x, ["a", "b", "c", "e"], model_version=model).publish(store)  # newer, not production
    assert pin_index(model, None) == pinned == pin_index(model, "latest") != index_repo(store, model).resolve()
    assert pin_index(model, "20990101T000000000Z-abcdef") == "20990101T000000000Z-abcdef"  # named: as named
    assert cli(["rollout", "set", "--model-version", model, "--manifests", str(tree)]) == 0
    assert f"model {model} index {pinned}" in capsys.readouterr().out
    with pytest.raises(RolloutError, match="name it with --index-version"):
        pin_index("no-such-model", None)
