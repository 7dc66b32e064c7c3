"""The unclaimed-traffic monitor without a server: the bounded reservoir, and the clusters it shows."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from service.clusters import Cluster, find_clusters
from service.insights import ReservoirConfig, UnclaimedReservoir

DIM = 64


def _normalised(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _noise(n: int, seed: int) -> np.ndarray:
    """Diffuse unclaimed traffic: directions spread over the whole sphere."""
    return _normalised(np.random.default_rng(seed).standard_normal((n, DIM)))


def _blob(n: int, seed: int, spread: float = 0.15) -> np.ndarray:
    """A new domain: images that look alike, around one direction."""
    rng = np.random.default_rng(seed)
    center = rng.standard_normal(DIM)
    center /= np.linalg.norm(center)
    return _normalised(center + spread * rng.standard_normal((n, DIM)) / np.sqrt(DIM))


def _fill(reservoir: UnclaimedReservoir, auto: int, unclaimed: np.ndarray, t0: float = 0.0, dt: float = 0.1) -> float:
    """`auto` images in batches of 20, the unclaimed ones spread evenly over them; returns the time after."""
    batches = auto // 20
    parts = np.array_split(unclaimed, batches)
    for b, part in enumerate(parts):
        reservoir.record(20, part, now=t0 + b * 20 * dt)
    return t0 + batches * 20 * dt


def _mixed(blob: int, noise: int, seed: int = 0) -> np.ndarray:
    """Blob and noise rows interleaved at random, as they would arrive."""
    x = np.concatenate([_blob(blob, seed), _noise(noise, seed + 1)])
    return x[np.random.default_rng(seed + 2).permutation(len(x))]


def test_keeps_only_the_newest_capacity_embeddings_oldest_first():
    r = UnclaimedReservoir(ReservoirConfig(capacity=5), dim=3)
    rows = np.arange(24, dtype=np.float32).reshape(8, 3)
    r.record(4, rows[:3], now=1.0)
    r.record(10, rows[3:8], now=2.0)
    snap = r.snapshot(now=3.0)
    assert len(r) == 5 and len(snap) == 5
    np.testing.assert_array_equal(snap.embeddings, rows[3:8])
    assert snap.times.tolist() == [2.0] * 5
    r.record(9, rows[:7], now=4.0)  # more than the capacity in one batch: its last five
    np.testing.assert_array_equal(r.snapshot(now=4.0).embeddings, rows[2:7])
    assert snap.embeddings[0, 0] == 9.0  # a snapshot is a copy


def test_each_kept_embedding_keeps_whether_label_aware_routing_sent_it_away():
    """An outside check's: images a task's selector claimed, sent to zero-shot because their labels named none of
    its classes, were said to be served by that task "since". Each slot now keeps why its image came."""
    r = UnclaimedReservoir(ReservoirConfig(capacity=4), dim=3)
    rows = np.arange(1, 19, dtype=np.float32).reshape(6, 3)
    r.record(5, rows[:3], now=1.0, moved=np.array([True, False, True]))
    r.record(5, rows[3:6], now=2.0)  # none moved; the ring overwrites the oldest two
    snap = r.snapshot(now=3.0)
    np.testing.assert_array_equal(snap.embeddings, rows[2:6])
    assert snap.moved.tolist() == [True, False, False, False]
    zero = np.zeros(3, np.float32)  # an unusable row is left out with its flag
    r.record(2, np.stack([zero, rows[0]]), now=4.0, moved=np.array([False, True]))
    assert r.snapshot(now=4.0).moved.tolist() == [False, False, False, True]
    with pytest.raises(ValueError, match="one flag per unclaimed embedding"):
        r.record(2, rows[:2], now=5.0, moved=np.array([True]))
    big = UnclaimedReservoir(ReservoirConfig(capacity=2048), dim=DIM)  # a domain, a quarter of it moved
    blob, noise = _blob(120, 3), _noise(400, 4)
    flags = np.arange(120) % 4 == 0
    for a in range(0, 120, 20):
        big.record(
            100,
            np.concatenate([blob[a : a + 20], noise[a * 3 : a * 3 + 60]]),
            now=a,
            moved=np.r_[flags[a : a + 20], np.zeros(60, bool)],
        )
    (cluster,) = find_clusters(big.snapshot(now=200.0), None)
    in_blob = cluster.members % 80 < 20  # rows of the blob: the first 20 of each record of 80
    assert in_blob.mean() > 0.9
    expected = big.snapshot(now=200.0).moved[cluster.members].mean()
    assert cluster.moved_by_labels == pytest.approx(expected) and 0.15 <= cluster.moved_by_labels <= 0.35


def test_drops_embeddings_and_bins_older_than_the_retention():
    r = UnclaimedReservoir(ReservoirConfig(capacity=100, retention_seconds=10.0, bin_seconds=1.0), dim=2)
    for t in (0.0, 5.5, 12.0):
        r.record(3, np.full((1, 2), t, np.float32), now=t)
    snap = r.snapshot(now=12.5)  # cut-off 2.5: the first record is gone
    assert snap.times.tolist() == [5.5, 12.0]
    assert [(b.start, b.auto_images, b.unclaimed) for b in snap.bins] == [(5.0, 3, 1), (12.0, 3, 1)]
    assert len(r) == 2
    late = r.snapshot(now=30.0)
    assert len(late) == 0 and late.bins == [] and len(r) == 0


def test_unclaimed_images_that_expired_leave_the_counts_of_a_bin_the_retention_cuts():
    """An outside check (retention 30 s, bins of 5 s): 120 images of one domain, then 120 of another 31 s later.
    The first ones' embeddings had expired but their bin still counted them, so the second domain's cluster read
    a share of 0.49 for up to a bin, where all the unclaimed traffic kept is that domain."""
    r = UnclaimedReservoir(ReservoirConfig(capacity=1000, retention_seconds=30.0, bin_seconds=5.0), dim=2)
    r.record(130, np.full((120, 2), 0.5, np.float32), now=1001.0)  # 10 of them claimed by a task
    r.record(120, np.ones((120, 2), np.float32), now=1032.0)
    snap = r.snapshot(now=1033.0)  # cut-off 1003: the bin of 1000-1005 is partly inside
    assert [(b.start, b.auto_images, b.unclaimed) for b in snap.bins] == [(1000.0, 0, 0), (1030.0, 120, 120)]
    assert (snap.auto_images, snap.unclaimed, len(snap)) == (120, 120, 120)
    # steady traffic, 10% unclaimed (the review): the cut bin keeps its share, prorated, not 0% of its auto images
    r = UnclaimedReservoir(ReservoirConfig(capacity=10_000, retention_seconds=30.0, bin_seconds=10.0), dim=2)
    for t in range(1000, 1055):
        r.record(100, np.full((10, 2), 0.5, np.float32), now=float(t))
    snap = r.snapshot(now=1055.0)  # cut-off 1025: 5 of its 10 records kept
    assert snap.bins[0].start == 1020.0 and (snap.bins[0].auto_images, snap.bins[0].unclaimed) == (500, 50)
    assert snap.unclaimed / snap.auto_images == pytest.approx(0.1)


def test_the_window_holds_the_claimed_traffic_before_the_first_unclaimed_image():
    """77 images a task claimed, then 30 it did not, a bin later: 30 of 107 went to zero-shot, not 30 of 30 (the
    window once started at the oldest kept embedding even when the ring had never overwritten one)."""
    r = UnclaimedReservoir(ReservoirConfig(capacity=100, retention_seconds=600.0, bin_seconds=60.0), dim=2)
    r.record(77, np.zeros((0, 2), np.float32), now=1000.0)
    r.record(30, np.ones((30, 2), np.float32), now=1070.0)
    snap = r.snapshot(now=1080.0)
    assert (snap.auto_images, snap.unclaimed, len(snap)) == (107, 30, 30)
    r.record(20, np.ones((80, 2), np.float32)[:20], now=1130.0)
    r.record(60, np.ones((60, 2), np.float32), now=1190.0)  # the ring overwrites 10 of the first 30
    snap = r.snapshot(now=1200.0)  # from the oldest kept record: 20 of its 30 are kept, so it counts as 20 of 20
    assert [(b.start, b.auto_images, b.unclaimed) for b in snap.bins] == [
        (1020.0, 20, 20),
        (1080.0, 20, 20),
        (1140.0, 60, 60),
    ]
    assert len(snap) == 100 and snap.start == 1070.0


def test_a_late_record_counts_as_the_newest():
    r = UnclaimedReservoir(ReservoirConfig(capacity=10, bin_seconds=10.0), dim=2)
    r.record(4, np.ones((1, 2), np.float32), now=100.0)
    r.record(6, np.ones((2, 2), np.float32), now=55.0)  # another thread's clock, a little behind
    snap = r.snapshot(now=101.0)
    assert snap.times.tolist() == [100.0] * 3
    assert [(b.start, b.auto_images, b.unclaimed) for b in snap.bins] == [(100.0, 10, 3)]


def test_memory_stays_bounded_under_a_long_stream():
    cfg = ReservoirConfig(capacity=64, retention_seconds=30.0, bin_seconds=1.0)
    r = UnclaimedReservoir(cfg, dim=32)
    before = r.nbytes
    assert before == 64 * 32 * 4 + 64 * 49 + cfg.max_bins * 3 * 8  # embeddings; times, stamps, records, moved; bins
    rows = _noise(3, seed=0)[:, :32].copy()
    for i in range(100_000):
        r.record(5, rows, now=i * 0.05)
    assert r.nbytes == before
    assert len(r) == 64
    snap = r.snapshot(now=100_000 * 0.05)
    assert len(snap.bins) <= cfg.max_bins == 31
    assert sum(b.unclaimed for b in snap.bins) >= 64 and snap.times.min() >= 100_000 * 0.05 - 30.0


def test_the_bins_are_bounded_and_a_window_they_cannot_cover_is_refused():
    """A retention of more bins than are kept was once cut silently (and still reported whole)."""
    cfg = ReservoirConfig(capacity=8, retention_seconds=9999.0, bin_seconds=1.0)
    assert cfg.max_bins == 10_000
    assert UnclaimedReservoir(cfg, dim=4).nbytes < 8 * 4 * 4 + 8 * 48 + 10_001 * 24
    with pytest.raises(ValueError, match="retention_seconds / bin_seconds must be at most 9999"):
        ReservoirConfig(capacity=8, retention_seconds=86400.0, bin_seconds=1.0)


def test_capacity_zero_turns_the_monitor_off():
    r = UnclaimedReservoir(ReservoirConfig(capacity=0), dim=DIM)
    r.record(10, _noise(4, seed=0), now=1.0)
    snap = r.snapshot(now=2.0)
    assert len(r) == 0 and len(snap) == 0 and snap.bins == [] and snap.embeddings.shape == (0, DIM)
    assert r.nbytes == 0
    assert find_clusters(snap, None) == []


def test_a_record_must_fit_the_reservoir():
    r = UnclaimedReservoir(ReservoirConfig(capacity=8), dim=4)
    with pytest.raises(ValueError, match=r"\[k, 4\]"):
        r.record(3, np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match="only 1 auto-routed"):
        r.record(1, np.zeros((2, 4), np.float32))
    r.record(3, np.zeros((0, 4), np.float32), now=1.0)  # nothing unclaimed: only counted
    assert len(r) == 0 and [(b.auto_images, b.unclaimed) for b in r.snapshot(now=1.0).bins] == [(3, 0)]


def _fake_scores(center: np.ndarray):
    """Task "near" scores images close to `center` just above 1 (almost claimed); "far" scores everything 5."""

    def score(e: np.ndarray) -> tuple[list[str], np.ndarray]:
        near = 1.0 + (1.0 - e @ center)
        return ["far", "near"], np.stack([np.full(len(e), 5.0), near], axis=1)

    return score


def test_a_new_domain_at_ten_percent_of_traffic_is_one_cluster():
    r = UnclaimedReservoir(ReservoirConfig(), dim=DIM)
    x = _mixed(blob=200, noise=400)  # 600 of 2000 auto images unclaimed; the blob is 10% of the traffic
    end = _fill(r, 2000, x)
    blob = _blob(200, 0)
    center = _normalised(blob.mean(0, keepdims=True))[0]
    clusters = find_clusters(r.snapshot(now=end), _fake_scores(center))
    assert len(clusters) == 1
    c = clusters[0]
    assert isinstance(c, Cluster) and c.id == 0
    assert 190 <= c.size <= 200 and c.share == pytest.approx(c.size / 2000)
    assert np.count_nonzero(np.isin(x[c.members], blob).all(axis=1)) == c.size  # members are the blob's rows
    assert c.nearest_task == "near"
    expected = np.median(1.0 + (1.0 - x[c.members] @ center)) - 1.0
    assert c.margin == pytest.approx(expected, rel=1e-5) and 0.0 < c.margin < 0.1
    assert float(c.centroid @ center) > 0.99 and np.linalg.norm(c.centroid) == pytest.approx(1.0, abs=1e-5)
    assert set(c.to_json()) == {"id", "size", "share", "over_time", "nearest_task", "margin", "moved_by_labels"}
    assert find_clusters(r.snapshot(now=end), None)[0].nearest_task is None  # no tasks
    empty = find_clusters(r.snapshot(now=end), lambda e: ([], np.zeros((len(e), 0))))
    assert (empty[0].nearest_task, empty[0].margin) == (None, None)


def test_a_reservoir_of_one_domain_needs_the_reference_set_to_be_a_cluster():
    r = UnclaimedReservoir(ReservoirConfig(), dim=DIM)
    domain = _blob(300, seed=11, spread=1.0)  # broad (cosine to its centre ~0.7): no core denser than the rest
    end = _fill(r, 3000, domain)  # everything unclaimed is this domain, 10% of the traffic
    snap = r.snapshot(now=end)
    assert find_clusters(snap, None) == []  # alone, one blob is indistinguishable from diffuse traffic
    generic = _noise(2000, seed=12)
    clusters = find_clusters(snap, None, background=generic)
    assert [c.size for c in clusters] == [300] and clusters[0].share == pytest.approx(0.10)
    same = find_clusters(r.snapshot(now=end), None, background=np.concatenate([generic, domain[:5]]))
    assert [c.size for c in same] == [pytest.approx(300, abs=3)]  # a few look-alikes among the generic images
    with pytest.raises(ValueError, match="background must be"):
        find_clusters(snap, None, background=generic[:, :10])


def test_generic_unclaimed_traffic_is_no_cluster_against_the_reference_set():
    r = UnclaimedReservoir(ReservoirConfig(), dim=DIM)
    end = _fill(r, 2000, _noise(800, seed=13))  # unclaimed traffic that looks like the generic images
    assert find_clusters(r.snapshot(now=end), None, background=_noise(2000, seed=14)) == []


def _modes(n: int, seed: int, modes: int = 6, only: int | None = None) -> np.ndarray:
    """Generic images of a world with `modes` kinds of picture (broad blobs), evenly; or of kind `only` alone."""
    rng = np.random.default_rng(seed)
    centres = _normalised(np.random.default_rng(99).standard_normal((modes, DIM)))
    kind = np.full(n, only) if only is not None else rng.integers(modes, size=n)
    return _normalised(centres[kind] + 0.8 * rng.standard_normal((n, DIM)) / np.sqrt(DIM))


@pytest.mark.parametrize("generic_share", [0.0, 0.5])
def test_a_domain_that_looks_generic_is_found_by_its_concentration(generic_share):
    """A domain made of one kind of generic picture (as the tiny backbone's own scenes are) is no more foreign than
    the reference set, but it is several times denser than generic images are: a cluster. As much generic
    traffic again beside it changes nothing, and generic traffic alone, however much of it, is no cluster."""
    background, r = _modes(3000, seed=1), UnclaimedReservoir(ReservoirConfig(), dim=DIM)
    domain, generic = _modes(150, seed=2, only=0), _modes(int(300 * generic_share), seed=3)
    x = np.concatenate([domain, generic])
    order = np.random.default_rng(4).permutation(len(x))
    end = _fill(r, 1500, x[order])  # the domain is 10% of the traffic
    (cluster,) = find_clusters(r.snapshot(now=end), None, background=background)
    members = order[cluster.members]
    assert (members < 150).sum() >= 80 and (members < 150).mean() > 0.8, members  # most of it, and little else
    r = UnclaimedReservoir(ReservoirConfig(), dim=DIM)
    end = _fill(r, 1500, _modes(1200, seed=5))
    assert find_clusters(r.snapshot(now=end), None, background=background) == []


def test_diffuse_unclaimed_traffic_is_no_cluster():
    r = UnclaimedReservoir(ReservoirConfig(), dim=DIM)
    end = _fill(r, 2000, _noise(800, seed=3))
    assert find_clusters(r.snapshot(now=end), None) == []


def test_a_blob_below_min_share_is_not_shown():
    r = UnclaimedReservoir(ReservoirConfig(), dim=DIM)
    end = _fill(r, 2000, _mixed(blob=40, noise=400))  # 2% of traffic, 40 members
    snap = r.snapshot(now=end)
    assert find_clusters(snap, None) == []
    found = find_clusters(snap, None, min_share=0.01)  # the same blob, with a lower bar
    assert len(found) == 1 and found[0].share == pytest.approx(found[0].size / 2000)
    assert find_clusters(snap, None, min_share=0.01, min_size=50) == []  # and too few members for min_size


def test_fewer_embeddings_than_min_size_is_no_cluster():
    r = UnclaimedReservoir(ReservoirConfig(), dim=DIM)
    r.record(20, _blob(19, seed=0), now=1.0)
    assert find_clusters(r.snapshot(now=1.0), None) == []


def test_identical_embeddings_are_one_cluster():
    r = UnclaimedReservoir(ReservoirConfig(), dim=DIM)
    same = np.repeat(_blob(1, seed=0), 100, axis=0)
    end = _fill(r, 400, same)
    clusters = find_clusters(r.snapshot(now=end), None)
    assert [(c.size, c.share) for c in clusters] == [(100, 0.25)]
    mixed = np.concatenate([same[:60], _noise(100, seed=1)])
    end = _fill(r, 400, mixed, t0=end)
    assert [c.size for c in find_clusters(r.snapshot(now=end), None)] == [160]  # both blobs of copies


def test_share_over_time_shows_when_the_domain_arrived():
    r = UnclaimedReservoir(ReservoirConfig(bin_seconds=10.0), dim=DIM)
    t = _fill(r, 1000, _noise(300, seed=4))  # 100 s of known traffic only
    t = _fill(r, 1000, _mixed(blob=200, noise=300, seed=5), t0=t)  # then the new domain: 20% of the next 100 s
    clusters = find_clusters(r.snapshot(now=t), None)
    assert len(clusters) == 1
    over = dict(clusters[0].over_time)
    assert sorted(over) == [10.0 * k for k in range(20)]
    assert all(over[s] == 0.0 for s in over if s < 100.0)
    assert np.mean([over[s] for s in over if s >= 100.0]) == pytest.approx(0.2, abs=0.02)
    assert clusters[0].share == pytest.approx(clusters[0].size / 2000)


def test_once_the_ring_overwrote_the_share_is_of_the_traffic_since_its_oldest_kept_record():
    """1200 unclaimed of 4000 in one bin, of which the ring keeps the newest 300: the share is of the traffic since
    the oldest kept record (about 1000 images), not of the whole bin with each kept image weighted up to stand for
    four: traffic that changed within the bin (300 digits, then 300 glyphs) read as glyphs at 100%."""
    r = UnclaimedReservoir(ReservoirConfig(capacity=300, bin_seconds=1000.0), dim=DIM)
    end = _fill(r, 4000, _mixed(blob=400, noise=800, seed=6))
    snap = r.snapshot(now=end)
    assert len(snap) == 300 and snap.unclaimed == 300 and 950 <= snap.auto_images <= 1050
    assert snap.start == snap.times[0] > 0.0
    clusters = find_clusters(snap, None, min_size=10)
    assert len(clusters) == 1
    assert clusters[0].size < 150 and clusters[0].share == pytest.approx(0.10, abs=0.02)
    assert clusters[0].share == pytest.approx(clusters[0].size / snap.auto_images)
    assert clusters[0].over_time == [(0.0, pytest.approx(clusters[0].share))]

    changed = UnclaimedReservoir(ReservoirConfig(capacity=100, bin_seconds=60.0), dim=DIM)
    t = _fill(changed, 300, _blob(300, seed=1), t0=0.0, dt=0.01)  # one domain, then another, all unclaimed
    t = _fill(changed, 300, _blob(300, seed=2), t0=t, dt=0.01)
    snap = changed.snapshot(now=t)  # what is kept is the second domain's: 100 of 100 since the oldest kept record
    assert (snap.auto_images, snap.unclaimed, len(snap)) == (100, 100, 100)


def test_clusters_are_deterministic_and_biggest_first():
    r = UnclaimedReservoir(ReservoirConfig(), dim=DIM)
    x = np.concatenate([_blob(150, seed=7), _blob(250, seed=8), _noise(300, seed=9)])
    end = _fill(r, 2000, x[np.random.default_rng(0).permutation(len(x))])
    first = find_clusters(r.snapshot(now=end), None)
    again = find_clusters(r.snapshot(now=end), None)
    assert [c.size for c in first] == [c.size for c in again]
    assert [c.id for c in first] == [0, 1] and first[0].size > first[1].size >= 140
    assert find_clusters(r.snapshot(now=end), None, max_clusters=1)[0].size == first[0].size


def test_threads_recording_at_once_lose_nothing():
    r = UnclaimedReservoir(ReservoirConfig(capacity=10_000), dim=8)
    rows = _noise(2, seed=10)[:, :8].copy()

    def client(k: int) -> None:
        for i in range(500):
            r.record(3, rows, now=100.0 + i * 0.01)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    snap = r.snapshot(now=200.0)
    assert len(r) == len(snap) == 8 * 500 * 2
    assert snap.auto_images == 8 * 500 * 3 and snap.unclaimed == 8 * 500 * 2
    assert np.all(np.diff(snap.times) >= 0)  # time never runs backwards in the ring


def test_opt_in_thumbnails_follow_their_embeddings_and_are_wiped_when_they_expire():
    """Thumbnails share their embedding's slot: a snapshot finds them again by slot and write, gets None for a
    slot written again since (it holds another image now), and their pixels are zeroed (not merely hidden)
    once the retention drops them. Memory stays fixed."""
    cfg = ReservoirConfig(capacity=4, retention_seconds=10.0, bin_seconds=1.0, thumbnail=16)
    r = UnclaimedReservoir(cfg, dim=2)
    assert r.nbytes == UnclaimedReservoir(ReservoirConfig(4, 10.0, 1.0), dim=2).nbytes + 4 * 16 * 16 * 3
    thumbs = np.stack([np.full((16, 16, 3), v, np.uint8) for v in (10, 20, 30, 40, 50, 60)])
    r.record(3, np.ones((2, 2), np.float32), now=1.0, thumbnails=thumbs[:2])
    r.record(5, np.ones((3, 2), np.float32), now=5.0, thumbnails=thumbs[2:5])  # the ring drops the first
    snap = r.snapshot(now=6.0)
    assert [t[0, 0, 0] for t in r.thumbnails(snap.slots, snap.stamps)] == [20, 30, 40, 50]
    r.record(1, np.ones((1, 2), np.float32), now=7.0, thumbnails=thumbs[5:])  # overwrites 20's slot
    assert [None if t is None else t[0, 0, 0] for t in r.thumbnails(snap.slots, snap.stamps)] == [None, 30, 40, 50]
    r.expire(now=16.0)  # the embeddings of t=5 expire; nothing else touches the reservoir
    assert sorted(np.unique(r._thumbs[:, 0, 0, 0]).tolist()) == [0, 60]  # their pixels are gone
    assert r.thumbnails(snap.slots, snap.stamps) == [None] * 4
    with pytest.raises(ValueError, match=r"thumbnails must be \[1, 16, 16, 3\]"):
        r.record(1, np.ones((1, 2), np.float32), thumbnails=np.zeros((1, 8, 8, 3), np.uint8))
    off = UnclaimedReservoir(ReservoirConfig(capacity=4), dim=2)  # the default keeps none
    off.record(1, np.ones((1, 2), np.float32), now=1.0)
    snap = off.snapshot(now=1.0)
    assert off.thumbnails(snap.slots, snap.stamps) == [None]


def test_an_idle_server_still_wipes_thumbnails_on_time(backbone):
    """No traffic comes to trigger the expiry: the monitor's own timer wipes them (here within a retention of 1 s
    plus its tenth)."""
    import time

    from service.metrics import Metrics
    from service.watch import TrafficWatch

    watch = TrafficWatch(Metrics())
    watch.start_monitor(
        ReservoirConfig(capacity=4, retention_seconds=1.0, bin_seconds=1.0, thumbnail=16), backbone, None
    )
    try:
        dim = backbone.embed_dim
        watch.reservoir.record(1, np.ones((1, dim), np.float32), thumbnails=np.full((1, 16, 16, 3), 7, np.uint8))
        assert watch.reservoir._thumbs.max() == 7
        deadline = time.monotonic() + 10
        while watch.reservoir._thumbs.max() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert watch.reservoir._thumbs.max() == 0 and len(watch.reservoir) == 0
    finally:
        watch.stop()


@pytest.mark.parametrize(
    "kwargs, match",
    [({"thumbnail": 8}, "16..128"), ({"thumbnail": 129}, "16..128"), ({"capacity": 20_000, "thumbnail": 128}, "bytes")],
)
def test_thumbnail_settings_are_bounded(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ReservoirConfig(**kwargs)


def test_embeddings_no_working_pass_makes_are_not_kept():
    """A NaN, infinite or all-zero row once made every clustering fail (a 500 until it expired)."""
    r = UnclaimedReservoir(ReservoirConfig(), dim=DIM)
    bad = _blob(3, seed=0)
    bad[0, 0], bad[1, 1], bad[2] = np.nan, np.inf, 0.0
    end = _fill(r, 400, np.concatenate([_blob(100, seed=1), bad]))
    snap = r.snapshot(now=end)
    assert len(snap) == 100 and snap.auto_images == 400 and np.isfinite(snap.embeddings).all()
    assert [c.size for c in find_clusters(snap, None, background=_noise(2000, seed=2))] == [100]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_share": float("nan")},
        {"min_share": float("inf")},
        {"max_clusters": 1.5},
        {"max_clusters": float("inf")},
        {"min_size": 2.5},
    ],
)
def test_bad_arguments_are_a_clear_value_error(kwargs):
    r = UnclaimedReservoir(ReservoirConfig(), dim=DIM)
    end = _fill(r, 400, _blob(100, seed=1))
    with pytest.raises(ValueError, match="min_share must be finite"):
        find_clusters(r.snapshot(now=end), None, **kwargs)


def test_copies_of_a_few_unrelated_images_are_not_one_domain():
    """Three images each sent 30 times: three groups of copies, not one cluster of all of them."""
    r = UnclaimedReservoir(ReservoirConfig(), dim=DIM)
    x = np.repeat(_noise(3, seed=3), 30, axis=0)
    end = _fill(r, 300, x[np.random.default_rng(0).permutation(90)])
    snap = r.snapshot(now=end)
    clusters = find_clusters(snap, None, background=_noise(2000, seed=4))
    assert sorted(c.size for c in clusters) == [30, 30, 30]
    assert all(len(np.unique(snap.embeddings[c.members], axis=0)) == 1 for c in clusters)


def test_a_reference_set_too_small_to_measure_a_density_against_is_not_used():
    r = UnclaimedReservoir(ReservoirConfig(), dim=DIM)
    end = _fill(r, 2000, _noise(800, seed=13))
    snap = r.snapshot(now=end)
    tiny_reference = _noise(50, seed=14)
    assert find_clusters(snap, None, background=tiny_reference) == find_clusters(snap, None)


def test_a_large_reservoir_is_grouped_through_a_sample_and_stays_one_domain():
    """Beyond GROUP_SAMPLE candidates HDBSCAN runs on a sample (20,000 rows of one domain took 27 s without)."""
    from service.clusters import GROUP_SAMPLE

    r = UnclaimedReservoir(ReservoirConfig(capacity=6000), dim=DIM)
    domain = _blob(GROUP_SAMPLE + 1500, seed=21, spread=1.0)
    end = _fill(r, 2 * len(domain), domain)
    snap = r.snapshot(now=end)
    clusters = find_clusters(snap, None, background=_noise(3000, seed=22))
    assert len(clusters) == 1 and clusters[0].size >= 0.99 * len(domain), [c.size for c in clusters]
    assert clusters[0].share == pytest.approx(0.5, abs=0.01)
    again = find_clusters(snap, None, background=_noise(3000, seed=22))
    assert [c.size for c in again] == [c.size for c in clusters]  # deterministic


def test_a_group_of_two_apart_is_cut_and_one_of_one_domain_is_not():
    """The review's: two blobs far apart (two components of the neighbour graph) have the eigenvalue 1 twice, and
    taking the cut's eigenvector by its eigenvalue missed it in 11 of 20 trials; one blob must stay whole."""
    from service.cluster_cuts import split_groups

    for seed in range(20):
        rng = np.random.default_rng(seed)
        two = np.concatenate([rng.standard_normal((200, 8)), rng.standard_normal((200, 8)) + 6.0])
        labels = split_groups(two, np.zeros(400, np.int64), 10, 20)
        assert len(set(labels[:200])) == 1 and len(set(labels[200:])) == 1 and labels[0] != labels[200], seed
        one = rng.standard_normal((400, 8))
        assert (split_groups(one, np.zeros(400, np.int64), 10, 20) == 0).all(), seed
