"""Clusters of the unclaimed-traffic reservoir (`service.insights`): candidate new domains.

A cluster is a group of unclaimed images that lie more densely than generic images do. Density alone cannot say
that: the reservoir is often nearly all one new domain, and a density clustering (HDBSCAN) then sees one blob and
returns nothing. So the unclaimed embeddings are compared with a background, the backbone's reference set (generic
images, as the gate uses them), in two steps:
1. each embedding is a candidate when most of its nearest neighbours among reservoir rows and a sample of the
   background are reservoir rows; the candidates are grouped (HDBSCAN, or connected components when it sees one
   group), then neighbours join their group;
2. a group is kept only when it is GROUP_ODDS times denser than background rows the first step did not see: around
   each member, the reservoir's k-neighbour ball holds k reservoir rows; those balls are counted in held-out rows.
A domain that looks like generic images (the tiny backbone's own pretraining scenes) is found by its concentration,
while generic traffic, however much of it, is not a cluster. Numpy only at import; scikit-learn is imported when
clustering runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .cluster_cuts import split_groups
from .insights import ReservoirSnapshot

PCA_DIMS = 32  # clustering runs on this many principal components when the embeddings have more
NEIGHBOURS = 10  # k of the nearest-neighbour tests
GROUP_SAMPLE = 4096  # candidates beyond this many are grouped through a sample of them
COVERED = 0.5  # HDBSCAN leaving more of the candidates than this in no group is tried at larger least sizes
COMPONENT_NEIGHBOURS = 7  # k of the mutual-neighbour graph (at 10, a few links merged a diffuse and a tight domain)
CANDIDATE_ODDS = 2.0  # how much more often than chance a candidate's neighbours are unclaimed rather than generic
GROUP_ODDS = 2.5  # how much denser than held-out generic rows a group must be (tiny: generic traffic up to 1.9)
HELD_OUT_ROWS = 8  # held-out background rows for the group test, per reservoir row (as many as the set has)
MAX_HELD_OUT = 4096  # and at most this many: the test's time grows with them
MIN_BACKGROUND = 256  # fewer reference rows than this are ignored (50 let generic traffic form a 16% cluster)
DENSITY_SAMPLE = 1024  # members per group whose balls are counted (all of them in a smaller group)
DENSITY_CHUNK = 1024  # reservoir rows per block of distances to the held-out rows (1024 x 4096 x 4 B = 16 MiB)
LEFTOVER_OWN = 0.75  # a leftover group's links to reservoir rows that stay in it (a domain: 0.88+; a fringe: 0.6-)
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
    moved_by_labels: float = 0.0  # share of members a task's selector claimed, sent away by their requests' labels

    def to_json(self) -> dict:
        """The cluster without its centroid and members."""
        return {
            "id": self.id,
            "size": self.size,
            "share": self.share,
            "over_time": [[start, share] for start, share in self.over_time],
            "nearest_task": self.nearest_task,
            "margin": self.margin,
            "moved_by_labels": self.moved_by_labels,
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


def _held_out_rows(n: int) -> int:
    return min(HELD_OUT_ROWS * n, MAX_HELD_OUT)


def _project(x: np.ndarray, background: np.ndarray | None, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(z, held_out): the reservoir's n rows followed by a background sample of up to n rows, centred and on their
    first PCA_DIMS principal components; and up to `_held_out_rows(n)` other background rows, as they are (the
    group test runs in the embedding space: a projection fitted on the reservoir makes held-out rows look nearer).
    Without a background (or with fewer than 2 rows), Gaussians with the reservoir's spread stand in for both."""
    from sklearn.decomposition import PCA

    n, bg = len(x), None if background is None else np.asarray(background, dtype=np.float32)
    if bg is not None and len(bg) >= 2:
        order = rng.permutation(len(bg))
        m = min(n, len(bg) // 2)
        x, held = np.concatenate([x, bg[np.sort(order[:m])]]), bg[np.sort(order[m : m + _held_out_rows(n)])]
    else:
        spread = x.astype(np.float64).std(0)
        held = (x.mean(0) + rng.standard_normal((_held_out_rows(n), x.shape[1])) * spread).astype(np.float32)
    z = x.astype(np.float64) - x.astype(np.float64).mean(0)
    dims = min(PCA_DIMS, z.shape[1], len(z))
    if dims < z.shape[1]:
        z = PCA(dims, svd_solver="randomized", random_state=SEED).fit_transform(z)
    if len(z) == n:
        z = np.concatenate([z, rng.standard_normal((n, z.shape[1])) * z.std(0)])
    return z, held


def _candidates(z: np.ndarray, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Which of the first n rows (the reservoir) lie where the background sample is sparse: at least CANDIDATE_ODDS
    times more of their k nearest neighbours are reservoir rows than the two sample sizes alone would give. Also
    returns every reservoir row's k neighbours."""
    from sklearn.neighbors import NearestNeighbors

    m = len(z) - n
    _, nn = NearestNeighbors(n_neighbors=k + 1).fit(z).kneighbors(z[:n])
    nn = nn[:, 1:]  # the row itself (or a copy of it) comes first
    r = np.count_nonzero(nn < n, axis=1)
    return r * m >= CANDIDATE_ODDS * (k - r) * (n - 1), nn


def _dense_groups(x: np.ndarray, labels: np.ndarray, k: int, held_out: np.ndarray) -> np.ndarray:
    """`labels` (of the reservoir's rows `x`) keeping only the groups at least GROUP_ODDS times denser than the
    held-out background rows: each member's ball to its k-th reservoir neighbour holds k of the n reservoir rows,
    and a share of `held_out` counted here. Kept groups are renumbered from 0; the others' rows get -1. Memory:
    sklearn's chunked neighbours, then DENSITY_CHUNK rows at a time."""
    from sklearn.neighbors import NearestNeighbors

    n, out, kept = len(x), np.full(len(x), -1, np.int64), 0
    x, held_out = x.astype(np.float32), held_out.astype(np.float32)
    rng = np.random.default_rng(SEED)  # the ratio is a mean over members: DENSITY_SAMPLE of a group estimate it
    grouped = np.sort(
        np.concatenate(
            [rng.permutation(np.flatnonzero(labels == g))[:DENSITY_SAMPLE] for g in range(int(labels.max()) + 1)]
        )
    )
    radius = np.zeros(n, np.float32)  # each member's distance to its k-th reservoir neighbour
    radius[grouped] = NearestNeighbors(n_neighbors=k + 1, algorithm="brute").fit(x).kneighbors(x[grouped])[0][:, -1]
    norms, held_norms = np.einsum("ij,ij->i", x, x), np.einsum("ij,ij->i", held_out, held_out)
    inside = np.zeros(n, np.int64)  # held-out rows in each member's ball
    for a in range(0, len(grouped), DENSITY_CHUNK):
        rows = grouped[a : a + DENSITY_CHUNK]
        d = norms[rows, None] + held_norms[None, :] - 2 * (x[rows] @ held_out.T)  # squared distances
        inside[rows] = np.count_nonzero(d <= radius[rows, None] ** 2, axis=1)
    for g in range(int(labels.max()) + 1):
        members, sampled = np.flatnonzero(labels == g), grouped[labels[grouped] == g]
        if len(sampled) and len(sampled) * k * len(held_out) >= GROUP_ODDS * n * int(inside[sampled].sum()):
            out[members], kept = kept, kept + 1
    return out


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
    never returns the whole set as one cluster), the connected components. With fewer distinct rows than a group
    needs, only copies can make one: each distinct image with at least `min_size` copies is its own group
    (linking a handful of unrelated images as neighbours made them one "domain")."""
    _, first, copies = np.unique(x, axis=0, return_index=True, return_inverse=True)
    z, copies = z[first], copies.ravel()
    counts = np.bincount(copies)
    if len(z) < min_size:
        big = np.flatnonzero(counts >= min_size)
        return np.where(np.isin(copies, big), np.searchsorted(big, copies), -1)
    if len(z) > GROUP_SAMPLE:  # HDBSCAN's time grows faster than the rows: group a sample, then spread it
        return _sampled_groups(z, k, min_size)[copies]
    groups = _hdbscan(z, k, min_size)
    if groups.max() < 0:
        groups = _components(z, counts, min(k, COMPONENT_NEIGHBOURS), min_size)
    return groups[copies]


def _hdbscan(z: np.ndarray, k: int, min_size: int) -> np.ndarray:
    """HDBSCAN's groups of rows at `min_size`; when they leave most rows in no group, at doublings of it. A large
    domain with sub-structure (its backgrounds, say) came out as its two densest leaves, 103 of its 300 images,
    the rest in no group; at a larger least size HDBSCAN sees it as one blob, so no group, and `_groups` takes the
    connected components. Groups of a larger size that does cover most rows get those of the first clustering it
    leaves mostly in no group (a small domain beside the large one)."""
    from sklearn.cluster import HDBSCAN

    def fit(size: int) -> np.ndarray:
        return HDBSCAN(min_cluster_size=size, min_samples=min(k, size), copy=True).fit_predict(z)

    first = groups = fit(min_size)
    size = min_size
    while first.max() >= 0 and (groups >= 0).mean() < COVERED and size * 2 <= len(z) // 2:  # none: one blob already
        size *= 2
        groups = fit(size)
        if groups.max() < 0:  # one blob
            return groups
    if groups is first or (groups >= 0).mean() < COVERED:
        return first
    for g in range(int(first.max()) + 1):
        rows = first == g
        if (groups[rows] < 0).mean() > 0.5:
            groups = np.where(rows & (groups < 0), int(groups.max()) + 1, groups)
    return groups


def _sampled_groups(z: np.ndarray, k: int, min_size: int) -> np.ndarray:
    """Groups of GROUP_SAMPLE distinct rows drawn at random (`min_size` scaled to the sample), each other row
    taking the group of its nearest sampled row."""
    from sklearn.neighbors import NearestNeighbors

    pick = np.sort(np.random.default_rng(SEED).choice(len(z), GROUP_SAMPLE, replace=False))
    size = max(2, math.ceil(min_size * GROUP_SAMPLE / len(z)))
    sample = _groups(z[pick], z[pick], k, size)  # distinct rows: no copies to merge
    nearest = NearestNeighbors(n_neighbors=1).fit(z[pick]).kneighbors(z, return_distance=False)[:, 0]
    return sample[nearest]


def cluster_labels(x: np.ndarray, min_cluster_size: int, background: np.ndarray | None = None) -> np.ndarray:
    """Per reservoir row, a group label (-1: none). Candidates are rows where unclaimed traffic is denser than
    `background` (generic images: the reference set); they are grouped (`_groups`); a row joins the group most of
    its neighbours belong to; the candidates left in none are grouped on their own (a diffuse domain beside tight
    ones was all HDBSCAN noise); groups are cut where their neighbour graph is nearly two (`service.cluster_cuts`); then
    only groups denser than held-out background rows are kept (`_dense_groups`)."""
    n, labels = len(x), np.full(len(x), -1, np.int64)
    if not np.any(np.abs(x - x[0]) > 1e-6):  # all the same: one group
        return np.zeros(n, np.int64)
    z, held_out = _project(x, background, np.random.default_rng(SEED))
    k = min(NEIGHBOURS, n - 1)
    candidate, nn = _candidates(z, n, k)
    rows = np.flatnonzero(candidate)
    if len(rows) < min_cluster_size:
        return labels
    labels[rows] = _groups(x[rows], z[rows], k, min_cluster_size)
    votes = np.where(nn < n, labels[np.minimum(nn, n - 1)], -1)
    for i in np.flatnonzero(labels < 0):
        counts = np.bincount(votes[i][votes[i] >= 0], minlength=1)
        if counts.max() * 2 > k:
            labels[i] = int(counts.argmax())
    rest = rows[labels[rows] < 0]
    if len(rest) >= min_cluster_size:
        more, first = _groups(x[rest], z[rest], k, min_cluster_size), int(labels.max()) + 1
        labels[rest] = np.where(more >= 0, more + first, -1)
        for g in range(first, int(labels.max()) + 1):  # the fringe of a group found above is no domain of its own
            links = nn[labels == g]
            links = labels[links[links < n]]
            if np.count_nonzero(links == g) < LEFTOVER_OWN * len(links):
                labels[labels == g] = -1
    if labels.max() < 0:
        return labels
    return _dense_groups(x, split_groups(x, labels, k, min_cluster_size), k, held_out)


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
    if not (math.isfinite(min_share) and float(min_size).is_integer() and float(max_clusters).is_integer()):
        raise ValueError(
            f"min_share must be finite, min_size and max_clusters whole: {min_share}, {min_size}, {max_clusters}"
        )
    if not np.isfinite(x).all() or (background is not None and not np.isfinite(background).all()):
        raise ValueError("embeddings and background must be finite")
    if background is not None and len(background) < MIN_BACKGROUND:
        background = None  # too few generic rows to test a density against: the Gaussian stand-in is fairer
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
    moved = float(snapshot.moved[members].mean()) if snapshot.moved is not None and len(members) else 0.0
    centroid = centroid.astype(np.float32)
    return Cluster(k, len(members), share, over_time, *nearest, centroid, members, moved)


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
