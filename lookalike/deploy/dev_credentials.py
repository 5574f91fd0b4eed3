"""The dev cluster's store credentials, generated, never committed: one random key per unit, written as the
`.env` files the dev overlays' secretGenerators read (and git ignores).

    lookalike manifests dev-secrets          # writes what is missing; --rotate replaces every key

Units and the MinIO user each one gets (the policies are manifests/overlays/dev/minio-*-policy.json):

    minio-root   MinIO's root account: only MinIO and the bucket Job that creates the others use it
    serving      the transformer and predictor: read models/, indexes/ and catalogs/
    pipelines    the Kubeflow pipeline tasks: read catalogs/, write models/ and indexes/ (and their aliases)

The pipelines' key is written twice, the same values, into overlays/dev (the bucket Job creates the user)
and overlays/dev-pipelines (the tasks' Secret in Kubeflow's namespace): kustomize reads no file outside an
overlay's own folder.
"""
from __future__ import annotations

import secrets
from pathlib import Path

CREDENTIALS_DIR = "credentials"
# unit -> (access key name, the overlays whose secretGenerator reads it)
UNITS = {
    "minio-root": ("lookalike-dev-root", ("dev",)),
    "serving": ("lookalike-dev-serving", ("dev",)),
    "pipelines": ("lookalike-dev-pipelines", ("dev", "dev-pipelines")),
}


def credential_files(manifests: Path) -> dict[str, list[Path]]:
    """unit -> the .env files that hold its key."""
    return {unit: [manifests / "overlays" / overlay / CREDENTIALS_DIR / f"{unit}.env" for overlay in overlays]
            for unit, (_, overlays) in UNITS.items()}


def missing(manifests: Path) -> list[Path]:
    return [p for paths in credential_files(manifests).values() for p in paths if not p.is_file()]


def write_dev_credentials(manifests: Path, rotate: bool = False) -> list[Path]:
    """Write a fresh random key for every unit whose files are missing (every unit with `rotate`); return
    the files written. A unit's copies always agree: a missing copy is filled from the one that exists."""
    written = []
    for unit, paths in credential_files(manifests).items():
        existing = next((p for p in paths if p.is_file()), None)
        if existing is not None and not rotate:
            body = existing.read_text()
        else:
            body = (f"AWS_ACCESS_KEY_ID={UNITS[unit][0]}\n"
                    f"AWS_SECRET_ACCESS_KEY={secrets.token_urlsafe(30)}\n")
        for path in paths:
            if rotate or not path.is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(body)
                path.chmod(0o600)
                written.append(path)
    return written
