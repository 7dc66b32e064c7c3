"""Cutting a group of unclaimed images in two where its neighbour graph nearly is two (`service.clusters`).

Two domains can lie near each other as a whole, a diffuse one touching a tight one, so that density clustering and
connected components make them one group, while nearly every image's nearest neighbours are its own domain's. A
spectral cut of the group's k-nearest-neighbour graph finds where the fewest links cross; its conductance (the
share of the smaller side's links that cross) says whether that is two domains. Measured on the tiny backbone
(docs/safety.md): one domain's best cut 0.041 and up (300-2000 images), two domains' 0.001-0.03 for most pairs.
"""

from __future__ import annotations

import math

import numpy as np

SPLIT_CONDUCTANCE = 0.03  # a group is cut where fewer of its neighbour links cross (tiny: one domain >= 0.041)
SPLIT_SAMPLE = 4096  # a larger group is cut through a sample of its rows
MAX_SPLITS = 16  # cuts per clustering, at most
SEED = 0


def _best_cut(x: np.ndarray, k: int, least: int) -> tuple[float, np.ndarray | None]:
    """The spectral cut of the rows' k-nearest-neighbour graph with the lowest conductance (the share of the
    smaller side's links that cross it) leaving at least `least` rows on each side: (conductance, one side's mask),
    or (inf, None) when there is none."""
    from scipy.sparse import coo_matrix, diags
    from scipy.sparse.linalg import ArpackError, eigsh
    from sklearn.neighbors import NearestNeighbors

    n = len(x)
    if n < 2 * least or n <= k:
        return math.inf, None
    _, nn = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x)
    graph = coo_matrix((np.ones(n * k), (np.repeat(np.arange(n), k), nn[:, 1:].ravel())), shape=(n, n)).tocsr()
    graph = ((graph + graph.T) > 0).astype(np.float64).tocoo()
    degree = np.bincount(graph.row, minlength=n).astype(np.float64)
    scale = diags(1 / np.sqrt(degree))
    try:  # the second eigenvector of the normalised adjacency orders the rows along the weakest cut
        _, vectors = eigsh(scale @ graph.tocsr() @ scale, k=2, which="LA", v0=np.sqrt(degree), maxiter=5000)
    except ArpackError:
        return math.inf, None
    # the one of the two least like the trivial top eigenvector (sqrt(degree)): a group in two disconnected parts
    # has the eigenvalue 1 twice, and taking the other by its eigenvalue missed the cut in 11 of 20 trials
    trivial = np.sqrt(degree) / np.linalg.norm(np.sqrt(degree))
    fiedler = vectors[:, int(np.argmin(np.abs(vectors.T @ trivial)))]
    order = np.argsort(scale @ fiedler, kind="stable")
    place = np.empty(n, np.int64)
    place[order] = np.arange(n)
    lo, hi = np.minimum(place[graph.row], place[graph.col]), np.maximum(place[graph.row], place[graph.col])
    crossing = np.cumsum(np.bincount(lo, minlength=n) - np.bincount(hi, minlength=n))[:-1] / 2  # links are twice
    volume = np.cumsum(degree[order])[:-1]
    smaller = np.arange(1, n)
    ok = (smaller >= least) & (n - smaller >= least)
    conductance = np.where(ok, crossing / np.maximum(np.minimum(volume, degree.sum() - volume), 1), np.inf)
    i = int(np.argmin(conductance))
    side = np.zeros(n, bool)
    side[order[: i + 1]] = True
    return float(conductance[i]), side


def split_groups(x: np.ndarray, labels: np.ndarray, k: int, least: int) -> np.ndarray:
    """`labels` with each group cut in two, again and again, where a cut of its neighbour graph has a conductance
    below SPLIT_CONDUCTANCE: two domains whose images lie near each other as a whole (a diffuse one touching a tight
    one) but whose images' neighbours are nearly all their own domain's. HDBSCAN and the connected components had
    made dice and digits one group; one domain's cuts measured 0.041 and up on the tiny backbone, two domains'
    0.001-0.03 (docs/safety.md)."""
    from sklearn.neighbors import NearestNeighbors

    labels, rng = labels.copy(), np.random.default_rng(SEED)
    queue, splits = list(range(int(labels.max()) + 1)), 0
    while queue and splits < MAX_SPLITS:
        group = queue.pop(0)
        members = np.flatnonzero(labels == group)
        sample = np.sort(rng.permutation(members)[:SPLIT_SAMPLE])
        conductance, side = _best_cut(x[sample].astype(np.float64), k, least)
        if side is None or conductance >= SPLIT_CONDUCTANCE:
            continue
        nearest = NearestNeighbors(n_neighbors=1).fit(x[sample]).kneighbors(x[members], return_distance=False)[:, 0]
        moved = members[side[nearest]]
        if least <= len(moved) <= len(members) - least:
            new = int(labels.max()) + 1
            labels[moved], splits = new, splits + 1
            queue += [group, new]
    return labels
