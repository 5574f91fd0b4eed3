"""Serving end to end: the predictor and the transformer as real KServe processes on free ports, serving a
small model/index pair published to a real S3 server, queried by v2 clients we did not write (KServe's
InferenceRESTClient / InferenceGRPCClient, Triton's tritonclient over HTTP and gRPC), fed every kind of
bad input, and swapped to a new index under a stream of requests.

The pair: tf_efficientnet_lite0 with its packaged ImageNet weights at 64 px (no training: serving does not
care how good the weights are, only that the same photo finds itself), 60 Fashion-MNIST listings embedded
through the transformer's own decoding and preprocessing, so a catalog photo's best match is its own
listing at cosine 1.

Why this file is long: every test here shares one module-scoped published pair and one served stack
(two KServe processes and a real S3 server), which take most of the file's time to set up; split into
several files, each would publish and start its own.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import uuid
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import fresh_bucket
from PIL import Image

from lookalike.core.decoding import decode_image
from lookalike.core.preprocessing import PreprocessSpec, preprocess_batch

MODEL = "lookalike"
SIZE = 64
MAX_IMAGES = 4
MAX_IMAGE_BYTES = 200_000
PREDICTOR_TIMEOUT_S = 2.0


# ---- the published pair and the two servers ------------------------------------------------------

def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _embed_catalog(store, catalog_uri, model_version):
    """Vectors of every catalog image, through the serving decode + preprocessing and the served model."""
    from lookalike.predictor.embedder import Embedder
    from lookalike.core.artifacts import model_repo
    from lookalike.catalogs.rows import Catalog

    model_dir = model_repo(store).fetch(model_version)
    embedder = Embedder.load(model_dir)
    spec = embedder.preprocessing
    catalog = Catalog.open(catalog_uri, store)
    photos = {row.listing_id: catalog.image_bytes(row) for row in catalog.rows}
    batch = preprocess_batch([decode_image(photos[r.listing_id]) for r in catalog.rows], spec)
    vectors, _ = embedder.embed(batch)
    return catalog, photos, vectors


def _publish_index(store, catalog, vectors, model_version, skip: int = 0) -> str:
    from lookalike.predictor.index import VectorIndex

    rows = catalog.rows[skip:]
    tasks = sorted({t for r in rows for t in r.labels})
    labels = {t: [r.labels.get(t) for r in rows] for t in tasks}
    index = VectorIndex.build(vectors[skip:], [r.listing_id for r in rows], labels=labels,
                              model_version=model_version)
    return index.publish(store)


@pytest.fixture(scope="module")
def pair(s3_server, tmp_path_factory):
    """A model version (alias production) and an index version, published to a fresh bucket."""
    from lookalike.core.artifacts import model_repo, new_version
    from lookalike.training.export import export_model, publish_model
    from lookalike.catalogs.importers import import_fashion_mnist
    from lookalike.training.model import ModelConfig, create_model

    cache = tmp_path_factory.mktemp("cache")
    with fresh_bucket(s3_server, "serving", LOOKALIKE_CACHE=str(cache)) as store:
        settings = store.settings
        catalog_uri = import_fashion_mnist(store, split_names=("train",), limit=60, progress=False)["train"]
        from lookalike.catalogs.rows import Catalog

        tasks = Catalog.open(catalog_uri, store).tasks()
        config = ModelConfig(embedding_dim=32, heads={t: tasks[t] for t in ("category", "fine_category")},
                             preprocessing=PreprocessSpec(size=SIZE, resize=72, interpolation="bilinear"))
        out = tmp_path_factory.mktemp("model")
        export_model(create_model(config), config, out, model_version=new_version(), lineage={"catalog": catalog_uri})
        model_version = publish_model(store, out, alias="production")
        catalog, photos, vectors = _embed_catalog(store, catalog_uri, model_version)
        index_version = _publish_index(store, catalog, vectors, model_version)
        assert model_repo(store).resolve("production") == model_version
        yield {"store": store, "settings": settings, "cache": cache, "catalog": catalog, "photos": photos,
               "vectors": vectors, "model_version": model_version, "index_version": index_version}


def _server_env(pair) -> dict[str, str]:
    return {**os.environ, **pair["settings"].to_env(), "LOOKALIKE_CACHE": str(pair["cache"]),
            "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def stack(pair, tmp_path_factory):
    """Predictor + transformer processes for the whole module; always stopped, also when a test fails."""
    from lookalike.app.serving_stack import ServingStack

    stack = ServingStack(_server_env(pair), log_dir=tmp_path_factory.mktemp("logs"),
                         predictor_timeout_s=PREDICTOR_TIMEOUT_S,
                         predictor_args=["--batching", "on", "--refresh_seconds", "1"],
                         transformer_args=["--max_images", str(MAX_IMAGES), "--max_image_bytes", str(MAX_IMAGE_BYTES)])
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


def _ids(pair, n):
    return [r.listing_id for r in pair["catalog"].rows[:n]]


def _rest_infer(url: str, photos: list[bytes], *, parameters=None, model=MODEL, binary=True, timeout=30):
    """A raw v2 REST call (binary extension or JSON base64) - used for the bad-input cases."""
    params = parameters or {}
    if binary:
        sizes, blob = [], b""
        for p in photos:
            sizes.append(len(p))
            blob += struct.pack("<I", len(p)) + p
        header = {"inputs": [{"name": "image", "shape": [len(photos)], "datatype": "BYTES",
                              "parameters": {"binary_data_size": len(blob)}}], "parameters": params}
        head = json.dumps(header).encode()
        return httpx.post(f"{url}/v2/models/{model}/infer", content=head + blob, timeout=timeout,
                          headers={"Inference-Header-Content-Length": str(len(head)),
                                   "Content-Type": "application/octet-stream"})
    body = {"inputs": [{"name": "image", "shape": [len(photos)], "datatype": "BYTES",
                        "data": [base64.b64encode(p).decode() for p in photos]}], "parameters": params}
    return httpx.post(f"{url}/v2/models/{model}/infer", json=body, timeout=timeout)


def _fresh(photo: bytes) -> bytes:
    """The same pixels as new bytes (a PNG with a unique text chunk): a photo no cache has seen."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("nonce", uuid.uuid4().hex)
    buf = io.BytesIO()
    Image.open(io.BytesIO(photo)).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def _metric(url: str, name: str, **labels: str) -> float:
    """One sample of a server's /metrics (0 when it has not been counted yet)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(f"{name}{{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    assert wanted  # a series not counted yet reads 0
    return 0.0


def _matches(response: httpx.Response) -> list[dict]:
    assert response.status_code == 200, response.text
    body = response.json()
    out = next(o for o in body["outputs"] if o["name"] == "matches")
    return [json.loads(d) for d in out["data"]]


# ---- the v2 protocol: health, metadata, inference through both servers over both transports ------

@pytest.mark.slow
def test_health_and_truthful_metadata(stack, pair):
    p = httpx.get(f"{stack.endpoints['predictor_rest']}/v2/models/{MODEL}").json()
    assert p["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 3, SIZE, SIZE]}]
    names = {o["name"]: o["datatype"] for o in p["outputs"]}
    assert names == {"listing_ids": "BYTES", "photo_ids": "BYTES", "scores": "FP32", "label_category": "BYTES",
                     "prob_category": "FP32", "label_fine_category": "BYTES", "prob_fine_category": "FP32"}
    t = httpx.get(f"{stack.endpoints['transformer_rest']}/v2/models/{MODEL}").json()
    assert t["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert {"listing_ids", "photo_ids", "scores", "titles", "categories", "image_uris", "matches",
            "label_category"} <= {
        o["name"] for o in t["outputs"]}
    for endpoint, name in (("transformer_grpc", "image"), ("predictor_grpc", "images")):
        got = triton_grpc(stack.endpoints[endpoint], [])
        assert got["live"] and got["ready"] and got["model_ready"]
        assert got["metadata"]["inputs"][0]["name"] == name
    assert httpx.get(f"{stack.endpoints['transformer_rest']}/v2/health/ready").status_code == 200


@pytest.mark.slow
def test_kserve_rest_and_grpc_clients_find_each_photo_itself(stack, pair):
    from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig

    ids = _ids(pair, 3)
    photos = np.array([pair["photos"][i] for i in ids], dtype=object)

    async def both():
        tensor = InferInput("image", [len(ids)], "BYTES")
        tensor.set_data_from_numpy(photos, binary_data=True)
        rest = InferenceRESTClient(RESTConfig(protocol="v2", retries=0, timeout=30))
        try:
            by_rest = await rest.infer(stack.endpoints["transformer_rest"],
                                       InferRequest(MODEL, [tensor], parameters={"top_k": 3}), model_name=MODEL)
        finally:
            await rest.close()
        tensor = InferInput("image", [len(ids)], "BYTES")
        tensor.set_data_from_numpy(photos, binary_data=True)
        grpc_client = InferenceGRPCClient(stack.endpoints["transformer_grpc"], retries=0, timeout=30)
        try:
            by_grpc = await grpc_client.infer(InferRequest(MODEL, [tensor], parameters={"top_k": 3}))
        finally:
            await grpc_client.close()
        return by_rest, by_grpc

    for response in asyncio.run(both()):
        out = {o.name: o for o in response.outputs}
        got = [[_text(x) for x in row] for row in out["listing_ids"].as_numpy().reshape(len(ids), -1)]
        assert [row[0] for row in got] == ids
        assert all(len(row) == 3 for row in got)
        scores = out["scores"].as_numpy().reshape(len(ids), -1)
        assert np.allclose(scores[:, 0], 1.0, atol=1e-3) and (np.diff(scores, axis=1) <= 1e-6).all()
        titles = [_text(x) for x in out["titles"].as_numpy().reshape(len(ids), -1)[:, 0]]
        assert titles == [pair["catalog"].rows[i].title for i in range(3)]
        cats = [_text(x) for x in out["categories"].as_numpy().reshape(len(ids), -1)[:, 0]]
        assert cats == [pair["catalog"].rows[i].labels["category"] for i in range(3)]
        heads = pair["catalog"].tasks()
        assert all(_text(x) in heads["category"] for x in out["label_category"].as_numpy())
        probs = out["prob_fine_category"].as_numpy()
        assert probs.shape == (3,) and ((probs > 0) & (probs <= 1)).all()
        assert response.id  # kserve 0.21 fails a response without one; we always answer with an id


def _text(value) -> str:
    return value.decode() if isinstance(value, (bytes, np.bytes_)) else str(value)


# tritonclient.grpc and kserve both register the v2 protos (package `inference`) in protobuf's default
# descriptor pool, so they cannot share a process; the Triton gRPC client runs in its own, as a real client
# application would.
_TRITON_GRPC = r"""
import json, sys
import numpy as np
import tritonclient.grpc as g
from tritonclient.utils import InferenceServerException
spec = json.load(sys.stdin)
client = g.InferenceServerClient(spec["url"])
out = {"live": client.is_server_live(), "ready": client.is_server_ready(),
       "model_ready": client.is_model_ready(spec["model"]),
       "metadata": client.get_model_metadata(spec["model"], as_json=True), "calls": []}
for call in spec["calls"]:
    if "unload" in call:
        try:
            client.unload_model(call["unload"])
            out["calls"].append({"ok": True})
        except InferenceServerException as exc:
            out["calls"].append({"ok": False, "status": str(exc.status()), "message": exc.message()})
        continue
    if "fp32" in call:
        arr = np.asarray(call["fp32"]["data"], np.float32).reshape(call["fp32"]["shape"])
        tensor = g.InferInput(call.get("name", "images"), list(arr.shape), "FP32")
    else:
        arr = np.array([bytes.fromhex(h) for h in call["photos"]], dtype=object)
        tensor = g.InferInput(call.get("name", "image"), [len(arr)], "BYTES")
    tensor.set_data_from_numpy(arr)
    try:
        wanted = [g.InferRequestedOutput(name) for name in call.get("outputs", [])] or None
        result = client.infer(call.get("model", spec["model"]), [tensor], parameters=call.get("parameters") or {},
                              outputs=wanted)
    except InferenceServerException as exc:
        out["calls"].append({"ok": False, "status": str(exc.status()), "message": exc.message()})
        continue
    response = result.get_response()
    outputs = {o.name: result.as_numpy(o.name) for o in response.outputs}
    out["calls"].append({"ok": True, "id": response.id,
                         "parameters": {k: v.string_param for k, v in response.parameters.items()},
                         "outputs": {k: [[x.decode() if isinstance(x, bytes) else float(x) for x in np.ravel(v)],
                                         list(v.shape)]
                                     for k, v in outputs.items()}})
print(json.dumps(out))
"""


def triton_grpc(url: str, calls: list[dict]) -> dict:
    """Run Triton's gRPC client against `url` in a separate process; photos travel as hex."""
    spec = {"url": url, "model": MODEL, "calls": [
        {**c, "photos": [p.hex() for p in c["photos"]]} if "photos" in c else c for c in calls]}
    done = subprocess.run([sys.executable, "-c", _TRITON_GRPC], input=json.dumps(spec), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


@pytest.mark.slow
def test_tritonclient_http_and_grpc_binary_and_json(stack, pair):
    import tritonclient.http as httpclient

    ids = _ids(pair, 2)
    # bytes never sent before (same pixels): decoded and embedded, not answered from the cache
    photos = np.array([_fresh(pair["photos"][i]) for i in ids], dtype=object)
    http = httpclient.InferenceServerClient(stack.endpoints["transformer_rest"].removeprefix("http://"))
    tensor = httpclient.InferInput("image", [2], "BYTES")
    tensor.set_data_from_numpy(photos, binary_data=True)
    rid = f"test-{uuid.uuid4().hex[:8]}"
    result = http.infer(MODEL, [tensor], parameters={"top_k": 2}, headers={"x-request-id": rid})
    assert [_text(x) for x in result.as_numpy("listing_ids")[:, 0]] == ids
    # One request id follows the photo through both servers' structured logs and comes back.
    assert result.get_response()["id"] == rid
    for unit in ("transformer", "predictor"):
        lines = [json.loads(line) for line in (stack.log_dir / f"{unit}.log").read_text().splitlines()
                 if line.startswith("{") and rid in line]
        assert lines and lines[0]["unit"] == unit and lines[0]["status"] == 200 and lines[0]["images"] == 2
        assert set(lines[0]["stages_ms"]) == ({"decode", "preprocess", "predict", "postprocess"}
                                              if unit == "transformer" else {"embed", "search"})

    got = triton_grpc(stack.endpoints["transformer_grpc"], [{"photos": list(photos), "parameters": {"top_k": 2}}])
    call = got["calls"][0]
    assert call["ok"], call
    ids_flat, shape = call["outputs"]["listing_ids"]
    assert shape == [2, 2] and [ids_flat[0], ids_flat[2]] == ids
    assert call["parameters"]["index_version"] == pair["index_version"]
    # gRPC calls reached both servers (the transformer calls the predictor over gRPC), yet kserve's
    # per-call "grpc method" lines are dropped: one JSON line per request is the record.
    for unit in ("transformer", "predictor"):
        text = (stack.log_dir / f"{unit}.log").read_text()
        assert '"status":200' in text and "grpc method:" not in text

    # Plain JSON with base64 photos (what a browser or curl sends) works too.
    got = _matches(_rest_infer(stack.endpoints["transformer_rest"], [pair["photos"][ids[0]]], binary=False))
    assert got[0]["matches"][0]["listing_id"] == ids[0]


@pytest.mark.slow
def test_predictor_directly_with_filters(stack, pair):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    rows = pair["catalog"].rows[:2]
    spec = PreprocessSpec(size=SIZE, resize=72, interpolation="bilinear")
    batch = preprocess_batch([decode_image(pair["photos"][r.listing_id]) for r in rows], spec)
    client = httpclient.InferenceServerClient(stack.endpoints["predictor_rest"].removeprefix("http://"))
    tensor = httpclient.InferInput("images", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch, binary_data=True)
    result = client.infer(MODEL, [tensor], parameters={"top_k": 5})
    assert [_text(x) for x in result.as_numpy("listing_ids")[:, 0]] == [r.listing_id for r in rows]

    by_id = {r.listing_id: r.labels for r in pair["catalog"].rows}
    wanted = rows[1].labels["category"]
    result = client.infer(MODEL, [tensor], parameters={"top_k": 5, "filter": f"category={wanted}"})
    found = [_text(x) for x in result.as_numpy("listing_ids").reshape(-1) if _text(x)]
    assert found and all(by_id[lid]["category"] == wanted for lid in found)

    result = client.infer(MODEL, [tensor], parameters={"top_k": 5, "filter": "category=predicted"})
    predicted = [_text(x) for x in result.as_numpy("label_category")]
    for row, label in zip(result.as_numpy("listing_ids"), predicted):
        assert all(by_id[_text(x)]["category"] == label for x in row if _text(x))

    # A label no listing can carry is the client's mistake, said with the labels there are (not an empty 200).
    with pytest.raises(InferenceServerException, match=r"\[400\] no category is called 'no-such-category': "
                                                       r"the category labels are bags"):
        client.infer(MODEL, [tensor], parameters={"top_k": 5, "filter_category": "no-such-category"})

    # FP16, as the transformer sends it: the same matches, scores within FP16's rounding.
    half = httpclient.InferInput("images", list(batch.shape), "FP16")
    half.set_data_from_numpy(batch.astype(np.float16), binary_data=True)
    halved = client.infer(MODEL, [half], parameters={"top_k": 5})
    full = client.infer(MODEL, [tensor], parameters={"top_k": 5})
    assert np.array_equal(halved.as_numpy("listing_ids")[:, 0], full.as_numpy("listing_ids")[:, 0])
    assert np.abs(halved.as_numpy("scores") - full.as_numpy("scores")).max() < 1e-3
    wrong = httpclient.InferInput("images", list(batch.shape), "FP64")
    wrong.set_data_from_numpy(batch.astype(np.float64), binary_data=True)
    with pytest.raises(Exception, match="FP32 or FP16"):
        client.infer(MODEL, [wrong])

    # The same pixels over gRPC (Triton's client), in FP32.
    got = triton_grpc(stack.endpoints["predictor_grpc"], [
        {"fp32": {"shape": list(batch.shape), "data": batch.ravel().tolist()}, "parameters": {"top_k": 3}}])
    ids_flat, shape = got["calls"][0]["outputs"]["listing_ids"]
    assert shape == [2, 3] and [ids_flat[0], ids_flat[3]] == [r.listing_id for r in rows]


@pytest.mark.slow
def test_exif_orientation_is_applied(stack, pair):
    lid = _ids(pair, 1)[0]
    upright = decode_image(pair["photos"][lid]).resize((112, 112))
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view": the stored pixels are the upright photo turned 90 CCW
    upright.transpose(Image.Transpose.ROTATE_90).save(buf, format="JPEG", quality=95, exif=exif)
    got = _matches(_rest_infer(stack.endpoints["transformer_rest"], [buf.getvalue()], parameters={"top_k": 3}))
    assert lid in [m["listing_id"] for m in got[0]["matches"]]


# ---- bad input: each gets a clear v2 error with the right status, and the server keeps serving -----

def _bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (the classic decompression bomb)."""
    raw = zlib.compress(b"\x00" * 64)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def _noise_png(side: int) -> bytes:
    rng = np.random.default_rng(0)
    return _png_bytes(Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)))


@pytest.mark.slow
def test_bad_input_gets_clear_status_and_server_keeps_serving(stack, pair):
    url = stack.endpoints["transformer_rest"]
    good = pair["photos"][_ids(pair, 1)[0]]
    cases = [
        ("corrupt", [b"\xff\xd8\xff\xe0" + os.urandom(300)], {}, 400, "corrupt"),
        ("truncated", [good[: len(good) // 2]], {}, 400, "corrupt or truncated"),
        ("empty", [b""], {}, 400, "empty"),
        ("not an image", [b"%PDF-1.4 this is a document, not a photo"], {}, 400, "send one of JPEG, PNG"),
        ("decompression bomb", [_bomb_png(30_000, 30_000)], {}, 413, "pixels"),
        ("huge side", [_bomb_png(13_000, 10)], {}, 413, "per side"),
        ("too many bytes", [_noise_png(300)], {}, 413, "bytes; the limit"),
        ("too many images", [good] * (MAX_IMAGES + 1), {}, 413, f"the limit is {MAX_IMAGES}"),
        ("bad top_k", [good], {"top_k": 0}, 400, "top_k"),
        ("unknown filter task", [good], {"filter": "colour=red"}, 400, "cannot filter on 'colour'"),
    ]
    for what, photos, params, status, text in cases:
        response = _rest_infer(url, photos, parameters=params)
        assert response.status_code == status, (what, response.text)
        error = response.json()["error"]
        assert text in error, (what, error)
        assert "Traceback" not in response.text
        assert _matches(_rest_infer(url, [good]))[0]["matches"], f"server stopped serving after {what}"

    infer = f"{url}/v2/models/{MODEL}/infer"
    tensor_cases = [
        ("wrong tensor name", {"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": ["eA=="]}]},
         400, "expected one input tensor named 'image'"),
        ("wrong datatype", {"inputs": [{"name": "image", "shape": [1], "datatype": "FP32", "data": [1.0]}]},
         400, "datatype BYTES"),
        ("wrong shape", {"inputs": [{"name": "image", "shape": [1, 2], "datatype": "BYTES", "data": ["eA==", "eA=="]}]},
         400, "shape [N] or [N, 1]"),
        ("no inputs", {"inputs": []}, 400, "expected one input tensor"),
    ]
    for what, body, status, text in tensor_cases:
        response = httpx.post(infer, json=body, timeout=30)
        assert response.status_code == status, (what, response.text)
        assert text in response.json()["error"], (what, response.text)
    response = httpx.post(infer, content=b"{not json", headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 400 and "not a KServe v2 inference request" in response.json()["error"]
    head = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": 999}}]}).encode()
    response = httpx.post(infer, content=head + b"abc", timeout=30, headers={
        "Inference-Header-Content-Length": str(len(head)), "content-type": "application/octet-stream"})
    assert response.status_code == 400 and "binary_data_size=999" in response.json()["error"]
    response = httpx.post(f"{url}/v2/models/nope/infer", json=tensor_cases[0][1], timeout=30)
    assert response.status_code == 404 and "nope" in response.json()["error"]

    # The same over gRPC: statuses map to gRPC codes, messages are the same.
    cases = [([b"garbage bytes"], "INVALID_ARGUMENT", "not an image"),
             ([good] * (MAX_IMAGES + 1), "RESOURCE_EXHAUSTED", "the limit is"),
             ([_bomb_png(30_000, 30_000)], "RESOURCE_EXHAUSTED", "pixels")]
    got = triton_grpc(stack.endpoints["transformer_grpc"],
                      [{"photos": photos} for photos, _, _ in cases] + [{"photos": [good], "model": "nope"},
                                                                       {"photos": [good]}])
    for (_, code, text), call in zip(cases, got["calls"]):
        assert not call["ok"] and code in call["status"] and text in call["message"], call
    assert "NOT_FOUND" in got["calls"][3]["status"]
    assert got["calls"][4]["ok"]

    # The predictor checks its own input: a tensor at another size is refused with the size it needs.
    response = httpx.post(f"{stack.endpoints['predictor_rest']}/v2/models/{MODEL}/infer", timeout=30, json={
        "inputs": [{"name": "images", "shape": [1, 3, 8, 8], "datatype": "FP32", "data": [0.0] * 192}]})
    assert response.status_code == 400 and f"[N, 3, {SIZE}, {SIZE}]" in response.json()["error"]

    metrics = httpx.get(f"{url}/metrics").text
    assert 'lookalike_errors_total{kind="too_large",unit="transformer"}' in metrics
    assert 'lookalike_stage_seconds_count{stage="decode",unit="transformer"}' in metrics
    assert 'stage="embed",unit="predictor"' in httpx.get(f"{stack.endpoints['predictor_rest']}/metrics").text


@pytest.mark.slow
def test_hostile_clients_find_only_inference_and_health(stack, pair):
    """The findings of a hostile-client pass: each gets a clean v2 answer and the server keeps serving."""
    url, good = stack.endpoints["transformer_rest"], pair["photos"][_ids(pair, 1)[0]]
    infer = f"{url}/v2/models/{MODEL}/infer"
    # The model-repository extension is not public: nobody can unload (or list, or load) the model.
    for route in ("/v2/repository/models/lookalike/unload", "/v2/repository/models/lookalike/load",
                  "/v2/repository/index", "/v1/models/lookalike:predict", "/docs", "/openapi.json"):
        response = httpx.post(f"{url}{route}", timeout=30)
        assert response.status_code == 404 and "not a route of this server" in response.json()["error"], route
    unload = httpx.post(f"{stack.endpoints['predictor_rest']}/v2/repository/models/{MODEL}/unload", timeout=30)
    assert unload.status_code == 404  # not even on the predictor's cluster-internal port
    got = triton_grpc(stack.endpoints["transformer_grpc"], [{"unload": MODEL}, {"photos": [good]}])
    assert not got["calls"][0]["ok"] and "not available on this server" in got["calls"][0]["message"]
    assert got["calls"][1]["ok"] and httpx.get(f"{url}/v2/health/ready").status_code == 200
    # Wrong method on a known route: a v2 error, not FastAPI's {"detail": ...}.
    response = httpx.get(infer, timeout=30)
    assert response.status_code == 405 and "error" in response.json()
    # Ids a client chooses travel on as gRPC metadata: anything but plain ASCII is replaced, not a 500.
    for rid in ("caf\u00e9-\u2603", "x" * 5000, "a\tb"):
        body = {"id": rid, "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                       "data": [base64.b64encode(good).decode()]}]}
        response = httpx.post(infer, json=body, timeout=30)
        assert response.status_code == 200, (rid[:20], response.text)
    response = httpx.post(infer, json={"inputs": []}, headers={"x-request-id": "trace-42"}, timeout=30)
    assert response.status_code == 400 and response.json()["request_id"] == "trace-42"
    # A binary header whose shape is not a list, then a good request on the same keep-alive connection.
    with httpx.Client(timeout=30) as client:
        head = json.dumps({"inputs": [{"name": "image", "shape": 1, "datatype": "BYTES",
                                       "parameters": {"binary_data_size": 4 + len(good)}}]}).encode()
        response = client.post(infer, content=head + struct.pack("<I", len(good)) + good, headers={
            "Inference-Header-Content-Length": str(len(head)), "content-type": "application/octet-stream"})
        assert response.status_code == 400 and "shape" in response.json()["error"]
        body = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                            "data": [base64.b64encode(good).decode()]}], "parameters": {"top_k": 3}}
        # A JSON body without Content-Type (tritonclient.http with binary_data=False sends this) is JSON.
        response = client.post(infer, content=json.dumps(body).encode())
        assert len(_matches(response)[0]["matches"]) == 3
    # Requested outputs are honoured, and an unknown one is refused, over REST as over gRPC.
    body["outputs"] = [{"name": "listing_ids"}]
    assert [o["name"] for o in httpx.post(infer, json=body, timeout=30).json()["outputs"]] == ["listing_ids"]
    body["outputs"] = [{"name": "nonsense"}]
    assert httpx.post(infer, json=body, timeout=30).status_code == 400
    got = triton_grpc(stack.endpoints["transformer_grpc"], [{"photos": [good], "outputs": ["scores"]},
                                                             {"photos": [good], "parameters": {"top_k": 2.0}}])
    assert got["calls"][0]["ok"] and list(got["calls"][0]["outputs"]) == ["scores"], got["calls"][0]
    assert got["calls"][1]["outputs"]["listing_ids"][1] == [1, 2], got["calls"][1]  # a double top_k is read
    # An unknown filter value says which labels there are; a label in another case is the same label.
    response = _rest_infer(url, [good], parameters={"filter": "category=spaceships"})
    assert response.status_code == 400 and "the category labels are" in response.json()["error"]
    assert _matches(_rest_infer(url, [good], parameters={"filter": "category=TOPS"}))[0]["matches"]
    # Every answer above is counted by status, and the pair served is a metric.
    metrics = httpx.get(f"{url}/metrics").text
    assert 'lookalike_responses_total{status="400",unit="transformer"}' in metrics
    assert f'lookalike_serving_info{{index_version="{pair["index_version"]}",model_version="{pair["model_version"]}"' \
           in metrics


@pytest.mark.slow
def test_predictor_slow_is_504_and_down_is_503(stack, pair, tmp_path):
    from lookalike.app.serving_stack import ServingStack
    from lookalike.core.store_server import free_port

    url = stack.endpoints["transformer_rest"]
    good = pair["photos"][_ids(pair, 1)[0]]
    os.kill(stack.predictor.pid, signal.SIGSTOP)  # a real predictor that stops answering
    try:
        started = time.monotonic()
        response = _rest_infer(url, [good])
        assert response.status_code == 504, response.text
        assert "did not answer within" in response.json()["error"]
        assert time.monotonic() - started < PREDICTOR_TIMEOUT_S + 5
    finally:
        os.kill(stack.predictor.pid, signal.SIGCONT)
    assert _matches(_rest_infer(url, [good]))[0]["matches"]

    lonely = ServingStack(_server_env(pair), log_dir=tmp_path, predictor_timeout_s=PREDICTOR_TIMEOUT_S)
    try:
        lonely.start_transformer(predictor_host=f"127.0.0.1:{free_port()}")  # nothing listens there
        for _ in range(2):  # and it keeps answering, clearly
            response = _rest_infer(lonely.endpoints["transformer_rest"], [good])
            assert response.status_code == 503, response.text
            assert "not reachable" in response.json()["error"]
    finally:
        lonely.stop()


# ---- fast paths: repeated photos, search by listing --------------------------------------------------

@pytest.mark.slow
def test_a_repeated_photo_is_answered_from_the_predictor_s_cache(stack, pair):
    url, predictor = stack.endpoints["transformer_rest"], stack.endpoints["predictor_rest"]
    photo = _fresh(pair["photos"][_ids(pair, 3)[2]])
    hits = _metric(predictor, "lookalike_cache_lookups_total", unit="predictor", cache="answer", result="hit")
    first = _matches(_rest_infer(url, [photo], parameters={"top_k": 3}))
    again = _matches(_rest_infer(url, [photo], parameters={"top_k": 3}))
    assert again == first
    assert _metric(predictor, "lookalike_cache_lookups_total", unit="predictor", cache="answer",
                   result="hit") == hits + 1
    # another top_k is another answer (from the embedding kept: no decode, no model)
    five = _matches(_rest_infer(url, [photo], parameters={"top_k": 5}))
    assert len(five[0]["matches"]) == 5 and five[0]["matches"][:3] == first[0]["matches"]
    assert _metric(predictor, "lookalike_cache_lookups_total", unit="predictor", cache="embedding", result="hit") >= 1
    lines = [json.loads(line) for line in (stack.log_dir / "transformer.log").read_text().splitlines()
             if line.startswith("{") and '"query":"cached photo"' in line]
    assert lines and set(lines[-1]["stages_ms"]) == {"predict", "postprocess"}  # nothing decoded


def _by_listing(url: str, listing_ids: list[str], photo_ids: list[str] | None = None, **parameters):
    inputs = [{"name": "listing_id", "shape": [len(listing_ids)], "datatype": "BYTES", "data": listing_ids}]
    if photo_ids is not None:
        inputs.append({"name": "photo_id", "shape": [len(photo_ids)], "datatype": "BYTES", "data": photo_ids})
    return httpx.post(f"{url}/v2/models/{MODEL}/infer", json={"inputs": inputs, "parameters": parameters},
                      timeout=30)


@pytest.mark.slow
def test_search_by_listing_over_rest_and_grpc_leaves_the_listing_out(stack, pair):
    url = stack.endpoints["transformer_rest"]
    ids = [r.listing_id for r in pair["catalog"].rows]
    vectors = pair["vectors"]
    expected = {}
    for i in (0, 5):  # the nearest other listings by the stored vectors, exactly
        order = [j for j in np.argsort(-(vectors @ vectors[i]), kind="stable") if j != i]
        expected[ids[i]] = [ids[j] for j in order[:4]]
    docs = _matches(_by_listing(url, [ids[0], ids[5]], top_k=4))
    assert [[m["listing_id"] for m in d["matches"]] for d in docs] == [expected[ids[0]], expected[ids[5]]]
    row = pair["catalog"].rows[0]
    assert docs[0]["labels"]["category"] == {"label": row.labels["category"], "probability": 1.0}
    # naming the photo ("0": the only one here) answers the same; over gRPC too
    assert _matches(_by_listing(url, [ids[0]], ["0"], top_k=4))[0]["matches"] == docs[0]["matches"]
    got = triton_grpc(stack.endpoints["transformer_grpc"], [
        {"photos": [ids[5].encode()], "name": "listing_id", "parameters": {"top_k": 4}},
        {"photos": [b"no-such-listing"], "name": "listing_id"}])
    ok, unknown = got["calls"]
    assert ok["ok"] and ok["outputs"]["listing_ids"][0] == expected[ids[5]]
    assert not unknown["ok"] and unknown["status"] == "StatusCode.NOT_FOUND" and "no-such-listing" in unknown["message"]
    # an unknown listing or photo is a 404 naming it; a box has nothing to cut
    for response, words in ((_by_listing(url, ["no-such-listing"]), "no-such-listing"),
                            (_by_listing(url, [ids[0]], ["7"]), "'7'"),
                            (_by_listing(url, [ids[0]], box="0,0,0.5,0.5"), "box"),
                            (_by_listing(url, [""]), "listing_id")):
        assert response.status_code in (400, 404) and words in response.json()["error"], response.text
    assert _by_listing(url, ["no-such-listing"]).status_code == 404


# ---- the in-process service: micro-batching and swapping ------------------------------------------

@pytest.mark.slow
def test_micro_batched_answers_equal_direct_ones_and_survive_a_swap(pair):
    from concurrent.futures import ThreadPoolExecutor

    from lookalike.predictor.service import SearchService, ServingPair

    first = ServingPair.from_store(pair["store"], pair["model_version"], pair["index_version"])
    service = SearchService(first, max_batch=4, batching=True)
    spec = first.embedder.preprocessing
    rows = pair["catalog"].rows[:12]
    batches = [preprocess_batch([decode_image(pair["photos"][r.listing_id])], spec) for r in rows]
    direct = [service.search(b, top_k=3) for b in batches]
    sizes = []
    service.batcher.on_batch = sizes.append
    try:
        with ThreadPoolExecutor(6) as pool:
            futures = [service.submit(b, top_k=3) for b in batches]  # queued together: batched
            second = ServingPair.from_store(pair["store"], pair["model_version"], pair["index_version"])
            swap = pool.submit(service.swap, second)
            later = [pool.submit(lambda b=b: service.submit(b, top_k=3).result()) for b in batches]
            got = [f.result(timeout=60) for f in futures]
            got_later = [f.result(timeout=60) for f in later]
            swap.result()
    finally:
        service.close()
    for want, have, after, row in zip(direct, got, got_later, rows):
        assert have.listing_ids == want.listing_ids == after.listing_ids and have.listing_ids[0][0] == row.listing_id
        assert np.allclose(have.scores, want.scores, atol=1e-5)
        assert have.labels == want.labels
    assert max(sizes) > 1 and sum(sizes) == 2 * len(rows)  # some requests really shared a batch
    assert service.pair is second and service.swaps == 1


@pytest.mark.slow
def test_onnx_requests_side_by_side_answer_like_one_at_a_time(pair):
    """Overlapping requests run on the single-threaded session, a lone one on the wide one: same answers."""
    from concurrent.futures import ThreadPoolExecutor

    from lookalike.predictor.embedder import Embedder
    from lookalike.core.artifacts import model_repo

    embedder = Embedder.load(model_repo(pair["store"]).fetch(pair["model_version"]), "onnxruntime", threads=2)
    spec = embedder.preprocessing
    batches = [preprocess_batch([decode_image(pair["photos"][r.listing_id])], spec) for r in pair["catalog"].rows[:8]]
    alone = [embedder.embed(b) for b in batches]
    assert embedder._run.runs == {"wide": len(batches), "narrow": 0}
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(embedder.embed, batches * 6))
    assert embedder._run.runs["narrow"] > 0  # some really overlapped
    for (e1, p1), (e2, p2) in zip(alone * 6, together):
        assert np.abs(e1 - e2).max() < 1e-5 and all(np.abs(p1[t] - p2[t]).max() < 1e-5 for t in p1)
    assert embedder.batch_gain(2, seconds=0.1) > 0


@pytest.mark.slow
def test_torch_fallback_embeds_like_onnx_runtime(pair):
    from lookalike.predictor.embedder import Embedder
    from lookalike.core.artifacts import model_repo

    model_dir = model_repo(pair["store"]).fetch(pair["model_version"])
    onnx, torch_ = Embedder.load(model_dir, "onnxruntime"), Embedder.load(model_dir, "torch")
    assert (onnx.backend, torch_.backend) == ("onnxruntime", "torch")
    spec = onnx.preprocessing
    batch = preprocess_batch([decode_image(pair["photos"][r.listing_id]) for r in pair["catalog"].rows[:3]], spec)
    (e1, p1), (e2, p2) = onnx.embed(batch), torch_.embed(batch)
    assert np.abs(e1 - e2).max() < 1e-4 and all(np.abs(p1[t] - p2[t]).max() < 1e-4 for t in p1)
    with pytest.raises(ValueError, match=r"\[N, 3, 64, 64\]"):
        onnx.embed(batch[:, :, :32, :32])


@pytest.mark.slow
def test_local_model_dir_like_mnt_models_is_verified_and_matched(pair, tmp_path):
    """What KServe's storage initializer leaves in /mnt/models: model/ and index/ version folders."""
    from lookalike.predictor.index import VectorIndex
    from lookalike.predictor.service import SearchService, ServingPair
    from lookalike.core.artifacts import ArtifactError, index_repo, model_repo

    mnt = tmp_path / "mnt" / "models"
    shutil.copytree(model_repo(pair["store"]).fetch(pair["model_version"]), mnt / "model")
    shutil.copytree(index_repo(pair["store"], pair["model_version"]).fetch(pair["index_version"]), mnt / "index")
    served = ServingPair.from_dir(mnt)
    assert (served.model_version, served.index_version) == (pair["model_version"], pair["index_version"])
    row = pair["catalog"].rows[5]
    spec = served.embedder.preprocessing
    found = SearchService(served, batching=False).search(
        preprocess_batch([decode_image(pair["photos"][row.listing_id])], spec), top_k=2)
    assert found.listing_ids[0][0] == row.listing_id

    other = tmp_path / "other"  # an index built for another model is refused
    shutil.copytree(mnt / "model", other / "model")
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((20, served.embedder.embedding_dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    VectorIndex.build(vectors, [f"x{i}" for i in range(20)], model_version="another-model").save(other / "index")
    with pytest.raises(Exception, match="another-model"):
        ServingPair.from_dir(other)

    onnx = mnt / "model" / "model.onnx"  # a tampered file fails its checksum
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum"):
        ServingPair.from_dir(mnt)


# ---- swapping the index under load -----------------------------------------------------------------

def _stream_through(stack, pair, swap, key: str, new_value: str, clients: int = 3) -> list[str]:
    """Query the transformer from `clients` threads while `swap()` runs; every answer must be right.

    Returns the `key` response parameter of every answer, in completion order, once `new_value` shows.
    """
    url = stack.endpoints["transformer_rest"]
    lids = _ids(pair, 4)
    seen, failures, stop = [], [], threading.Event()

    def client(k: int) -> None:
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                lid = lids[k % len(lids)]
                body = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                    "data": [base64.b64encode(pair["photos"][lid]).decode()]}]}
                r = http.post(f"{url}/v2/models/{MODEL}/infer", json=body)
                if r.status_code != 200:
                    failures.append(r.text)
                    continue
                doc = r.json()
                matches = json.loads(next(o for o in doc["outputs"] if o["name"] == "matches")["data"][0])
                if matches["matches"][0]["listing_id"] != lid:
                    failures.append(f"wrong top match for {lid}")
                seen.append(doc["parameters"][key])

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 60  # every client answered before the swap, however busy the machine
        while len(seen) < clients and not failures and time.monotonic() < deadline:
            time.sleep(0.05)
        swap()
        deadline = time.monotonic() + 30
        while new_value not in seen[-clients:] and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not failures, failures[:3]
    assert seen and seen[-1] == new_value
    return seen


def _reload(stack) -> None:
    reload = httpx.post(f"{stack.endpoints['predictor_rest']}/v2/repository/models/{MODEL}/load", timeout=120)
    assert reload.status_code == 200, reload.text


@pytest.mark.slow
def test_index_swap_under_a_stream_of_requests_fails_none(stack, pair):
    new_version = _publish_index(pair["store"], pair["catalog"], pair["vectors"], pair["model_version"])
    assert new_version != pair["index_version"]
    seen = _stream_through(stack, pair, lambda: _reload(stack), "index_version", new_version)
    assert pair["index_version"] in seen
    first_new = seen.index(new_version)
    assert pair["index_version"] not in seen[first_new + 3:]  # once swapped, the old index is gone


@pytest.mark.slow
def test_model_swap_to_another_input_size_is_followed_by_the_transformer(stack, pair, tmp_path):
    """A new model version (48 px, other preprocessing) and its index replace the pair under load when the
    production alias moves; the transformer learns the new preprocessing from the new model's model.json
    and no request fails."""
    from lookalike.core.artifacts import model_repo, new_version
    from lookalike.training.export import export_model, publish_model
    from lookalike.training.model import ModelConfig, create_model

    config = ModelConfig(embedding_dim=24, heads={"category": pair["catalog"].tasks()["category"]},
                         preprocessing=PreprocessSpec(size=48, resize=48, crop="none", interpolation="bicubic"))
    export_model(create_model(config), config, tmp_path, model_version=new_version(),
                 lineage={"catalog": pair["catalog"].uri})
    new_model = publish_model(pair["store"], tmp_path)  # not yet production
    catalog, _, vectors = _embed_catalog(pair["store"], pair["catalog"].uri, new_model)
    _publish_index(pair["store"], catalog, vectors, new_model)

    def swap():  # only the alias moves: the predictor notices by itself (it polls every second here)
        model_repo(pair["store"]).set_alias("production", new_model)

    seen = _stream_through(stack, pair, swap, "model_version", new_model)
    assert pair["model_version"] in seen
    meta = httpx.get(f"{stack.endpoints['predictor_rest']}/v2/models/{MODEL}").json()
    assert meta["inputs"][0]["shape"] == [-1, 3, 48, 48]
    assert {o["name"] for o in meta["outputs"]} == {"listing_ids", "photo_ids", "scores", "label_category",
                                                    "prob_category"}


# ---- the command line: lookalike query and lookalike serve -----------------------------------------

def _lookalike(*args: str, env: dict, timeout: float = 120):
    return subprocess.run([_lookalike_bin(), *args], env=env, capture_output=True, text=True, timeout=timeout)


def _lookalike_bin() -> str:
    beside = Path(sys.executable).parent / "lookalike"
    return str(beside) if beside.exists() else shutil.which("lookalike")


@pytest.mark.slow
def test_lookalike_query_prints_matches_and_writes_html(stack, pair, tmp_path):
    lid = _ids(pair, 1)[0]
    photo = tmp_path / "photo.png"
    photo.write_bytes(pair["photos"][lid])
    page = tmp_path / "out" / "results.html"
    done = _lookalike("query", str(photo), "--top-k", "3", "--url", stack.endpoints["transformer_rest"],
                      "--html", str(page), env=_server_env(pair))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    first = next(i for i, line in enumerate(lines) if line.strip().startswith("1 "))
    assert lid in lines[first] and "1.000" in lines[first]
    assert pair["catalog"].rows[0].title in lines[first]
    html = page.read_text()
    assert html.count("data:image/png;base64,") == 4  # the photo and its three matches, inlined

    # --json for programs; --box searches only part of the photo (the whole of it here: the same answer,
    # a corner of it: another one), and a box that is not four fractions is the client's mistake.
    url = stack.endpoints["transformer_rest"]
    runs = {box: _lookalike("query", str(photo), "--top-k", "3", "--url", url, "--json", *(["--box", box] if box
                            else []), env=_server_env(pair)) for box in ("", "0,0,1,1", "0,0,0.3,0.3")}
    got = {box: json.loads(done.stdout) for box, done in runs.items()}
    ids = {box: [m["listing_id"] for m in docs[0]["matches"]] for box, docs in got.items()}
    assert got[""][0]["photo"] == str(photo) and ids[""][0] == lid and ids["0,0,1,1"] == ids[""]
    assert ids["0,0,0.3,0.3"] != ids[""]
    done = _lookalike("query", str(photo), "--url", url, "--box", "0.5,0.5,0.2,0.9", env=_server_env(pair))
    assert done.returncode == 1 and "answered 400" in done.stderr and "box" in done.stderr

    # --listing: "more like this" for a listing in the index, without a photo
    done = _lookalike("query", "--listing", lid, "--top-k", "3", "--url", url, "--json", env=_server_env(pair))
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads(done.stdout)[0]
    assert doc["listing"] == lid and len(doc["matches"]) == 3 and lid not in [m["listing_id"] for m in doc["matches"]]
    done = _lookalike("query", "--listing", "no-such-listing", "--url", url, env=_server_env(pair))
    assert done.returncode == 1 and "answered 404" in done.stderr and "no-such-listing" in done.stderr

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    done = _lookalike("query", str(broken), "--url", stack.endpoints["transformer_rest"], env=_server_env(pair))
    assert done.returncode == 1 and "answered 400" in done.stderr, done.stderr[-3000:]
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_lookalike_serve_starts_both_servers_and_stops_them(pair, tmp_path):
    from conftest import free_port_block

    base = free_port_block((0, 1, 2, 5, 6))
    env = {**_server_env(pair), "LOOKALIKE_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen([_lookalike_bin(), "serve", "--port", str(base)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Ctrl-C stops all" in line:
                break
        text = "".join(lines)
        assert f"transformer  REST http://127.0.0.1:{base}/v2/models/lookalike/infer" in text, text
        assert f"predictor    REST http://127.0.0.1:{base + 5}" in text
        got = _matches(_rest_infer(f"http://127.0.0.1:{base}", [pair["photos"][_ids(pair, 1)[0]]]))
        assert got[0]["matches"][0]["listing_id"] == _ids(pair, 1)[0]
        # A predictor that dies is started again, and says so; queries work again afterwards.
        pids = json.loads((tmp_path / "home" / "serve.json").read_text())["pids"]
        os.kill(pids["predictor"], signal.SIGKILL)
        while time.monotonic() < deadline + 120:
            line = proc.stdout.readline()
            assert line, "lookalike serve ended instead of restarting the predictor"
            if "restarted the predictor" in line:
                break
        got = _matches(_rest_infer(f"http://127.0.0.1:{base}", [pair["photos"][_ids(pair, 1)[0]]]))
        assert got[0]["matches"][0]["listing_id"] == _ids(pair, 1)[0]
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        rest = proc.communicate(timeout=60)[0]
        assert proc.returncode == 0 and "stopped" in rest
        for port in (base, base + 1, base + 5, base + 6):
            assert _port_free(port), f"port {port} still served after Ctrl-C"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0
