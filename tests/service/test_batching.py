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


def test_run_does_torch_work_on_the_compute_thread_and_hands_back_results_and_errors():
    import threading

    import pytest

    b = Batcher(lambda: None, max_batch=16, max_wait_ms=5)
    assert b.run(threading.current_thread) is threading.current_thread()  # not started: inline
    b.start()
    try:
        worker = b.run(threading.current_thread)
        assert worker is b._thread and worker is not threading.current_thread()
        assert b.run(lambda a, c: a + c, 2, 3) == 5
        with pytest.raises(ZeroDivisionError):
            b.run(lambda: 1 / 0)
        assert b.run(lambda: b.run(threading.current_thread)) is worker  # nested: inline, no deadlock
    finally:
        b.stop()
    assert b.run(threading.current_thread) is threading.current_thread()  # stopped: inline again


def test_the_server_loads_and_checks_uploads_on_its_compute_thread(tmp_path, backbone):
    """Start-up's torch work and an upload's trial run and gate all run where the batches run."""
    import threading

    import anyio

    from model_store.bank import empty_bank
    from service import registry as registry_module
    from service.lifecycle import Service
    from tests.helpers import random_bundle
    from tests.service.conftest import AUTH, running_app

    seen: list[str] = []
    trial, load = registry_module.trial_run, Service._load_models

    def watched(*args, **kwargs):
        seen.append(threading.current_thread().name)
        return trial(*args, **kwargs)

    def loading(self, cache):
        seen.append(threading.current_thread().name)
        return load(self, cache)

    async def main():
        registry_module.trial_run, Service._load_models = watched, loading
        try:
            async with running_app(tmp_path, backbone) as client:
                service = client.app.state.service
                data = random_bundle(empty_bank(backbone), "cars", seed=1)
                pushed = await client.post("/tasks", files={"bundle": ("b", data)}, headers=AUTH)
                assert pushed.status_code == 201, pushed.text
                return service.batcher._thread.name
        finally:
            registry_module.trial_run, Service._load_models = trial, load

    assert anyio.run(main) == "clipbank-compute"
    assert seen == ["clipbank-compute", "clipbank-compute"]  # start-up, then the upload's trial run
