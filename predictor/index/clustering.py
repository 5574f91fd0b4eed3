"""The coarse centroids of a large IVF index, found in two levels so that a build stays affordable and
the lists come out even.

One k-means over every list (16,384 at 10M vectors, 8,192 at 1M) compares every training vector with every
centroid on each iteration: 69 TFLOP for 16,384 lists on their 819,200-vector sample, half an hour on
2 cores. Two levels cost a fraction of that: a k-means into about sqrt(nlist) groups, then, inside each
group, a k-means into a number of lists proportional to the group's size. Each vector is then compared
with sqrt(nlist) centroids and with its own group's, not with all of them.

The proportional split also evens the lists out. Catalog embeddings crowd into a few dense regions (many
listings of a few popular kinds of product); one flat k-means gives a dense region one list of several
times the average size, and a query, coming from the same dense regions, scans those large lists first:
on the 1M yardstick the list nearest a query held 2.7 times the average list. With lists proportional to
the data, a query scans fewer vectors for the same recall.
"""
from __future__ import annotations

import numpy as np

TWO_LEVEL_MIN_NLIST = 4_096   # from here on the centroids are trained in two levels (see the module doc)
COARSE_ITERATIONS = 20        # the first level is small: more iterations cost little
FINE_ITERATIONS = 10          # FAISS's own for IVF training


def split_counts(sizes: np.ndarray, nlist: int) -> np.ndarray:
    """Lists per group: proportional to the group sizes, at least one for every non-empty group, summing to
    nlist (largest remainders first)."""
    sizes = np.asarray(sizes, np.int64)
    share = sizes / max(int(sizes.sum()), 1) * nlist
    counts = np.where(sizes > 0, np.maximum(1, np.floor(share).astype(np.int64)), 0)
    counts = np.minimum(counts, sizes)  # a group cannot have more lists than vectors
    while counts.sum() < nlist:  # hand out the remainder to the groups furthest below their share
        room = np.where(counts < sizes, share - counts, -np.inf)
        counts[int(np.argmax(room))] += 1
    while counts.sum() > nlist:  # the at-least-one rule overshot: take from the groups furthest above
        room = np.where(counts > 1, counts - share, -np.inf)
        counts[int(np.argmax(room))] -= 1
    return counts


def two_level_centroids(xt: np.ndarray, nlist: int, *, seed: int, spherical: bool = True) -> np.ndarray:
    """nlist centroids [nlist, D] for the training sample xt, in two levels (see the module doc)."""
    import faiss

    d = xt.shape[1]
    groups = max(2, int(round(np.sqrt(nlist))))
    coarse = faiss.Kmeans(d, groups, niter=COARSE_ITERATIONS, seed=seed, spherical=spherical,
                          max_points_per_centroid=max(256, len(xt) // groups))
    coarse.train(xt)
    _, assign = coarse.index.search(xt, 1)
    assign = assign.ravel()
    counts = split_counts(np.bincount(assign, minlength=groups), nlist)
    order = np.argsort(assign, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(assign, minlength=groups))])
    out = []
    for g in range(groups):
        k = int(counts[g])
        if k == 0:
            continue
        members = xt[order[bounds[g]:bounds[g + 1]]]
        if k == 1:
            centre = members.mean(axis=0, keepdims=True)
            if spherical:
                centre /= max(float(np.linalg.norm(centre)), 1e-12)
            out.append(centre.astype(np.float32))
            continue
        fine = faiss.Kmeans(d, k, niter=FINE_ITERATIONS, seed=seed + 1 + g, spherical=spherical,
                            min_points_per_centroid=1, max_points_per_centroid=max(256, len(members) // k + 1))
        fine.train(np.ascontiguousarray(members))
        out.append(fine.centroids)
    centroids = np.ascontiguousarray(np.concatenate(out), dtype=np.float32)
    assert len(centroids) == nlist, (len(centroids), nlist)
    return centroids
