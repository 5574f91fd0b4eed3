"""The automatic crop end to end: a model with a locator served by real KServe processes finds the
product in a cluttered simulated phone photo, searches that part, and says which box it searched; an
app's box wins, `crop=off` searches the whole photo, a bad `crop` is a 400.

The pair: tf_efficientnet_lite0 with its packaged ImageNet weights at 96 px and a locator trained here
on 200 simulated views (about 20 s), served as its learnt map; 60 Fashion-MNIST listings.
"""
from __future__ import annotations

import base64
import io
import json
import os

import httpx
import numpy as np
import pytest
from conftest import fresh_bucket
from PIL import Image

from lookalike.core.preprocessing import PreprocessSpec

import test_try_page  # its Debian-chromium browser fixture, reused as it is

browser = test_try_page.browser

pytestmark = pytest.mark.slow
MODEL = "lookalike"


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


@pytest.fixture(scope="module")
def served(s3_server, tmp_path_factory):
    import torch

    from lookalike.app.serving_stack import ServingStack
    from lookalike.catalogs.importers import import_fashion_mnist
    from lookalike.catalogs.rows import Catalog
    from lookalike.core.artifacts import new_version
    from lookalike.core.decoding import decode_image
    from lookalike.core.preprocessing import preprocess_batch
    from lookalike.predictor.embedder import Embedder
    from lookalike.predictor.index import VectorIndex
    from lookalike.training.data import ImageBank
    from lookalike.training.export import export_model, publish_model
    from lookalike.training.locator import train_locator
    from lookalike.training.model import ModelConfig, create_model

    cache = tmp_path_factory.mktemp("cache")
    with fresh_bucket(s3_server, "crop", LOOKALIKE_CACHE=str(cache)) as store:
        uri = import_fashion_mnist(store, split_names=("train",), limit=60, progress=False)["train"]
        catalog = Catalog.open(uri, store)
        photos = [decode_image(catalog.image_bytes(r)) for r in catalog.rows]
        spec = PreprocessSpec(size=96, resize=96, interpolation="bilinear")
        # The learnt map: at 96 px (a 3x3 feature map) with untrained ImageNet features the saliency map
        # finds little (benchmarks/retrieval_quality.py measures both); this test is about the serving path.
        config = ModelConfig(embedding_dim=32, heads={"category": catalog.tasks()["category"]}, preprocessing=spec,
                             locator=True, locator_map="learnt")
        model = create_model(config)
        bank = ImageBank(list(catalog.rows), [p.resize((112, 112)) for p in photos])
        train_locator(model, bank, spec, views=200, seed=0, device=torch.device("cpu"), steps=150)
        out = export_model(model, config, tmp_path_factory.mktemp("model") / "m", model_version=new_version(),
                           lineage={"catalog": uri})
        model_version = publish_model(store, out, alias="production")
        vectors, _ = Embedder.load(out).embed(preprocess_batch(photos, spec))
        VectorIndex.build(vectors, [r.listing_id for r in catalog.rows], model_version=model_version).publish(store)
        env = {**os.environ, **store.settings.to_env(), "LOOKALIKE_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
        # The micro-batching predictor (the GPU default) carries each request's slice of the boxes.
        stack = ServingStack(env, log_dir=tmp_path_factory.mktemp("logs"), predictor_args=["--batching", "on"])
        try:
            stack.start()
            yield {"stack": stack, "catalog": catalog, "photos": photos, "settings": store.settings, "spec": spec}
        finally:
            stack.stop()


def _ask(served, photo: bytes, **parameters) -> tuple[httpx.Response, dict | None, list | None]:
    body = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                        "data": [base64.b64encode(photo).decode()]}], "parameters": parameters}
    url = served["stack"].endpoints["transformer_rest"]
    response = httpx.post(f"{url}/v2/models/{MODEL}/infer", json=body, timeout=30)
    if response.status_code != 200:
        return response, None, None
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    return response, json.loads(outputs["matches"]["data"][0]), outputs["boxes"]["data"]


def _scenes(served, n: int = 6):
    """Simulated phone photos (evaluation recipe, product cut out into a scene) with their true boxes."""
    from lookalike.training.phone_photos import EVALUATION, simulate

    out = []
    for k in range(n):
        photo, info = simulate(served["photos"][k].resize((112, 112)), 100 + k, out_size=480, recipe=EVALUATION,
                               cutout=True)
        out.append((served["catalog"].rows[k].listing_id, _jpeg(photo), info.box))
    return out


def test_the_answer_carries_the_box_searched_and_it_is_where_the_product_is(served):
    from lookalike.training.locator import box_iou

    cropped = []
    for _, photo, truth in _scenes(served):
        response, doc, boxes = _ask(served, photo)
        assert response.status_code == 200, response.text
        box = doc["box"]
        assert box["searched"] in ("crop", "whole") and len(box["box"]) == 4
        assert np.allclose(boxes[:4], box["box"], atol=1e-3)  # the tensor and the JSON agree
        if box["searched"] == "crop":
            assert box["confidence"] >= 0.35
            cropped.append(box_iou(tuple(box["box"]), truth))
            region = box["region"]  # the part searched holds the box, with context
            assert region[0] <= box["box"][0] and region[2] >= box["box"][2]
    # The locator is trained on another recipe's scenes, at 96 px: half the photos or more are cropped,
    # around the product.
    assert len(cropped) >= 3, cropped
    assert np.mean(cropped) > 0.4, cropped


def test_an_app_box_wins_and_crop_off_searches_the_whole_photo(served):
    _, photo, _ = _scenes(served, 1)[0]
    _, whole, whole_boxes = _ask(served, photo, crop="off")
    assert whole["box"] == {"box": [0.0, 0.0, 1.0, 1.0], "searched": "whole"}
    assert whole_boxes[4] is None  # no confidence: NaN, which JSON answers as null
    _, app, _ = _ask(served, photo, box="0.1,0.2,0.6,0.7")
    assert app["box"] == {"box": [0.1, 0.2, 0.6, 0.7], "searched": "app"}


def _predictor(served, images: np.ndarray, fuse: np.ndarray | None = None, **parameters) -> dict:
    inputs = [{"name": "images", "shape": list(images.shape), "datatype": "FP32",
               "data": images.reshape(-1).tolist()}]
    if fuse is not None:
        inputs.append({"name": "fuse", "shape": list(fuse.shape), "datatype": "FP32",
                       "data": fuse.reshape(-1).tolist()})
    url = served["stack"].endpoints["predictor_rest"]
    response = httpx.post(f"{url}/v2/models/{MODEL}/infer", json={"inputs": inputs, "parameters": {"top_k": 10,
                                                                                                 **parameters}},
                          timeout=30)
    assert response.status_code == 200 or fuse is not None, response.text
    if response.status_code != 200:
        return {"status": response.status_code, "error": response.json()["error"]}
    out = {o["name"]: o for o in response.json()["outputs"]}
    return {"status": 200, "ids": out["listing_ids"]["data"], "scores": out["scores"]["data"],
            "embeddings": np.array(out["embeddings"]["data"], np.float32).reshape(out["embeddings"]["shape"])
            if "embeddings" in out else None}


def test_the_crop_is_searched_fused_with_the_whole_photo(served):
    """The predictor's side of the automatic crop: the first call answers the whole photo's embedding when
    asked, the crop's call searches the crop's embedding fused with it (lookalike.core.boxes.fuse_embeddings),
    a photo fused with itself is searched as it is, and a malformed `fuse` is the client's error."""
    from lookalike.core.boxes import fuse_embeddings
    from lookalike.core.preprocessing import preprocess_batch

    spec = served["spec"]
    scene = Image.open(io.BytesIO(_scenes(served, 1)[0][1])).convert("RGB")
    product = served["photos"][0].convert("RGB")
    images = preprocess_batch([scene, product], spec)
    plain = _predictor(served, images, with_embeddings=True)
    emb = plain["embeddings"]
    assert emb is not None and emb.shape == (2, 32)
    assert _predictor(served, images, fuse=emb)["ids"] == plain["ids"]  # each fused with itself: unchanged
    swapped = _predictor(served, images, fuse=emb[::-1].copy())  # the scene fused with the product, and back
    query = fuse_embeddings(emb[::-1], emb)
    assert np.allclose(query[0], query[1], atol=1e-5)  # the same query twice: the same answer twice
    assert swapped["ids"][:10] == swapped["ids"][10:20]
    assert swapped["ids"] != plain["ids"]
    bad = _predictor(served, images, fuse=emb[:1].copy())
    assert bad["status"] == 400 and "'fuse' holds 1 embeddings for 2 images" in bad["error"]


def test_a_bad_crop_parameter_is_refused_with_what_to_send(served):
    _, photo, _ = _scenes(served, 1)[0]
    response, _, _ = _ask(served, photo, crop="sometimes")
    assert response.status_code == 400 and "'crop' must be 'auto'" in response.json()["error"]


# ---- the try page draws the box and takes one --------------------------------------------------

def test_the_try_page_draws_the_box_found_takes_a_dragged_box_and_puts_results_first_on_a_phone(
        served, browser, tmp_path):
    from lookalike.app.try_page import TryPageServer

    chromium = browser
    scenes = _scenes(served)
    cropped = next(((photo, doc) for _, photo, _ in scenes
                    for doc in [_ask(served, photo)[1]] if doc["box"]["searched"] == "crop"), None)
    assert cropped is not None
    photo, doc = cropped
    path = tmp_path / "scene.jpg"
    path.write_bytes(photo)
    with TryPageServer(served["stack"].endpoints["transformer_rest"], s3=served["settings"]) as server:
        page = chromium.new_page(viewport={"width": 1280, "height": 860})
        page.set_default_timeout(60_000)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(server.url)
        page.wait_for_selector("#status[data-state=ready]")
        page.set_input_files("#photo", str(path))
        assert test_try_page._settle(page) == "done", page.inner_text("#error")
        overlay = page.locator("#found-box")
        assert overlay.is_visible() and overlay.get_attribute("data-searched") == "crop"
        drawn = [float(v) for v in overlay.get_attribute("data-box").split(",")]
        assert np.allclose(drawn, doc["box"]["box"], atol=1e-3)
        if os.environ.get("LOOKALIKE_SCREENSHOT") == "1":  # the README's picture of the box
            page.screenshot(path=str(test_try_page.SCREENSHOT.parent / "try_page_box.png"))
        # drawn where the box is: its rectangle over the photo's (a square photo fills the preview)
        photo_box, box = page.locator("#preview").bounding_box(), overlay.bounding_box()
        assert abs(box["x"] - (photo_box["x"] + drawn[0] * photo_box["width"])) < 4

        # the shopper drags a box: it is sent as `box`, searched, and drawn as theirs
        page.evaluate("() => { document.body.dataset.state = 'idle'; }")
        x0, y0 = photo_box["x"] + 0.25 * photo_box["width"], photo_box["y"] + 0.3 * photo_box["height"]
        x1, y1 = photo_box["x"] + 0.75 * photo_box["width"], photo_box["y"] + 0.8 * photo_box["height"]
        page.mouse.move(x0, y0)
        page.mouse.down()
        page.mouse.move((x0 + x1) / 2, (y0 + y1) / 2)
        page.mouse.move(x1, y1)
        page.mouse.up()
        assert test_try_page._settle(page) == "done", page.inner_text("#error")
        assert overlay.get_attribute("data-searched") == "app"
        assert np.allclose([float(v) for v in overlay.get_attribute("data-box").split(",")],
                           [0.25, 0.3, 0.75, 0.8], atol=0.02)
        assert page.locator("#matches .match").count() == 10 and errors == []

        # on a phone-sized screen the matches come first once there are some
        phone = chromium.new_page(viewport={"width": 390, "height": 844})
        phone.goto(server.url)
        phone.wait_for_selector("#status[data-state=ready]")
        phone.set_input_files("#photo", str(path))
        assert test_try_page._settle(phone) == "done"
        assert phone.locator("#matches").bounding_box()["y"] < phone.locator("#drop").bounding_box()["y"]
        assert phone.locator("#matches .match").first.bounding_box()["y"] < 844  # on the first screen


def _answer_hits(served) -> float:
    text = httpx.get(f"{served['stack'].endpoints['predictor_rest']}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("lookalike_cache_lookups_total{") and 'cache="answer"' in line
               and 'result="hit"' in line and 'unit="predictor"' in line)


def _commented(jpeg: bytes, text: str) -> bytes:
    """The same JPEG with a comment segment after its start marker: the same pixels, bytes never sent before."""
    comment = text.encode()
    return jpeg[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + jpeg[2:]


def test_a_repeated_photo_is_answered_from_the_cache_with_the_same_crop(served):
    """A cropped photo's first answer (its crop searched fused with the whole photo) is what every repeat gets,
    from the predictor's answer cache at the first repeat already: the repeat's probe sends no `fuse`, and the
    crop's key names that one fused search."""
    for n, (_, scene, _) in enumerate(_scenes(served)):
        photo = _commented(scene, f"never sent before {n}")
        _, first, _ = _ask(served, photo)
        if first["box"]["searched"] == "crop":
            break
    else:
        pytest.fail("the locator cropped none of the scenes")
    hits = _answer_hits(served)
    _, again, _ = _ask(served, photo)
    assert _answer_hits(served) > hits  # the predictor answered from its cache
    assert again["box"] == first["box"]  # the box searched the first time, remembered with the key
    assert [(m["listing_id"], m["score"]) for m in again["matches"]] == \
        [(m["listing_id"], m["score"]) for m in first["matches"]]
    _, whole, _ = _ask(served, photo, crop="off")  # another question: never the crop's cached answer
    assert whole["box"]["searched"] == "whole"
