"""The batching policy of the compute thread, without a server."""

from __future__ import annotations

from types import SimpleNamespace

from service.batching import Batcher


def _arrive(batcher: Batcher, *times: float) -> None:
    for t in times:
        batcher._arrived(SimpleNamespace(enqueued=t))


def test_waits_for_company_only_while_requests_arrive_closer_than_the_wait():
    b = Batcher(lambda: None, max_batch=16, max_wait_ms=5)
    assert b.wait_seconds() == 0.0  # nothing seen yet: a first request is not delayed
    _arrive(b, 0.0, 0.020, 0.040, 0.060)  # a lone client, one request every 20 ms
    assert b.wait_seconds() == 0.0
    _arrive(b, *(0.060 + 0.0005 * i for i in range(1, 40)))  # a burst, 0.5 ms apart
    assert b.wait_seconds() == 0.005
    _arrive(b, *(1.0 + 0.5 * i for i in range(12)))  # traffic thins out again
    assert b.wait_seconds() == 0.0


def test_zero_wait_never_waits():
    b = Batcher(lambda: None, max_batch=16, max_wait_ms=0)
    _arrive(b, *(0.0001 * i for i in range(50)))
    assert b.wait_seconds() == 0.0


def test_an_idle_spell_does_not_stop_the_next_burst_from_being_batched():
    b = Batcher(lambda: None, max_batch=16, max_wait_ms=5)
    _arrive(b, *(0.0005 * i for i in range(40)))  # a burst
    _arrive(b, 5.0)  # then 5 s of nothing, and the first request of the next burst
    assert b.wait_seconds() == 0.005
