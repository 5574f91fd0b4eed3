"""The fan-out to a sharded index: the query vectors the embedding predictor made go to every shard
predictor at once, and their answers are merged here, once (`lookalike.serving.shard_merge`).

    transformer ──images──▶ embedding predictor ──embeddings, labels──▶ transformer
                ──embeddings──▶ shard 0 … shard k-1 (concurrently, one deadline) ──▶ merge ──▶ the answer

What the answer promises:
- every shard that answered serves the same index version (and the embedder's model), never a mix.
  A swap moves all shards together: each shard loads the new version beside the old and holds both
  (`lookalike.predictor.parts.ShardPredictor.HELD`); requests name the version to answer from
  (`shard_version`), and the fan-out moves to the new one only once every shard holds it. A shard that
  answered from another version (it restarted holding only the newest) is asked again, with every
  shard, for the newest version all hold; with no such version the request is refused (503, retry);
- a shard that does not answer in time, or is down, is named: the response's parameters say
  `partial` and `shards_missing` (the transformer repeats both in every matches document), never a
  silently shorter list; when no shard answers, the request fails (504 / 503);
- a shard's refusal of the request itself (400, 413: the same for every shard) is the client's error.

A filter on a predicted label ("category=predicted") is made concrete per photo from the embedder's
heads before the fan-out (each photo then goes out on its own).
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import grpc
import numpy as np

from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
from kserve.protocol.infer_type import InferInput, InferRequest, InferResponse, to_http_parameters
from lookalike.core.boxes import EMBEDDINGS, WITH_EMBEDDINGS, fuse_embeddings
from lookalike.serving.errors import Timeout, Unavailable, V2Error, status_for
from lookalike.serving.protocol import REQUEST_ID_HEADER, output
from lookalike.serving.shard_merge import SHARD_VERSION, SHARD_VERSIONS, ShardAnswer, merge_answers

log = logging.getLogger(__name__)

PREDICTED = "predicted"
SHARD_PARAMETERS = ("top_k", "nprobe")
MISSING = "shards_missing"  # response parameter: the shards whose part of the answer is missing, "1,3"
PARTIAL = "partial"
SHARDS_CARD = "shards.json"  # the sharded version's card (lookalike.predictor.index.shards.SHARDS_FILE)


def plain(params: Any) -> dict[str, Any]:
    return to_http_parameters(params) if params else {}


def has_predicted(params: dict[str, Any]) -> bool:
    return any((k == "filter" or k.startswith("filter_")) and PREDICTED in str(v) for k, v in params.items())


def concrete_filters(params: dict[str, Any], labels: dict[str, list[str]], i: int) -> dict[str, Any]:
    """The filter parameters with every "predicted" label replaced by photo i's predicted label."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if key == "filter" and isinstance(value, str):
            parts = []
            for part in (p.strip() for p in value.split(",") if p.strip()):
                if part.startswith(PREDICTED + ":"):
                    task = part.split(":", 1)[1].strip()
                    part = f"{task}={labels[task][i]}" if task in labels else part
                elif "=" in part:
                    task, label = (s.strip() for s in part.split("=", 1))
                    if label == PREDICTED and task in labels:
                        part = f"{task}={labels[task][i]}"
                parts.append(part)
            out[key] = ",".join(parts)
        elif key.startswith("filter_"):
            task = key[len("filter_"):]
            out[key] = labels[task][i] if value == PREDICTED and task in labels else value
    return out


class ShardFanout:
    """The transformer's clients of the k shard predictors (gRPC v2, one channel each)."""

    def __init__(self, hosts: Sequence[str], timeout_s: float, model_name: str):
        self.hosts = list(hosts)
        self.timeout_s = float(timeout_s)
        self.model_name = model_name
        self._stubs: list[Any] = []
        self.pinned: str | None = None  # the shard version requests are answered from ("model/index")

    def stubs(self) -> list[Any]:
        if not self._stubs:
            options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1),
                       ("grpc.enable_retries", 0)]
            self._stubs = [grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(
                grpc.aio.insecure_channel(h, options=options)) for h in self.hosts]
        return self._stubs

    async def search(self, embedded: InferResponse, request: InferRequest,
                     fuse: np.ndarray | None = None) -> InferResponse:
        """The embedder's answer (vectors, labels) turned into the whole predictor's answer, from every shard;
        `fuse`: an automatic crop's whole photos, searched fused with the crops (as the whole predictor does)."""
        outputs = {o.name: o for o in embedded.outputs}
        if EMBEDDINGS not in outputs:
            raise Unavailable("the predictor answered without query vectors: is it an embedding predictor "
                              "(python -m lookalike.predictor.parts embed)?")
        embeddings = np.ascontiguousarray(outputs[EMBEDDINGS].as_numpy(), np.float32)
        vectors = embeddings if fuse is None else fuse_embeddings(fuse, embeddings)
        tasks = [n[len("label_"):] for n in outputs if n.startswith("label_")]
        labels = {t: [_text(v) for v in outputs[f"label_{t}"].as_numpy().reshape(-1)] for t in tasks}
        params = plain(request.parameters)
        top_k = int(params.get("top_k") or 10)
        base = {k: params[k] for k in SHARD_PARAMETERS if params.get(k) is not None}
        filters = {k: v for k, v in params.items() if k == "filter" or k.startswith("filter_")}
        rid = str(request.id)
        if has_predicted(filters):  # each photo has its own filter: one fan-out per photo
            groups = [([i], {**base, **concrete_filters(filters, labels, i)}) for i in range(len(vectors))]
        else:
            groups = [(list(range(len(vectors))), {**base, **filters})]
        model_version = str(plain(embedded.parameters).get("model_version") or embedded.model_version or "")
        per_group = await self._consistent(groups, vectors, rid, model_version)
        n = len(vectors)
        ids: list[list[str]] = [[] for _ in range(n)]
        photos: list[list[str]] = [[] for _ in range(n)]
        scores = np.zeros((n, top_k), np.float32)
        missing: set[int] = set()
        versions: set[str] = set()
        models: set[str] = set()
        search_us = 0
        for (rows, _), (answers, meta) in zip(groups, per_group):
            missing |= {s for s, a in enumerate(answers) if a is None}
            versions |= {m["index_version"] for m in meta if m}
            models |= {m["model_version"] for m in meta if m}
            search_us = max([search_us] + [int(m.get("search_us", 0)) for m in meta if m])
            if all(a is None for a in answers):  # nothing to merge: refused below
                continue
            merged = merge_answers(answers, top_k)
            for j, i in enumerate(rows):
                ids[i], photos[i] = merged.listing_ids[j], merged.photo_ids[j]
                scores[i, :len(ids[i])] = merged.scores[j, :len(ids[i])]
        if len(missing) == len(self.hosts):
            raise Timeout(f"no index shard answered within {self.timeout_s:g} s ({len(self.hosts)} shards); "
                          f"retry later")
        if len(versions) > 1 or (models and models != {model_version}):
            raise Unavailable(f"the index shards answered from different versions (index {sorted(versions)}, "
                              f"model {sorted(models)} for embeddings of {model_version}): a swap is under way; "
                              f"retry shortly")
        if missing:
            log.warning("request %s: shards %s did not answer; the answer is partial", rid, sorted(missing))
        k = max([len(r) for r in ids] + [0])
        out = [output("listing_ids", _table(ids, k), "BYTES", True),
               output("photo_ids", _table(photos, k), "BYTES", True),
               output("scores", np.ascontiguousarray(scores[:, :k]), "FP32", True)]
        out += [output(name, o.as_numpy(), o.datatype, True) for name, o in outputs.items() if name != EMBEDDINGS]
        if params.get(WITH_EMBEDDINGS):  # the whole photos' vectors, for an automatic crop to fuse with
            out.append(output(EMBEDDINGS, embeddings, "FP32", True))
        answer = InferResponse(response_id=rid, model_name=embedded.model_name, infer_outputs=out,
                               model_version=model_version or None,
                               parameters={"model_version": model_version, "index_version": next(iter(versions), ""),
                                           "embed_us": int(plain(embedded.parameters).get("embed_us", 0)),
                                           "search_us": search_us, "shards": len(self.hosts),
                                           MISSING: ",".join(map(str, sorted(missing))), PARTIAL: bool(missing)})
        return InferResponse.from_grpc(answer.to_grpc())  # read back exactly as a predictor's reply would be

    async def _consistent(self, groups: list[tuple[list[int], dict[str, Any]]], vectors: np.ndarray, rid: str,
                          model_version: str) -> list[tuple[list[ShardAnswer | None], list[dict[str, Any] | None]]]:
        """Every group's answers from one shard version: the pinned one; asked once more at the newest
        version every answering shard holds when they answered from different ones (a shard restarted,
        or the pin was never set). Moves the pin forward once every shard holds a newer version."""
        async def ask(version: str | None) -> tuple[list, list[dict[str, Any]]]:
            per_group = await asyncio.gather(*(self._fan_out(vectors[rows], {**p, **_pin(version)}, rid)
                                               for rows, p in groups))
            return per_group, [m for _, meta in per_group for m in meta if m]

        per_group, metas = await ask(self.pinned)
        common = _newest_common(metas, model_version)
        answered = {m.get(SHARD_VERSION) for m in metas}
        if len(answered) > 1 and common is not None and answered != {common}:
            per_group, metas = await ask(common)
            common = _newest_common(metas, model_version)
        if common is not None and common != self.pinned:
            if self.pinned is not None:
                log.info("every shard holds %s: answering from it from now on (was %s)", common, self.pinned)
            self.pinned = common
        return per_group

    async def _fan_out(self, vectors: np.ndarray, params: dict[str, Any], rid: str
                       ) -> tuple[list[ShardAnswer | None], list[dict[str, Any] | None]]:
        tensor = InferInput(EMBEDDINGS, list(vectors.shape), "FP32")
        tensor.set_data_from_numpy(vectors, binary_data=True)
        message = InferRequest(model_name=self.model_name, infer_inputs=[tensor], request_id=rid,
                               parameters=params).to_grpc()
        replies = await asyncio.gather(*(self._ask(stub, s, message, rid) for s, stub in enumerate(self.stubs())))
        answers, meta = [], []
        for reply in replies:
            if reply is None:
                answers.append(None)
                meta.append(None)
                continue
            outs = {o.name: o for o in reply.outputs}
            scores = outs["scores"].as_numpy().astype(np.float32)
            n = len(vectors)
            k = scores.shape[1] if scores.ndim == 2 else 0
            answers.append(ShardAnswer(_rows(outs["listing_ids"].as_numpy(), n, k),
                                       _rows(outs["photo_ids"].as_numpy(), n, k), scores.reshape(n, k)))
            meta.append({k2: str(v) for k2, v in plain(reply.parameters).items()})
        return answers, meta

    async def _ask(self, stub: Any, shard: int, message: Any, rid: str) -> InferResponse | None:
        """One shard's reply, or None when it is down or late (its part of the answer is then missing)."""
        try:
            reply = await stub.ModelInfer(message, timeout=self.timeout_s, metadata=((REQUEST_ID_HEADER, rid),))
        except grpc.aio.AioRpcError as exc:
            status = status_for(exc.code())
            if status in (400, 413):  # the request itself: every shard would say the same
                raise V2Error(exc.details() or "bad request", status=status) from None
            log.warning("shard %d at %s: %s (%s)", shard, self.hosts[shard], exc.code().name,
                        (exc.details() or "").splitlines()[0] if exc.details() else "")
            return None
        return InferResponse.from_grpc(reply)

    async def close(self) -> None:
        self._stubs = []


def _pin(version: str | None) -> dict[str, str]:
    return {SHARD_VERSION: version} if version else {}


def _newest_common(metas: list[dict[str, Any]], model_version: str) -> str | None:
    """The newest shard version every answering shard holds, of the embedder's model (None: none is).
    Shards list what they hold oldest first and all load versions in the order the aliases moved."""
    held = [[v for v in str(m.get(SHARD_VERSIONS) or m.get(SHARD_VERSION) or "").split(",") if v] for m in metas]
    if not held:
        return None
    common = set(held[0]).intersection(*held[1:])
    fits = [v for v in held[0] if v in common and (not model_version or v.split("/", 1)[0] == model_version)]
    return fits[-1] if fits else None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _rows(values: np.ndarray, n: int, k: int) -> list[list[str]]:
    table = values.reshape(n, k) if k else np.empty((n, 0), dtype=object)
    return [[_text(v) for v in row if v not in (b"", "")] for row in table]


def _table(rows: list[list[str]], k: int) -> np.ndarray:
    out = np.empty((len(rows), k), dtype=object)
    for i, row in enumerate(rows):
        out[i, :] = [s.encode() for s in (list(row) + [""] * k)[:k]]
    return out


def sharded_card(store: Any, model_version: str, index_version: str) -> dict[str, Any]:
    """The card (shards.json) of a sharded index version: the catalogs its listings came from."""
    from lookalike.core.artifacts import sharded_index_repo

    return sharded_index_repo(store, model_version).read_json(index_version, SHARDS_CARD)


def flag_partial(documents: np.ndarray, missing: str) -> np.ndarray:
    """Each matches document (JSON bytes) with `partial` and `shards_missing` added, so an app that reads
    only the documents still knows that part of the catalog was not searched."""
    import json

    shards = [int(s) for s in missing.split(",") if s]
    out = []
    for doc in documents:
        body = json.loads(doc)
        body[PARTIAL], body[MISSING] = bool(shards), shards
        out.append(json.dumps(body, ensure_ascii=False).encode())
    return np.array(out, dtype=object)
