"""The embedded S3 server, the store's error messages, and versioned artifacts."""
from __future__ import annotations

import subprocess
import sys

import pytest

from lookalike.core.artifacts import (ArtifactError, ChecksumMismatch, VersionNotFound, index_repo, model_repo,
                                       verify_dir)
from lookalike.core.s3 import ObjectStore, S3Settings, StoreError
from lookalike.core.store_server import EmbeddedS3Server, free_port


def _version_dir(tmp_path, name="v", files=None):
    d = tmp_path / name
    (d / "plots").mkdir(parents=True, exist_ok=True)
    for rel, body in (files or {"model.json": b'{"a": 1}', "weights.bin": b"\x00" * 1000,
                                "plots/loss.png": b"png"}).items():
        (d / rel).write_bytes(body)
    return d


def test_put_get_list_delete(store):
    store.put_bytes("a/b.txt", b"hello")
    assert store.get_bytes("a/b.txt") == b"hello"
    assert store.exists("a/b.txt") and not store.exists("a/c.txt")
    assert store.list("a/") == ["a/b.txt"]
    store.delete("a/b.txt")
    assert store.list("a/") == []


def test_objects_survive_a_server_restart(tmp_path):
    data = tmp_path / "data"
    with EmbeddedS3Server(data) as server:
        ObjectStore(server.settings).put_bytes("keep/me.txt", b"still here")
    with EmbeddedS3Server(data) as server:  # a new process on a new port, same folder
        assert ObjectStore(server.settings).get_bytes("keep/me.txt") == b"still here"


def test_store_down_is_one_clear_error():
    settings = S3Settings(endpoint=f"127.0.0.1:{free_port()}")
    with pytest.raises(StoreError, match="does not answer.*lookalike store up"):
        ObjectStore(settings, retries=0).check()


def test_wrong_credentials_are_named(s3_server):
    settings = S3Settings(endpoint=s3_server.settings.endpoint, access_key="lookalike", secret_key="wrong")
    with pytest.raises(StoreError, match="refused the credentials.*LOOKALIKE_S3_SECRET_KEY"):
        ObjectStore(settings).check()


def test_missing_bucket_is_named(s3_server):
    store = ObjectStore(s3_server.settings.with_bucket("no-such-bucket"))
    with pytest.raises(StoreError, match="bucket 'no-such-bucket' does not exist"):
        store.check()
    with pytest.raises(StoreError, match="does not exist"):
        store.get_bytes("x")


def test_settings_from_environment_accept_a_url():
    s = S3Settings.from_env({"LOOKALIKE_S3_ENDPOINT": "https://minio.example:9000", "LOOKALIKE_S3_BUCKET": "b"})
    assert (s.endpoint, s.secure, s.bucket) == ("minio.example:9000", True, "b")
    assert S3Settings.from_env(s.to_env()) == s


def test_publish_then_fetch_round_trip(store, tmp_path):
    repo = model_repo(store)
    version = repo.publish(_version_dir(tmp_path), metadata={"kind": "model"})
    assert repo.versions() == [version]
    manifest = repo.manifest(version)
    assert set(manifest["files"]) == {"model.json", "weights.bin", "plots/loss.png"}
    assert manifest["metadata"] == {"kind": "model"}
    local = repo.fetch(version, tmp_path / "out")
    assert (local / "weights.bin").read_bytes() == b"\x00" * 1000
    assert verify_dir(local)["version"] == version
    assert repo.read_json(version, "model.json") == {"a": 1}


def test_versions_newest_first_and_aliases(store, tmp_path):
    repo = index_repo(store, "m1")
    older = repo.publish(_version_dir(tmp_path), version="20260101T000000Z-aaaaaa")
    newer = repo.publish(_version_dir(tmp_path), version="20260202T000000Z-bbbbbb")
    assert repo.versions() == [newer, older]
    assert repo.resolve("latest") == newer
    repo.set_alias("production", older)
    repo.set_alias("canary", newer)
    assert repo.aliases() == {"production": older, "canary": newer}
    assert repo.resolve("production") == older
    with pytest.raises(VersionNotFound):
        repo.set_alias("production", "20990101T000000Z-nope00")
    with pytest.raises(VersionNotFound, match="neither a complete version nor an alias"):
        repo.resolve("staging")


def test_published_versions_are_never_edited(store, tmp_path):
    repo = model_repo(store)
    version = repo.publish(_version_dir(tmp_path))
    with pytest.raises(ArtifactError, match="already published"):
        repo.publish(_version_dir(tmp_path, "w"), version=version)


def test_interrupted_publish_is_invisible(store, tmp_path, monkeypatch):
    repo = model_repo(store)
    calls = {"n": 0}
    real_put_file = store.put_file

    def failing_put_file(key, path, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # the process dies after the first file went up
            raise StoreError("connection reset")
        return real_put_file(key, path, **kw)

    monkeypatch.setattr(store, "put_file", failing_put_file)
    with pytest.raises(StoreError):
        repo.publish(_version_dir(tmp_path), version="20260101T000000Z-broken")
    assert repo.versions() == []
    assert repo.incomplete_versions() == ["20260101T000000Z-broken"]
    with pytest.raises(VersionNotFound):
        repo.fetch("20260101T000000Z-broken", tmp_path / "x")
    with pytest.raises(VersionNotFound, match="no published version"):
        repo.resolve("latest")


def test_tampered_file_is_refused(store, tmp_path):
    repo = model_repo(store)
    version = repo.publish(_version_dir(tmp_path))
    store.put_bytes(f"models/{version}/weights.bin", b"\x01" * 1000)  # someone overwrites a file
    with pytest.raises(ChecksumMismatch, match="weights.bin .*fails its checksum"):
        repo.fetch(version, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-downloaded is left as a version
    with pytest.raises(ChecksumMismatch):
        repo.read_bytes(version, "weights.bin")


def test_tampered_local_copy_is_refused(store, tmp_path):
    repo = model_repo(store)
    local = repo.fetch(repo.publish(_version_dir(tmp_path)), tmp_path / "mnt-models")
    (local / "model.json").write_text('{"a": 2}')
    with pytest.raises(ChecksumMismatch, match="model.json"):
        verify_dir(local)


def test_cli_store_status_reports_a_down_store(monkeypatch):
    env = {"LOOKALIKE_S3_ENDPOINT": f"127.0.0.1:{free_port()}", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "lookalike.cli.main", "store", "status"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "does not answer" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_store_ls_lists_versions(store, tmp_path, capsys):
    from lookalike.cli.main import main

    version = model_repo(store).publish(_version_dir(tmp_path))
    model_repo(store).set_alias("production", version)
    assert main(["store", "ls"]) == 0
    out = capsys.readouterr().out
    assert version in out and "production" in out


def test_latest_is_the_last_published_even_within_one_second(store, tmp_path):
    repo = model_repo(store)
    published = [repo.publish(_version_dir(tmp_path, f"v{i}")) for i in range(5)]
    assert repo.versions() == published[::-1]
    assert repo.resolve("latest") == published[-1]


def test_processes_fetching_one_version_at_once_all_get_it(store, tmp_path):
    """Shard predictors of one pod (or one machine) start together and fetch the same version into the same
    cache: each gets the verified folder, none fails on another's rename, none deletes what another uses."""
    from concurrent.futures import ThreadPoolExecutor

    repo = model_repo(store)
    version = repo.publish(_version_dir(tmp_path, files={f"part-{i}.bin": bytes([i]) * 50_000 for i in range(12)}))
    dest = tmp_path / "cache" / version
    for _ in range(3):  # the race is a matter of timing: three rounds from an empty cache
        if dest.exists():
            import shutil

            shutil.rmtree(dest)
        with ThreadPoolExecutor(6) as pool:
            folders = list(pool.map(lambda _: repo.fetch(version, dest), range(6)))
        assert folders == [dest] * 6
        want = sorted(["MANIFEST.json", *(f"part-{i}.bin" for i in range(12))])
        assert sorted(p.name for p in dest.iterdir()) == want
        assert not [p for p in dest.parent.iterdir() if p.name.startswith(".")]  # no staging left behind
