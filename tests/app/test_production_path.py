"""The production path under fire, on CPU: the predictor micro-batching (`--batching on`, what a GPU runs
by default) behind the transformer, with clients that give up, bodies too large to hold, ports already
taken and parameters no client needs. Real KServe processes on loopback, as in test_serving.py (whose
published pair this module reuses, with a stack of its own)."""
from __future__ import annotations

import socket
import time

import httpx
import numpy as np
import pytest
from test_serving import MODEL, SIZE, _png_bytes, _rest_infer, _server_env, pair  # noqa: F401 - fixture

pytestmark = pytest.mark.slow

MAX_IMAGES, MAX_IMAGE_BYTES = 4, 200_000


@pytest.fixture(scope="module")
def stack(pair, tmp_path_factory):  # noqa: F811 - this module's own stack over the shared pair
    from lookalike.app.serving_stack import ServingStack

    stack = ServingStack(_server_env(pair), log_dir=tmp_path_factory.mktemp("logs"), predictor_timeout_s=5.0,
                         predictor_args=["--batching", "on", "--max_batch", "4"],
                         transformer_args=["--max_images", str(MAX_IMAGES), "--max_image_bytes",
                                           str(MAX_IMAGE_BYTES)])
    try:
        yield stack.start()
    finally:
        stack.stop()


def _grpc_request(n: int = 1):
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

    images = np.random.default_rng(n).normal(size=(n, 3, SIZE, SIZE)).astype(np.float32)
    tensor = pb.ModelInferRequest.InferInputTensor(name="images", datatype="FP32", shape=list(images.shape))
    return pb.ModelInferRequest(model_name=MODEL, inputs=[tensor], raw_input_contents=[images.tobytes()])


def _metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def test_a_burst_of_cancelled_requests_leaves_the_batching_predictor_answering(stack):
    import grpc
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pbg

    channel = grpc.insecure_channel(stack.endpoints["predictor_grpc"])
    stub = pbg.GRPCInferenceServiceStub(channel)
    try:
        stub.ModelInfer(_grpc_request(), timeout=30)  # warm
        for deadline_s in (0.02, 0.002):  # the burst, then one that cancels nearly everything
            calls = [stub.ModelInfer.future(_grpc_request(4), timeout=deadline_s) for _ in range(64)]
            codes = []
            for call in calls:
                try:
                    call.result()
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    codes.append(exc.code())
                    if exc.code() == grpc.StatusCode.UNAVAILABLE:  # refused by a full gate or queue: by design
                        assert "busy" in exc.details() or "queue is full" in exc.details(), exc.details()
            assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED,
                                  grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE}, codes
            started = time.monotonic()
            reply = stub.ModelInfer(_grpc_request(), timeout=5)
            took = time.monotonic() - started
            print(f"burst of 64 at {deadline_s * 1000:g} ms deadlines: {codes.count(grpc.StatusCode.OK)} answered, "
                  f"next request answered in {took * 1000:.0f} ms")
            assert took < 1.0 and reply.outputs
        assert httpx.get(f"{stack.endpoints['predictor_rest']}/v2/health/ready", timeout=5).status_code == 200
        assert httpx.get(f"{stack.endpoints['predictor_rest']}/v2/health/live", timeout=5).status_code == 200
        # The requests whose callers had gone were skipped, not embedded, and the worker lived on.
        assert _metric(stack.endpoints["predictor_rest"], "lookalike_cancelled_total") > 0
        assert "InvalidStateError" not in stack.log_tail("predictor", 400)
        photo = _png_bytes(__import__("PIL.Image").Image.new("RGB", (80, 80), "red"))
        assert _rest_infer(stack.endpoints["transformer_rest"], [photo]).status_code == 200
    finally:
        channel.close()


def _peak_rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_an_800_mb_body_is_refused_before_it_is_read(stack):
    pid = stack.pids()["transformer"]
    before = _peak_rss_mb(pid)
    host, port = stack.endpoints["transformer_rest"].removeprefix("http://").split(":")
    declared = 800 * 1024 * 1024
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {declared}\r\n\r\n".encode())
        sent = 0
        try:  # keep sending until the server answers and closes: it must not wait for 800 MB
            conn.settimeout(0.5)
            while sent < 64 * 1024 * 1024:
                conn.sendall(b"x" * (1 << 20))
                sent += 1 << 20
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass
        conn.settimeout(10)
        answer = conn.recv(65536).decode(errors="replace")
    assert answer.startswith("HTTP/1.1 413"), answer[:200]
    assert "larger than this server accepts" in answer
    # A body with no declared length is counted as it arrives and refused at the cap.
    def stream():
        for _ in range(200):
            yield b"y" * (1 << 20)
    try:
        reply = httpx.post(f"{stack.endpoints['transformer_rest']}/v2/models/{MODEL}/infer", content=stream(),
                           timeout=30)
        assert reply.status_code == 413
    except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError):
        pass  # the server answered 413 and closed while the client was still writing
    growth = _peak_rss_mb(pid) - before
    print(f"800 MB body: 413, transformer peak RSS {before:.0f} MB -> +{growth:.1f} MB")
    assert growth < 100
    photo = _png_bytes(__import__("PIL.Image").Image.new("RGB", (80, 80), "blue"))
    assert _rest_infer(stack.endpoints["transformer_rest"], [photo]).status_code == 200


def _listening_addresses(port: int) -> set[str]:
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hexport = local.rsplit(":", 1)
            if state == "0A" and int(hexport, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


def test_both_servers_listen_on_loopback_only(stack):
    # 127.0.0.1, ::1 and ::ffff:127.0.0.1 (gRPC's IPv4 address on an IPv6 socket), as /proc writes them
    loopback = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}
    for key, port in stack.ports.items():
        addresses = _listening_addresses(port)
        assert addresses and addresses <= loopback, (key, port, addresses)


def test_a_taken_port_is_named_before_anything_starts(pair, tmp_path):  # noqa: F811
    from lookalike.app.serving_stack import ServingStack, StackError
    from lookalike.core.store_server import free_port

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        stack = ServingStack(_server_env(pair), log_dir=tmp_path,
                             ports={"transformer_http": free_port(), "predictor_grpc": port})
        with pytest.raises(StackError, match=f"port {port} \\(predictor grpc\\) on 127.0.0.1 is taken"):
            stack.start()
        assert stack.predictor is None and stack.transformer is None


@pytest.mark.parametrize("params, message", [
    ({"top_k": "²"}, "must be an integer between 1 and 100"),
    ({"top_k": 1000}, "must be between 1 and 100"),
    ({"nprobe": 1 << 20}, "must be between 1 and 1024"),
    ({"filter": "category=" + "z" * 100_000}, "no category is called"),
    ({"box": "0.1," * 50_000}, "parameter 'box' must be"),
])
def test_parameters_no_client_needs_are_clear_400s_that_echo_little(stack, params, message):
    photo = _png_bytes(__import__("PIL.Image").Image.new("RGB", (80, 80), "green"))
    reply = _rest_infer(stack.endpoints["transformer_rest"], [photo], parameters=params)
    assert reply.status_code == 400, reply.text[:300]
    error = reply.json()["error"]
    assert message in error and len(error) < 600
