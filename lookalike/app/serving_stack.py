"""The InferenceService's two halves on one machine: the predictor and the transformer as two KServe model
server processes on loopback ports (REST and gRPC each), started and stopped together, exactly as the two
containers of the InferenceService. `lookalike serve`, `lookalike demo`, the tests and
benchmarks/serving.py all run this one stack.

With `shards=K` (a sharded index version, `lookalike.predictor.index.shards`) the predictor is split as on a
cluster: an embedding predictor on the predictor's ports, K shard predictors on ports of their own, and the
transformer fanning each query vector out to the shards and merging their answers.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from collections.abc import Sequence

from lookalike.core.errors import LookalikeError
from lookalike.core.settings import home

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_NAME = "lookalike"
LOCAL_WAITING = 64  # requests the local transformer lets wait (a pod: 3 per CPU, Knative queues the rest)


class StackError(LookalikeError):
    """The local stack cannot start as asked (a port taken, ...): one line saying what to do."""


class ServingStack:
    """The predictor and the transformer as child processes on loopback ports."""

    def __init__(self, env: dict[str, str] | None = None, *, model_version: str = "production",
                 index_version: str = "latest", ports: dict[str, int] | None = None, log_dir: str | Path | None = None,
                 predictor_args: Sequence[str] = (), transformer_args: Sequence[str] = (), name: str = MODEL_NAME,
                 predictor_timeout_s: float = 10.0, host: str = "127.0.0.1", shards: int = 0):
        from lookalike.core.store_server import free_port

        self.env = dict(os.environ if env is None else env)
        self.name = name
        ports = dict(ports or {})
        self.shards = int(shards)
        shard_ports = [f"shard{i}_{kind}" for i in range(self.shards) for kind in ("http", "grpc")]
        for key in ("predictor_http", "predictor_grpc", "transformer_http", "transformer_grpc", *shard_ports):
            ports.setdefault(key, free_port())
        self.ports = ports
        self.model_version, self.index_version = model_version, index_version
        self.log_dir = Path(log_dir or home() / "logs")
        self.predictor_args, self.transformer_args = list(predictor_args), list(transformer_args)
        self.host = host  # where both servers listen: loopback unless told otherwise
        self.predictor_timeout_s = predictor_timeout_s
        self.predictor: subprocess.Popen | None = None
        self.transformer: subprocess.Popen | None = None
        self.shard_procs: list[subprocess.Popen | None] = [None] * self.shards

    # ---- endpoints ---------------------------------------------------------------------------
    @property
    def endpoints(self) -> dict[str, str]:
        p = self.ports
        h = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        h = f"[{h}]" if ":" in h else h
        return {"transformer_rest": f"http://{h}:{p['transformer_http']}",
                "transformer_grpc": f"{h}:{p['transformer_grpc']}",
                "predictor_rest": f"http://{h}:{p['predictor_http']}",
                "predictor_grpc": f"{h}:{p['predictor_grpc']}",
                **{f"shard{i}_grpc": f"{h}:{p[f'shard{i}_grpc']}" for i in range(self.shards)},
                **{f"shard{i}_rest": f"http://{h}:{p[f'shard{i}_http']}" for i in range(self.shards)}}

    def check_ports(self) -> None:
        """Refuse to start when a port is taken (StackError naming it), before any server starts: a server
        that cannot bind would exit while whatever holds the port answers in its place."""
        for key, port in self.ports.items():
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                # As the servers bind: a port in TIME_WAIT is free, one another socket listens on is not.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind((self.host, port))
                except OSError as exc:
                    raise StackError(f"port {port} ({key.replace('_', ' ')}) on {self.host} is taken "
                                     f"({exc.strerror}): another server is listening there; stop it or choose "
                                     f"other ports") from None

    # ---- processes ---------------------------------------------------------------------------
    def _spawn(self, module: str, args: list[str], log_name: str) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / log_name, "ab")
        try:
            return subprocess.Popen([sys.executable, "-m", f"lookalike.{module}", *args], cwd=REPO_ROOT, env=self.env,
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)  # Ctrl-C reaches us; we stop them in order
        finally:
            log.close()

    def start_predictor(self, timeout_s: float = 180.0) -> None:
        if self.shards:
            self.start_parts(timeout_s)
            return
        p = self.ports
        self.predictor = self._spawn("predictor", [
            "--model_name", self.name, "--http_port", str(p["predictor_http"]), "--grpc_port", str(p["predictor_grpc"]),
            "--host", self.host,
            "--model_version", self.model_version, "--index_version", self.index_version,
            "--enable_latency_logging", "false",
            # Local stacks swap pairs on request (tests, `lookalike serve`); a cluster's predictor keeps it off.
            "--enable_reload_route", *self.predictor_args], "predictor.log")
        self._wait_ready(self.predictor, self.endpoints["predictor_rest"], "predictor", timeout_s)

    def start_parts(self, timeout_s: float = 180.0) -> None:
        """The embedding predictor and every shard predictor (all started, then each waited for)."""
        p = self.ports
        common = ["--model_name", self.name, "--host", self.host, "--model_version", self.model_version,
                  "--index_version", self.index_version, "--enable_latency_logging", "false"]
        if self.predictor is None or self.predictor.poll() is not None:
            self.predictor = self._spawn("predictor.parts", [
                "embed", "--http_port", str(p["predictor_http"]), "--grpc_port", str(p["predictor_grpc"]), *common,
                *self.predictor_args], "predictor.log")
        for i in range(self.shards):
            if self.shard_procs[i] is None or self.shard_procs[i].poll() is not None:
                self.shard_procs[i] = self._spawn("predictor.parts", [
                    "shard", "--shard", str(i), "--http_port", str(p[f"shard{i}_http"]),
                    "--grpc_port", str(p[f"shard{i}_grpc"]), *common,
                    "--enable_reload_route"], f"shard{i}.log")  # swaps on request, as the whole predictor
        self._wait_ready(self.predictor, self.endpoints["predictor_rest"], "predictor", timeout_s)
        for i, proc in enumerate(self.shard_procs):
            self._wait_ready(proc, self.endpoints[f"shard{i}_rest"], f"shard{i}", timeout_s)

    def start_transformer(self, timeout_s: float = 120.0, predictor_host: str | None = None) -> None:
        p = self.ports
        sharded = (["--shard_hosts", ",".join(self.endpoints[f"shard{i}_grpc"] for i in range(self.shards))]
                   if self.shards else [])
        self.transformer = self._spawn("transformer", [
            "--model_name", self.name, "--http_port", str(p["transformer_http"]), "--host", self.host,
            "--grpc_port", str(p["transformer_grpc"]),
            "--predictor_host", predictor_host or self.endpoints["predictor_grpc"],
            "--model_version", self.model_version, "--predictor_timeout", str(self.predictor_timeout_s),
            "--enable_latency_logging", "false",
            # No Knative queue-proxy queues in front of a local stack: the transformer's own queue stands in.
            "--max_waiting", str(LOCAL_WAITING), *sharded, *self.transformer_args], "transformer.log")
        self._wait_ready(self.transformer, self.endpoints["transformer_rest"], "transformer", timeout_s)

    def start(self) -> ServingStack:
        self.check_ports()
        try:
            self.start_predictor()
            self.start_transformer()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, proc: subprocess.Popen, base: str, what: str, timeout_s: float) -> None:
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout_s
        url = f"{base}/v2/models/{self.name}/ready"
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the {what} exited at start (code {proc.returncode}):\n{self.log_tail(what)}")
            try:
                with urllib.request.urlopen(url, timeout=2) as reply:
                    if reply.status == 200 and proc.poll() is None:  # ours answered, not another on the port
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the {what} was not ready within {timeout_s:.0f} s:\n{self.log_tail(what)}")
            time.sleep(0.2)

    def log_tail(self, what: str, lines: int = 30) -> str:
        path = self.log_dir / f"{what}.log"
        if not path.exists():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """Transformer first (no new requests reach the predictor), then the predictor, then the shards."""
        for attr in ("transformer", "predictor"):
            _stop(getattr(self, attr))
            setattr(self, attr, None)
        for i, proc in enumerate(self.shard_procs):
            _stop(proc)
            self.shard_procs[i] = None

    def pids(self) -> dict[str, int | None]:
        return {"predictor": self.predictor.pid if self.predictor else None,
                "transformer": self.transformer.pid if self.transformer else None,
                **{f"shard{i}": p.pid if p else None for i, p in enumerate(self.shard_procs)}}

    def restart_dead(self) -> list[str]:
        """Start again whichever server has exited (the predictor first: the transformer needs it); return
        their names. What a pod's restart policy does in a cluster, for the local stack."""
        restarted = []
        if (self.predictor is not None and self.predictor.poll() is not None) or \
                any(p is not None and p.poll() is not None for p in self.shard_procs):
            self.start_predictor()
            restarted.append("predictor")
        if self.transformer is not None and self.transformer.poll() is not None:
            self.start_transformer()
            restarted.append("transformer")
        return restarted

    def alive(self) -> bool:
        return all(p is not None and p.poll() is None for p in (self.predictor, self.transformer, *self.shard_procs))

    def __enter__(self) -> ServingStack:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
