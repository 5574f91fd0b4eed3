"""Which FAISS index to build: factory strings, the plan they resolve to, and their constants.

Factories (the `factory` setting, FAISS index_factory strings with placeholders):

- ``IVF{nlist},Flat`` (`DEFAULT_FACTORY`): exact vectors in the lists; recall limited only by nprobe.
- ``IVF{nlist},PQ{m}x4fsr,Refine(SQ8)`` (`PQ_FACTORY`): 4-bit fast-scan PQ codes of the residuals
  (D/4 bytes: D/2 sub-quantizers of 4 bits) find a short list of `refine_k_factor`·top_k candidates (the
  tuning doubles it where the target recall needs more)
  that are re-ranked from an 8-bit scalar-quantized copy (D bytes): about a third of IVF-Flat's memory.
  ``Refine(SQfp16)`` and ``Refine(Flat)`` (= ``RFlat``) re-rank from fp16 or exact copies instead. The
  refine step is ours rather than FAISS's IndexRefine so that it keeps working with ids, removals and
  filters.
- ``{nlist}`` is chosen by `lookalike.predictor.index.tuning.choose_nlist`; ``{m}`` is D/2 (two dimensions per
  sub-quantizer: on 1M yardstick vectors its top-100 holds 0.96 of the true top 10 where D/4's holds
  0.81, so a short list of 20·top_k reaches recall 0.95 that D/4 needed 40·top_k for). A catalog too small
  to train ``{nlist}`` lists falls back to exact search (the card's kind is "exact" and
  ``exact_fallback`` says why). ``Flat`` asks for exact search outright.
- From `HNSW_QUANTIZER_MIN_NLIST` lists on (from about 130,000 vectors), a chosen ``{nlist}`` gets an HNSW graph
  over the centroids as its coarse quantizer (``IVF8192_HNSW32,...``): comparing a query with every centroid
  costs nlist·D multiply-adds, which at 4,096 lists of the 1M yardstick took 100 us of a 220 us query,
  more than scanning the lists, and at 16,384 lists would cost 84 TFLOP to fill a 10M index. The graph
  finds the nearest centroids in a few hundred comparisons. Its lists are found approximately, which the
  nprobe tuning absorbs. Such centroids are trained in two levels (`lookalike.predictor.index.clustering`).
  An explicit factory is built as written.
- The graph's search depth differs by use. Adding a vector asks the graph for its one nearest centroid,
  and the vector stays in that list: adds search at `HNSW_QUANTIZER_EF` (at FAISS's default, 16, the graph
  found it for 0.91 of yardstick vectors, at 64 for 0.98, and 10M vectors went to the wrong list often
  enough to cap IVF-Flat's recall@10 near 0.95). A query asks for nprobe lists, and FAISS's graph search
  looks at least nprobe deep anyway: the nprobe tuning tries queries at depths 32 and 64
  (`lookalike.predictor.index.build.QUERY_DEPTHS`) and keeps the fastest that reaches the target recall,
  timed on its held-out queries. A shallow search misses some of a query's nearest lists, which more
  probes make up for only in part; a deep one costs more comparisons than the lists it saves, which is
  data-dependent, hence measured. The index file keeps the query depth; adds widen it while they run
  (`lookalike.predictor.index.build.graph_widened`). Indexes saved before keep the depth they were saved
  with (64).

`plan` turns a setting into what to build; the re-ranking copy itself is `lookalike.predictor.index.refine`.
Nothing here touches a built index.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from lookalike.predictor.index import tuning as tuning
from lookalike.predictor.index.errors import BadIndexInput

METRIC = "inner_product"
DEFAULT_FACTORY = "IVF{nlist},Flat"
PQ_FACTORY = "IVF{nlist},PQ{m}x4fsr,Refine(SQ8)"
EXACT_FACTORY = "Flat"
# Re-ranked short list: REFINE_K_FACTOR·top_k PQ candidates to start with, doubled by the nprobe tuning up to
# MAX_REFINE_K_FACTOR where the target recall needs it. Each candidate costs a query a key lookup and a
# re-scoring (~0.4 us at 10M, mostly memory latency: see kernels.py); the D/2 codes hold 0.96 of the
# true top 10 in a short list of 10·top_k on the 1M yardstick.
REFINE_K_FACTOR = 10
MAX_REFINE_K_FACTOR = 40
HNSW_QUANTIZER_MIN_NLIST = 4_096   # from here on the coarse quantizer is an HNSW graph (see the module doc)
HNSW_QUANTIZER_M = 32          # graph degree of that quantizer: FAISS's usual choice for IVF..._HNSW32
HNSW_QUANTIZER_EF = 64         # graph search depth while vectors are added (see the module doc)
# How far the graph looks while it is built over the centroids. FAISS's default (40) left a graph that found
# a yardstick vector's nearest of 4,096 centroids for 0.94 of them at depth 64; at 200, 0.99 (0.94 at 16).
# Building it costs seconds: the graph holds only the centroids.
HNSW_QUANTIZER_EF_CONSTRUCTION = 200
HNSW_QUANTIZER_SEARCH_EF = 16  # FAISS's default query depth: the tuning tries twice this and HNSW_QUANTIZER_EF
ADD_CHUNK = 65_536             # vectors per FAISS add/encode call: bounds the temporary memory of one call

_REFINE_RE = re.compile(r",(?:Refine\((SQ8|SQfp16|Flat)\)|(RFlat))$")
_IVF_RE = re.compile(r"^IVF(\d+)")


@dataclass(frozen=True)
class Plan:
    """What to build for a factory setting, a dimension and a catalog size."""

    base: str                  # what faiss.index_factory builds ("Flat" for exact search)
    refine: str | None         # SQ8 | SQfp16 | Flat | None
    nlist: int                 # 0 for exact search
    fallback: str | None       # why an IVF request fell back to exact search

    @property
    def factory(self) -> str:
        """The factory string the card records, e.g. "IVF64,PQ16x4fsr,Refine(SQ8)"."""
        return self.base + (f",Refine({self.refine})" if self.refine else "")


def plan(factory: str | None, dim: int, n: int) -> Plan:
    """Resolve a factory setting (None: `DEFAULT_FACTORY`) for n vectors of dimension dim."""
    setting = factory or DEFAULT_FACTORY
    if not isinstance(setting, str):
        raise BadIndexInput(f"factory must be a FAISS index_factory string, got {setting!r}")
    refine = None
    match = _REFINE_RE.search(setting)
    if match:
        refine = match.group(1) or "Flat"
        setting = setting[:match.start()]
    if "{m}" in setting:
        if dim % 4:
            raise BadIndexInput(f"factory {factory!r} uses {{m}} = D/2 sub-quantizers, but D={dim} is not a "
                                f"multiple of 4; write the PQ size explicitly")
        setting = setting.replace("{m}", str(dim // 2))
    if setting == EXACT_FACTORY:
        return Plan(EXACT_FACTORY, None, 0, None)
    if "{nlist}" in setting:
        nlist = tuning.choose_nlist(n)
        if nlist == 0:
            reason = (f"{n} vectors are too few to train an IVF index (at least "
                      f"{tuning.MIN_POINTS_PER_CENTROID * tuning.MIN_NLIST} needed): using exact search")
            return Plan(EXACT_FACTORY, None, 0, reason)
        quantizer = f"_HNSW{HNSW_QUANTIZER_M}" if nlist >= HNSW_QUANTIZER_MIN_NLIST else ""
        setting = setting.replace("{nlist}", f"{nlist}{quantizer}")
    ivf = _IVF_RE.match(setting)
    if not ivf:
        raise BadIndexInput(f"factory {factory!r} is not supported: use an IVF factory such as "
                            f"{DEFAULT_FACTORY!r} or {PQ_FACTORY!r}, or {EXACT_FACTORY!r} for exact search")
    nlist = int(ivf.group(1))
    if n < tuning.MIN_POINTS_PER_CENTROID * nlist:
        raise BadIndexInput(f"factory {factory!r} asks for {nlist} lists, which needs at least "
                            f"{tuning.MIN_POINTS_PER_CENTROID * nlist} training vectors; got {n}. Use "
                            f"'{{nlist}}' to let the index choose")
    return Plan(setting, refine, nlist, None)


# Bytes a vector costs in memory, per kind (codes + the 64-bit id in its inverted list): IVF-Flat keeps D
# float32s, the compact IVF-PQ keeps D/4 bytes of 4-bit PQ codes plus the D-byte 8-bit re-ranking copy.
def flat_bytes_per_vector(dim: int) -> int:
    return 4 * dim + 8


def compact_bytes_per_vector(dim: int) -> int:
    return dim // 4 + dim + 8


def choose_factory(n: int, dim: int, memory_budget: int | None) -> str:
    """The factory for n vectors within `memory_budget` bytes (None: no budget): IVF-Flat when it fits,
    else the compact IVF-PQ re-ranked from an 8-bit copy (0.32 of IVF-Flat's memory at D=256);
    a budget even that exceeds is refused with the sizes, so nobody discovers it in production."""
    if memory_budget is None or n * flat_bytes_per_vector(dim) <= memory_budget:
        return DEFAULT_FACTORY
    if n * compact_bytes_per_vector(dim) <= memory_budget:
        return PQ_FACTORY
    raise BadIndexInput(f"{n:,} vectors of {dim} dimensions need {n * compact_bytes_per_vector(dim) / 2**30:.2f} "
                        f"GiB even as the compact IVF-PQ index ({compact_bytes_per_vector(dim)} bytes each), over the "
                        f"budget of {memory_budget / 2**30:.2f} GiB: raise the budget, or shard the index "
                        f"(docs/capacity.md)")


def parse_bytes(text: str | int | None) -> int | None:
    """A memory budget as given by a user: bytes, or a number with KiB/MiB/GiB/TiB (or K/M/G/T);
    ""/None/0 for no budget."""
    if text in (None, "", 0, "0"):
        return None
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise BadIndexInput(f"memory budget {text!r} is not a size: write e.g. 8GiB, 512MiB or 1073741824")
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[match.group(2).upper()]
    return int(float(match.group(1)) * scale)
