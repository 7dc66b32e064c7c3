"""Clusters of the unclaimed-traffic reservoir (`service.insights`): candidate new domains.

A cluster is a group of unclaimed images that lie where generic images do not. Density alone cannot say that: the
reservoir is often nearly all one new domain, and a density clustering (HDBSCAN) then sees one blob and returns
nothing. So each unclaimed embedding is first compared with a background, the backbone's reference set (generic
images, as the gate uses them): it is "foreign" when its nearest neighbours among reservoir and background rows
are nearly all reservoir rows. The foreign rows are grouped (HDBSCAN, or connected components when it sees one
group), then neighbours join their group. Numpy only at import; scikit-learn is imported when clustering runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .insights import ReservoirSnapshot

PCA_DIMS = 32  # clustering runs on this many principal components when the embeddings have more
NEIGHBOURS = 10  # k of the nearest-neighbour tests
FOREIGN_ODDS = 9.0  # how much more often than chance a cluster row's neighbours are unclaimed rather than generic
SEED = 0

ScoreTasks = Callable[[np.ndarray], tuple[list[str], np.ndarray]]


@dataclass(frozen=True)
class Cluster:
    """A group of unclaimed images that look alike: a candidate new domain."""

    id: int
    size: int  # members in the reservoir
    share: float  # share of auto traffic over the window this cluster stands for
    over_time: list[tuple[float, float]]  # (bin start, share of that bin's auto images)
    nearest_task: str | None  # the active task whose selector scores the members lowest (median); None: no task
    margin: float | None  # that task's median score minus 1 (<= 0 would mean claimed): how far from being claimed
    centroid: np.ndarray = field(repr=False, compare=False)  # normalised mean embedding
    members: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False, compare=False)
    # rows of the snapshot's embeddings in the cluster (for experiments and examples; not serialised)

    def to_json(self) -> dict:
        """The cluster without its centroid and members."""
        return {
            "id": self.id,
            "size": self.size,
            "share": self.share,
            "over_time": [[start, share] for start, share in self.over_time],
            "nearest_task": self.nearest_task,
            "margin": self.margin,
        }


def member_weights(snapshot: ReservoirSnapshot) -> tuple[np.ndarray, np.ndarray]:
    """Per embedding: the index of its bin, and how many unclaimed images it stands for (its bin's unclaimed count
    over the embeddings kept from that bin; above 1 once the ring has overwritten part of the bin)."""
    starts = np.array([b.start for b in snapshot.bins])
    where = np.clip(np.searchsorted(starts, snapshot.times, side="right") - 1, 0, max(len(starts) - 1, 0))
    kept = np.bincount(where, minlength=len(starts)) if len(starts) else np.zeros(0, np.int64)
    unclaimed = np.array([b.unclaimed for b in snapshot.bins], np.float64)
    weight = unclaimed[where] / np.maximum(kept[where], 1) if len(starts) else np.zeros(0)
    return where, np.maximum(weight, 1.0)


def _project(x: np.ndarray, background: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    """The reservoir's n rows followed by as many background rows, centred and on their first PCA_DIMS principal
    components. Without a background, a Gaussian with the reservoir's own spread along each component."""
    from sklearn.decomposition import PCA

    n = len(x)
    if background is not None and len(background):
        pick = rng.choice(len(background), size=min(n, len(background)), replace=False)
        x = np.concatenate([x, np.asarray(background, dtype=np.float32)[np.sort(pick)]])
    z = x.astype(np.float64) - x.mean(0)
    dims = min(PCA_DIMS, z.shape[1], len(z))
    if dims < z.shape[1]:
        z = PCA(dims, svd_solver="randomized", random_state=SEED).fit_transform(z)
    if len(z) == n:
        z = np.concatenate([z, rng.standard_normal((n, z.shape[1])) * z.std(0)])
    return z


def _foreign(z: np.ndarray, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Which of the first n rows (the reservoir) lie where the background does not: at least FOREIGN_ODDS times
    more of their k nearest neighbours are reservoir rows than the two sample sizes alone would give. Also
    returns every reservoir row's k neighbours."""
    from sklearn.neighbors import NearestNeighbors

    m = len(z) - n
    _, nn = NearestNeighbors(n_neighbors=k + 1).fit(z).kneighbors(z[:n])
    nn = nn[:, 1:]  # the row itself (or a copy of it) comes first
    r = np.count_nonzero(nn < n, axis=1)
    return r * m >= FOREIGN_ODDS * (k - r) * (n - 1), nn


def _components(z: np.ndarray, counts: np.ndarray, k: int, min_size: int) -> np.ndarray:
    """Connected components of the mutual k-nearest-neighbour graph of distinct rows `z` (`counts`: copies of
    each); rows of components with fewer than `min_size` copies in all get -1."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from sklearn.neighbors import NearestNeighbors

    labels = np.zeros(len(z), np.int64)
    if len(z) > 1:
        k = min(k, len(z) - 1)
        _, nn = NearestNeighbors(n_neighbors=k + 1).fit(z).kneighbors(z)
        rows = np.repeat(np.arange(len(z)), k)
        knn = coo_matrix((np.ones(len(rows)), (rows, nn[:, 1:].ravel())), shape=(len(z), len(z))).tocsr()
        labels = connected_components(knn.minimum(knn.T), directed=False)[1]
    big = np.flatnonzero(np.bincount(labels, weights=counts) >= min_size)
    return np.where(np.isin(labels, big), np.searchsorted(big, labels), -1)


def _groups(x: np.ndarray, z: np.ndarray, k: int, min_size: int) -> np.ndarray:
    """Group labels (-1: none) of rows: HDBSCAN on the distinct rows, or, when it sees a single group (HDBSCAN
    never returns the whole set as one cluster), the connected components."""
    from sklearn.cluster import HDBSCAN

    _, first, copies = np.unique(x, axis=0, return_index=True, return_inverse=True)
    z, copies = z[first], copies.ravel()
    groups = np.full(len(z), -1, np.int64)
    if len(z) >= min_size:
        groups = HDBSCAN(min_cluster_size=min_size, min_samples=min(k, min_size), copy=True).fit_predict(z)
    if groups.max() < 0:
        groups = _components(z, np.bincount(copies), k, min_size)
    return groups[copies]


def cluster_labels(x: np.ndarray, min_cluster_size: int, background: np.ndarray | None = None) -> np.ndarray:
    """Per reservoir row, a group label (-1: none). Rows are first kept only where unclaimed traffic is denser
    than `background` (generic images: the reference set); those are grouped (`_groups`); then a row joins the
    group most of its neighbours belong to."""
    n, labels = len(x), np.full(len(x), -1, np.int64)
    if not np.any(np.abs(x - x[0]) > 1e-6):  # all the same: one group
        return np.zeros(n, np.int64)
    z = _project(x, background, np.random.default_rng(SEED))
    k = min(NEIGHBOURS, n - 1)
    foreign, nn = _foreign(z, n, k)
    rows = np.flatnonzero(foreign)
    if len(rows) < min_cluster_size:
        return labels
    labels[rows] = _groups(x[rows], z[rows], k, min_cluster_size)
    votes = np.where(nn < n, labels[np.minimum(nn, n - 1)], -1)
    for i in np.flatnonzero(labels < 0):
        counts = np.bincount(votes[i][votes[i] >= 0], minlength=1)
        if counts.max() * 2 > k:
            labels[i] = int(counts.argmax())
    return labels


def find_clusters(
    snapshot: ReservoirSnapshot,
    score_tasks: ScoreTasks | None,
    min_share: float = 0.03,
    min_size: int = 20,
    max_clusters: int = 20,
    background: np.ndarray | None = None,
) -> list[Cluster]:
    """Clusters of the unclaimed embeddings that stand for at least `min_share` of the auto traffic in the window
    and have at least `min_size` members; biggest first, at most `max_clusters`. Deterministic.

    `score_tasks`: embeddings [n, D] -> (task names, selector scores [n, T]) of the active tasks, or None.
    `background`: normalised embeddings of generic images for this backbone (the reference set), the traffic no
    cluster is made of. Without it, a Gaussian fitted to the reservoir stands in: a tight group inside diffuse
    traffic is still found, but a reservoir holding nothing but one domain is not."""
    x, n, auto = snapshot.embeddings, len(snapshot), snapshot.auto_images
    if background is not None and (np.ndim(background) != 2 or np.shape(background)[1] != x.shape[1]):
        raise ValueError(f"background must be [m, {x.shape[1]}], got {list(np.shape(background))}")
    min_size = max(int(min_size), 2)
    if n < min_size or auto <= 0 or max_clusters < 1:
        return []
    where, weight = member_weights(snapshot)
    # the fewest members a cluster of min_share can have, at the mean weight: the smallest group to look for
    need = max(min_size, math.floor(min_share * auto / weight.mean()))
    if need > n:
        return []
    from threadpoolctl import threadpool_limits  # a dependency of scikit-learn

    with threadpool_limits(1, user_api="blas"):  # small matrices: one BLAS thread is faster, and leaves a core
        labels = cluster_labels(x, need, background)
    groups = [np.flatnonzero(labels == k) for k in range(int(labels.max()) + 1)]
    groups = [g for g in groups if len(g) >= min_size and weight[g].sum() / auto >= min_share]
    groups = sorted(groups, key=lambda g: (-len(g), int(g[0])))[:max_clusters]
    nearest = _nearest_tasks(x, groups, score_tasks)
    return [_cluster(k, g, snapshot, where, weight, nearest[k]) for k, g in enumerate(groups)]


def _cluster(
    k: int,
    members: np.ndarray,
    snapshot: ReservoirSnapshot,
    where: np.ndarray,
    weight: np.ndarray,
    nearest: tuple[str | None, float | None],
) -> Cluster:
    per_bin = np.bincount(where[members], weights=weight[members], minlength=len(snapshot.bins))
    over_time = [(b.start, float(per_bin[i] / b.auto_images)) for i, b in enumerate(snapshot.bins) if b.auto_images]
    centroid = snapshot.embeddings[members].astype(np.float64).mean(0)
    centroid /= max(float(np.linalg.norm(centroid)), 1e-12)
    share = float(weight[members].sum() / snapshot.auto_images)
    return Cluster(k, len(members), share, over_time, nearest[0], nearest[1], centroid.astype(np.float32), members)


def typical_members(snapshot: ReservoirSnapshot, cluster: Cluster, n: int) -> np.ndarray:
    """Rows of the snapshot of the cluster's n members nearest its centre, most typical first."""
    if n < 1 or not len(cluster.members):
        return np.zeros(0, np.int64)
    near = np.argsort(-(snapshot.embeddings[cluster.members] @ cluster.centroid), kind="stable")[:n]
    return cluster.members[near]


def _nearest_tasks(
    x: np.ndarray, groups: list[np.ndarray], score_tasks: ScoreTasks | None
) -> list[tuple[str | None, float | None]]:
    """Per group: the task whose selector scores its members lowest (median), and that median minus 1."""
    if not groups or score_tasks is None:
        return [(None, None)] * len(groups)
    names, scores = score_tasks(x[np.concatenate(groups)])
    scores = np.asarray(scores, dtype=np.float64)
    if not names or scores.ndim != 2 or scores.shape[1] == 0:
        return [(None, None)] * len(groups)
    out, a = [], 0
    for g in groups:
        med = np.median(np.where(np.isnan(scores[a : a + len(g)]), np.inf, scores[a : a + len(g)]), axis=0)
        t = int(np.argmin(med))
        out.append((str(names[t]), float(med[t] - 1.0)))
        a += len(g)
    return out
