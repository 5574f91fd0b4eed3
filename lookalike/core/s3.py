"""The one S3 client of the project: settings from the environment, and an `ObjectStore` that turns
every low-level failure (server down, wrong keys, missing bucket) into a `StoreError` that says what is
wrong and what to do.

Settings (environment variables, all optional for the embedded defaults):

    LOOKALIKE_S3_ENDPOINT    host:port or URL of the S3 server   (default 127.0.0.1:9000)
    LOOKALIKE_S3_ACCESS_KEY  access key                          (default lookalike)
    LOOKALIKE_S3_SECRET_KEY  secret key                          (default lookalike-secret)
    LOOKALIKE_S3_SECURE      "true" for HTTPS                    (default false)
    LOOKALIKE_S3_BUCKET      bucket holding catalogs and artifacts (default lookalike)
    LOOKALIKE_S3_REGION      region                              (default us-east-1)
    LOOKALIKE_S3_PUBLIC_ENDPOINT  URL apps fetch photos from, when it is not the endpoint above
                             (presigned URLs are signed for the host they name; default: the endpoint)

The same code talks to MinIO in a cluster: only these variables change.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from collections.abc import Iterator
from urllib.parse import urlparse

import urllib3
from minio import Minio
from minio.error import InvalidResponseError, S3Error

from lookalike.core.errors import InputError, UnavailableError

DEFAULT_ENDPOINT = "127.0.0.1:9000"
DEFAULT_ACCESS_KEY = "lookalike"
DEFAULT_SECRET_KEY = "lookalike-secret"
DEFAULT_BUCKET = "lookalike"


class StoreError(UnavailableError):
    """The object store cannot do what was asked; the message says what to do about it."""


@dataclass(frozen=True)
class S3Settings:
    endpoint: str = DEFAULT_ENDPOINT
    access_key: str = DEFAULT_ACCESS_KEY
    secret_key: str = DEFAULT_SECRET_KEY
    secure: bool = False
    bucket: str = DEFAULT_BUCKET
    # A fixed region spares a "?location" round trip that some S3 servers (rclone) refuse.
    region: str = "us-east-1"
    public_endpoint: str = ""  # a URL apps reach the store at, for presigned photo URLs ("": the endpoint)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> S3Settings:
        env = os.environ if environ is None else environ
        endpoint = env.get("LOOKALIKE_S3_ENDPOINT", DEFAULT_ENDPOINT)
        secure = env.get("LOOKALIKE_S3_SECURE", "false").strip().lower() in ("1", "true", "yes")
        if "://" in endpoint:  # accept a URL too: its scheme decides `secure`
            parsed = urlparse(endpoint)
            endpoint, secure = parsed.netloc, parsed.scheme == "https"
        return cls(
            endpoint=endpoint,
            access_key=env.get("LOOKALIKE_S3_ACCESS_KEY", DEFAULT_ACCESS_KEY),
            secret_key=env.get("LOOKALIKE_S3_SECRET_KEY", DEFAULT_SECRET_KEY),
            secure=secure,
            bucket=env.get("LOOKALIKE_S3_BUCKET", DEFAULT_BUCKET),
            region=env.get("LOOKALIKE_S3_REGION", "us-east-1"),
            public_endpoint=env.get("LOOKALIKE_S3_PUBLIC_ENDPOINT", "").strip(),
        )

    def to_env(self) -> dict[str, str]:
        """The environment variables that reproduce these settings (for child processes)."""
        return {
            "LOOKALIKE_S3_ENDPOINT": self.endpoint,
            "LOOKALIKE_S3_ACCESS_KEY": self.access_key,
            "LOOKALIKE_S3_SECRET_KEY": self.secret_key,
            "LOOKALIKE_S3_SECURE": "true" if self.secure else "false",
            "LOOKALIKE_S3_BUCKET": self.bucket,
            "LOOKALIKE_S3_REGION": self.region,
            **({"LOOKALIKE_S3_PUBLIC_ENDPOINT": self.public_endpoint} if self.public_endpoint else {}),
        }

    @property
    def url(self) -> str:
        return f"{'https' if self.secure else 'http'}://{self.endpoint}"

    def with_bucket(self, bucket: str) -> S3Settings:
        return replace(self, bucket=bucket)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split `s3://bucket/key` into (bucket, key)."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise InputError(f"not an s3:// URI: {uri!r} (expected s3://BUCKET/KEY)")
    return parsed.netloc, parsed.path.lstrip("/")


class ObjectStore:
    """One bucket of an S3 server. Keys are plain strings ("models/v1/model.json")."""

    def __init__(self, settings: S3Settings | None = None, *, retries: int = 2, timeout_s: float = 10.0):
        self.settings = settings or S3Settings.from_env()
        self.bucket = self.settings.bucket
        # Short timeouts and few retries: a store that is down must fail in seconds, not minutes.
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=min(timeout_s, 3.0), read=timeout_s),
            retries=urllib3.Retry(total=retries, backoff_factor=0.2, status_forcelist=(500, 502, 503, 504)),
            maxsize=16,
        )
        self.client = Minio(
            self.settings.endpoint,
            access_key=self.settings.access_key,
            secret_key=self.settings.secret_key,
            secure=self.settings.secure,
            region=self.settings.region,
            http_client=http,
        )
        self._public: Minio | None = None  # the client that signs URLs for LOOKALIKE_S3_PUBLIC_ENDPOINT

    # ---- health ----------------------------------------------------------------------------
    def check(self, create_bucket: bool = False) -> None:
        """Raise StoreError unless the server answers, the keys are accepted and the bucket exists."""
        try:
            exists = self.client.bucket_exists(self.bucket)
        except Exception as exc:  # noqa: BLE001 - translated into one clear message
            raise self._translate(exc, "reach the bucket") from exc
        if not exists:
            if create_bucket:
                try:
                    self.client.make_bucket(self.bucket)
                except Exception as exc:  # noqa: BLE001
                    raise self._translate(exc, "create the bucket") from exc
            else:
                raise StoreError(
                    f"bucket {self.bucket!r} does not exist on {self.settings.url}: create it "
                    f"(`lookalike store up` does) or set LOOKALIKE_S3_BUCKET to an existing one"
                )

    # ---- objects ---------------------------------------------------------------------------
    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self._call("upload", key, self.client.put_object, self.bucket, key, io.BytesIO(data), len(data),
                   content_type=content_type)

    def put_file(self, key: str, path: str | Path, content_type: str = "application/octet-stream") -> None:
        self._call("upload", key, self.client.fput_object, self.bucket, key, str(path), content_type=content_type)

    def get_bytes(self, key: str) -> bytes:
        response = self._call("download", key, self.client.get_object, self.bucket, key)
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    def get_file(self, key: str, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._call("download", key, self.client.fget_object, self.bucket, key, str(path))
        return path

    def exists(self, key: str) -> bool:
        try:
            self.client.stat_object(self.bucket, key)
            return True
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                return False
            raise self._translate(exc, f"look up {key!r}") from exc
        except Exception as exc:  # noqa: BLE001
            raise self._translate(exc, f"look up {key!r}") from exc

    def list(self, prefix: str = "", recursive: bool = True) -> list[str]:
        """Keys under `prefix` (with recursive=False: also the 'sub-folders', ending in '/')."""
        return list(self.iter(prefix, recursive))

    def iter(self, prefix: str = "", recursive: bool = True) -> Iterator[str]:
        try:
            for obj in self.client.list_objects(self.bucket, prefix=prefix, recursive=recursive):
                yield obj.object_name
        except Exception as exc:  # noqa: BLE001
            raise self._translate(exc, f"list {prefix!r}") from exc

    def delete(self, key: str) -> None:
        self._call("delete", key, self.client.remove_object, self.bucket, key)

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def presigned_url(self, key: str, expires_s: int = 3600) -> str:
        """A URL anyone holding it can GET the object at for `expires_s` seconds (no credentials needed):
        how an app shows a catalog photo. Signed offline (the region is fixed), for the public endpoint when
        one is set. Raises InputError for a lifetime S3 does not accept (1 s to 7 days)."""
        if not 1 <= int(expires_s) <= 7 * 24 * 3600:
            raise InputError(f"a presigned URL lives 1 s to 7 days, not {expires_s} s")
        client = self.client
        if self.settings.public_endpoint:
            if self._public is None:
                parsed = urlparse(self.settings.public_endpoint if "://" in self.settings.public_endpoint
                                  else f"http://{self.settings.public_endpoint}")
                self._public = Minio(parsed.netloc, access_key=self.settings.access_key,
                                     secret_key=self.settings.secret_key, secure=parsed.scheme == "https",
                                     region=self.settings.region)
            client = self._public
        return client.presigned_get_object(self.bucket, key, expires=timedelta(seconds=int(expires_s)))

    # ---- errors ----------------------------------------------------------------------------
    def _call(self, what: str, key: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            raise self._translate(exc, f"{what} {key!r}") from exc

    def _translate(self, exc: Exception, doing: str) -> StoreError:
        where = f"{self.settings.url} (bucket {self.bucket!r})"
        code = getattr(exc, "code", None)
        text = str(exc)
        if isinstance(exc, (urllib3.exceptions.MaxRetryError, urllib3.exceptions.NewConnectionError,
                            ConnectionError, urllib3.exceptions.ProtocolError, TimeoutError)):
            return StoreError(
                f"cannot {doing}: the S3 server at {self.settings.url} does not answer. Start it with "
                f"`lookalike store up`, or point LOOKALIKE_S3_ENDPOINT at a running one"
            )
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch") or "AccessDenied" in text \
                or "InvalidAccessKeyId" in text or "SignatureDoesNotMatch" in text:
            return StoreError(
                f"cannot {doing}: {where} refused the credentials. Check LOOKALIKE_S3_ACCESS_KEY and "
                f"LOOKALIKE_S3_SECRET_KEY (`lookalike store up` prints the right ones)"
            )
        if code == "NoSuchBucket" or "NoSuchBucket" in text:
            return StoreError(
                f"cannot {doing}: bucket {self.bucket!r} does not exist on {self.settings.url}. Create it "
                f"(`lookalike store up` does) or set LOOKALIKE_S3_BUCKET"
            )
        if code in ("NoSuchKey", "NoSuchObject") or "NoSuchKey" in text:
            return StoreError(f"cannot {doing}: no such object in {where}")
        if isinstance(exc, (S3Error, InvalidResponseError)):
            return StoreError(f"cannot {doing}: {where} answered with an error: {text.splitlines()[0]}")
        return StoreError(f"cannot {doing} on {where}: {type(exc).__name__}: {text}")


def connect(settings: S3Settings | None = None, *, check: bool = True, create_bucket: bool = False) -> ObjectStore:
    """An ObjectStore from `settings` (default: the environment), checked to be reachable."""
    store = ObjectStore(settings)
    if check:
        store.check(create_bucket=create_bucket)
    return store
