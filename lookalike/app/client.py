"""A Python client of the public endpoint (KServe v2 REST, binary tensors), and an HTML page of its results:
what `lookalike query` and `lookalike demo` use to search with photos, or by listings already in the index
("more like this").
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from collections.abc import Sequence

MODEL_NAME = "lookalike"


def query_photos(url: str, photos: Sequence[bytes], *, top_k: int = 5, filter: str | None = None,
                 box: str | None = None, crop: str | None = None, timeout_s: float = 30.0) -> list[dict[str, Any]]:
    """POST photos to the transformer (binary BYTES tensor); one {labels, matches, box} document per photo."""
    params: dict[str, Any] = {"box": box} if box else {}
    if crop:
        params["crop"] = crop
    return _search(url, {"image": list(photos)}, top_k, filter, params, timeout_s)


def query_listings(url: str, listing_ids: Sequence[str], photo_ids: Sequence[str | None] | None = None, *,
                   top_k: int = 5, filter: str | None = None, timeout_s: float = 30.0) -> list[dict[str, Any]]:
    """The listings most like each of `listing_ids` (searched with its stored vector: its first photo, or
    the photo named beside it in `photo_ids`), each listing left out of its own results; one {labels,
    matches} document per listing (its labels are its own)."""
    inputs: dict[str, list[bytes]] = {"listing_id": [lid.encode() for lid in listing_ids]}
    if photo_ids is not None and any(photo_ids):
        inputs["photo_id"] = [(p or "").encode() for p in photo_ids]
    return _search(url, inputs, top_k, filter, {}, timeout_s)


def _search(url: str, inputs: dict[str, list[bytes]], top_k: int, filter: str | None, params: dict[str, Any],
            timeout_s: float) -> list[dict[str, Any]]:
    import asyncio

    import numpy as np
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

    async def call():
        tensors = []
        for name, values in inputs.items():
            tensor = InferInput(name, [len(values)], "BYTES")
            tensor.set_data_from_numpy(np.array(values, dtype=object), binary_data=True)
            tensors.append(tensor)
        parameters: dict[str, Any] = {"top_k": top_k, **params}
        if filter:
            parameters["filter"] = filter
        client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=timeout_s, retries=0))
        try:
            return await client.infer(url, InferRequest(MODEL_NAME, tensors, parameters=parameters),
                                      model_name=MODEL_NAME)
        finally:
            await client.close()

    response = asyncio.run(call())
    matches = next(o for o in response.outputs if o.name == "matches")
    return [json.loads(v if isinstance(v, str) else v.decode()) for v in matches.as_numpy().reshape(-1)]


def error_text(response) -> str:
    try:
        return response.json().get("error", response.text)
    except ValueError:
        return response.text


def _data_uri(data: bytes) -> str:
    import base64

    kind = "image/png" if data[:4] == b"\x89PNG" else "image/webp" if data[:4] == b"RIFF" else "image/jpeg"
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


def _image_bytes(uri: str, stores: dict) -> bytes | None:
    """A match's photo: fetched from its URL (the answer's presigned or catalog URL), or read from the store
    (an answer of an older transformer) or a path on this machine."""
    from lookalike.core.s3 import ObjectStore, S3Settings, parse_s3_uri

    try:
        if uri.startswith(("http://", "https://")):
            import httpx

            response = httpx.get(uri, timeout=10.0)
            return response.content if response.status_code == 200 else None
        if uri.startswith("s3://"):
            bucket, key = parse_s3_uri(uri)
            if bucket not in stores:
                stores[bucket] = ObjectStore(S3Settings.from_env().with_bucket(bucket))
            return stores[bucket].get_bytes(key)
        return Path(uri).read_bytes() if uri else None
    except Exception:  # noqa: BLE001 - a missing thumbnail is shown as missing, the page still renders
        return None


def write_html(out: Path, results: list[tuple[Path, bytes, dict[str, Any]]]) -> None:
    """One row per query photo: the photo, then its matches with score, title and category."""
    from html import escape

    stores: dict = {}
    rows = []
    for path, data, result in results:
        labels = "<br>".join(f"{escape(t)}: {escape(v['label'])} ({v['probability']:.2f})"
                             for t, v in result["labels"].items())
        # a search by listing has no photo of its own: its listing id stands in the first cell
        query = f'<img src="{_data_uri(data)}">' if data else '<div class="missing">listing</div>'
        cells = [f'<td class="q">{query}<div>{escape(path.name)}<br>{labels}</div></td>']
        for m in result["matches"]:
            img = _image_bytes(m.get("image_url") or m.get("image", ""), stores)
            tag = f'<img src="{_data_uri(img)}">' if img else '<div class="missing">no image</div>'
            cells.append(f"<td>{tag}<div>{m['score']:.3f}<br>{escape(m['title'])}<br>"
                         f"<small>{escape(m['category'])} · {escape(m['listing_id'])}</small></div></td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    page = ("<!doctype html><meta charset='utf-8'><title>Lookalike matches</title><style>"
            "body{font-family:sans-serif}td{vertical-align:top;text-align:center;padding:6px}"
            "img{width:128px;height:128px;object-fit:contain;image-rendering:pixelated;border:1px solid #ccc}"
            "td.q{background:#eef}.missing{width:128px;height:128px;background:#eee}</style>"
            "<h1>Lookalike matches</h1><table>" + "".join(rows) + "</table>")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
