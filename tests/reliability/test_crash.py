"""Crash test: `kill -9` a store writer at random points, many rounds; the store stays consistent and starts."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from model_store.bank import build_bank, empty_bank
from model_store.bundle import Bundle, read_bundle
from model_store.loader import BankLoader
from model_store.store import TMP_PREFIX, LocalStore
from model_store.store_base import purge_plan
from model_store.store_check import check_store, store_leftovers
from tests.helpers import random_bundle, with_version

pytestmark = pytest.mark.slow
ROUNDS = 40
SEED = 1729
MAX_KILL_DELAY = 0.3  # seconds after the worker's first finished change
# purge_nothing keeps every version: no generation; purge_active deactivates and purges in one write
KINDS = ("put", "activate", "deactivate", "purge", "purge_nothing", "purge_active")
# the forkserver imports these once (torch with them); each worker is then a cheap fork of a process that has
# never run a torch op, so there is no OpenMP state to inherit
PRELOAD = ["model_store.store", "model_store.bundle", "model_store.loader", __name__]


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory, backbone) -> Path:
    """Seven bundles of three tasks: a v2 and v3 use a v1's experts, b uses a v1's, c v2 uses a v1's and a v2's."""
    folder = tmp_path_factory.mktemp("bundles")
    a1 = random_bundle(empty_bank(backbone), "a", seed=1)
    on_a1 = build_bank(backbone, [read_bundle(a1)])
    a2 = random_bundle(on_a1, "a", seed=2, version=2)
    on_a2 = build_bank(backbone, [read_bundle(a2)], [read_bundle(a1)])
    b1 = random_bundle(on_a1, "b", seed=3)
    data = {
        "a1": a1,
        "a2": a2,
        "a3": with_version(a2, 3),
        "b1": b1,
        "b2": with_version(b1, 2),
        "c1": random_bundle(empty_bank(backbone), "c", seed=4),
        "c2": random_bundle(on_a2, "c", seed=5, version=2),
    }
    for name, blob in data.items():
        (folder / f"{name}.safetensors").write_bytes(blob)
    return folder


def _choices(store: LocalStore, bundles: dict[str, tuple[bytes, Bundle]]) -> dict[str, list[tuple]]:
    """Every change the service would accept on the store's state now, by kind (puts need their experts stored)."""
    tasks = store.index().tasks
    sources = store.expert_sources()
    out: dict[str, list[tuple]] = {kind: [] for kind in KINDS}
    for name, (_, b) in bundles.items():
        newest = tasks[b.task].newest if b.task in tasks else 0
        if b.version > newest and all(e in sources or e in b.experts for e in b.uses):
            out["put"].append((name,))
    index = store.index()
    for task, entry in tasks.items():
        out["activate"] += [(task, v.version) for v in entry.versions if v.bundle_id != entry.active]
        if entry.active:
            out["deactivate"].append((task,))
            out["purge_active"].append((task,))
        else:  # a purge that keeps every version publishes nothing, but still deletes stray blobs
            out["purge" if purge_plan(index, task)[0] != index else "purge_nothing"].append((task,))
    return {kind: args for kind, args in out.items() if args}


def _worker(root: str, folder: str, seed: int, started: Any, done: Any, error_file: str) -> None:
    """Change the store at random until killed; counts each change by kind when it starts and when it is done."""
    try:
        rng = random.Random(seed)
        store = LocalStore(root)
        files = {p.stem: p.read_bytes() for p in sorted(Path(folder).iterdir())}
        bundles = {name: (data, read_bundle(data)) for name, data in files.items()}
        while True:
            choices = _choices(store, bundles)
            kind = rng.choice(sorted(choices))
            args = rng.choice(choices[kind])
            started[KINDS.index(kind)] += 1
            if kind == "put":
                data, bundle = bundles[args[0]]
                store.put(data, activate=rng.random() < 0.7, bundle=bundle)
            elif kind == "purge_active":
                store.purge(*args, deactivate=True)
            else:
                getattr(store, kind.removesuffix("_nothing"))(*args)
            done[KINDS.index(kind)] += 1
    except BaseException:
        Path(error_file).write_text(traceback.format_exc())
        raise


def _summary(store: LocalStore) -> dict[str, tuple[str | None, list[int]]]:
    """{task: (active bundle id prefix, stored versions)}: the state a failure message shows."""
    tasks = store.index().tasks
    return {t: (e.active and e.active[:8], [v.version for v in e.versions]) for t, e in tasks.items()}


def _wait_until(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {seconds}s for {what}")
        time.sleep(0.002)


def _kill_one_worker(ctx: Any, root: Path, bundle_dir: Path, seed: int, delay: float) -> tuple[list[int], list[int]]:
    """Start a worker, let it finish one change, kill -9 it `delay` seconds later; returns (started, done)."""
    started, done = ctx.RawArray("q", len(KINDS)), ctx.RawArray("q", len(KINDS))  # no lock a kill could orphan
    error_file = root.parent / f"worker-{seed}.err"
    args = (str(root), str(bundle_dir), seed, started, done, str(error_file))
    worker = ctx.Process(target=_worker, args=args, daemon=True)
    worker.start()
    try:
        _wait_until(lambda: sum(done) > 0 or not worker.is_alive(), 120, "the worker's first change")
        time.sleep(delay)  # the random kill point
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(30)
    finally:
        if worker.is_alive():
            worker.kill()
            worker.join(30)
    why = error_file.read_text() if error_file.exists() else ""
    assert worker.exitcode == -signal.SIGKILL, f"worker ended by itself, exit code {worker.exitcode}:\n{why}"
    return list(started), list(done)


@dataclass
class Tally:
    """What the rounds did, by kind of change: finished, and interrupted by the kill."""

    done: Counter = field(default_factory=Counter)
    killed_in: Counter = field(default_factory=Counter)
    temp_files: int = 0  # rounds after which temp files were left
    unreferenced: int = 0  # rounds after which whole blobs the index does not name were left

    def add(self, started: list[int], done: list[int], leftovers: dict[str, int]) -> None:
        self.done.update(dict(zip(KINDS, done, strict=True)))
        self.killed_in.update({k: 1 for k, s, d in zip(KINDS, started, done, strict=True) if s > d})
        self.temp_files += leftovers["temp_files"] > 0
        self.unreferenced += leftovers["unreferenced_blobs"] > 0

    def summary(self, rounds: int, seconds: float) -> str:
        return (
            f"{rounds} kill -9 rounds in {seconds:.1f}s; {self.done.total()} changes done {dict(self.done)}; "
            f"{self.killed_in.total()} kills inside a change {dict(self.killed_in)}; rounds leaving temp files "
            f"{self.temp_files}, unreferenced blobs {self.unreferenced}; 0 inconsistent stores, 0 start-up failures"
        )


def test_kill_9_at_random_points_leaves_a_consistent_store_that_starts(tmp_path, backbone, bundle_dir, capsys):
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    rng = random.Random(SEED)
    root = tmp_path / "store"
    reader = LocalStore(root)
    tally, generation, temp_before = Tally(), 0, set()
    t0 = time.perf_counter()
    for r in range(ROUNDS):
        started, done = _kill_one_worker(ctx, root, bundle_dir, SEED + r, rng.uniform(0, MAX_KILL_DELAY))
        assert check_store(root) == [], f"round {r}"
        tally.add(started, done, store_leftovers(root))
        state = f"round {r}, store {_summary(reader)}"
        # every finished change is published, and at most the one the kill interrupted besides
        published = sum(done) - done[KINDS.index("purge_nothing")]
        assert generation + published <= reader.generation() <= generation + published + 1, state
        generation = reader.generation()
        bank = BankLoader(LocalStore(root), backbone).load()  # start-up on the killed writer's store
        assert dict(bank.degraded) == {}, state
        assert sorted(bank.task_names) == sorted(reader.active()), state
        temp_now = set(root.rglob(TMP_PREFIX + "*"))
        assert not temp_before & temp_now, f"{state}: the next writer left the old temp files"
        temp_before = temp_now
    with capsys.disabled():
        print("\ncrash test:", tally.summary(ROUNDS, time.perf_counter() - t0))
    assert tally.killed_in.total() >= ROUNDS // 4, f"too few kills landed inside a change: {tally.killed_in}"


def _damage_blob(store: LocalStore, index: dict) -> None:
    path = store.blobs / f"{index['tasks']['a']['active']}.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _drop_blob(store: LocalStore, index: dict) -> None:
    (store.blobs / f"{index['tasks']['b']['active']}.safetensors").unlink()


def _edit_index(edit: Callable[[dict], None]) -> Callable[[LocalStore, dict], None]:
    def damage(store: LocalStore, index: dict) -> None:
        edit(index)
        store.index_path.write_text(json.dumps(index))

    return damage


DAMAGE = {
    "flipped byte": (_damage_blob, "does not hash to its name"),
    "missing blob": (_drop_blob, "is missing or damaged"),
    "a provider's blob": (_damage_blob, "task 'b' version 1: cannot be served either, it uses the experts of task 'a'"),
    "foreign active id": (_edit_index(lambda i: i["tasks"]["a"].update(active="0" * 64)), "is none of its versions"),
    "dropped provider": (_edit_index(lambda i: i["tasks"].pop("a")), "uses experts no stored version adds"),
    "torn index": (lambda s, i: s.index_path.write_text('{"generation": 3, "tas'), "does not parse"),
    "no generation": (_edit_index(lambda i: i.pop("generation")), "the store index lacks 'generation'"),
    # an operator's hand edits the message named only as "lacks 'generation' or 'tasks'; see the log" (an SRE's check)
    "fractional generation": (
        _edit_index(lambda i: i.update(generation=7.5)),
        "'generation' is 7.5, not a whole number",
    ),
    "generation as text": (
        _edit_index(lambda i: i.update(generation="7")),
        "'generation' is \"7\", not a whole number",
    ),
    "tasks as a list": (_edit_index(lambda i: i.update(tasks=[])), "'tasks' is [], not an object"),
    "a list for an index": (lambda s, i: s.index_path.write_text("[]"), "is a JSON list, not an object"),
    # an operator's hand edit: an integer beyond what a JSON client reads exactly (its X-Generation)
    "huge generation": (_edit_index(lambda i: i.update(generation=10**30)), "not one of 0..2^53-1"),
    "negative generation": (_edit_index(lambda i: i.update(generation=-1)), "not one of 0..2^53-1"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_check_store_finds_damage(tmp_path, bundle_dir, case):
    store = LocalStore(tmp_path)
    for name in ("a1", "b1"):
        store.put((bundle_dir / f"{name}.safetensors").read_bytes())
    (tmp_path / f"{TMP_PREFIX}x").write_bytes(b"partial")  # a killed writer's leftover is no problem
    assert check_store(tmp_path) == []
    damage, expected = DAMAGE[case]
    damage(store, json.loads(store.index_path.read_text()))
    problems = check_store(tmp_path)
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize("change", ["purge", "put"])
def test_check_store_reports_no_damage_a_change_made_while_it_read(tmp_path, bundle_dir, monkeypatch, change):
    """An outside check: `clipbank store check` beside a writer said, 2 runs in 60, "blob ... cannot be read" and
    "upload its bundle file again" for a blob a purge had just deleted. It reads the index, the blobs, then the
    index again, and runs again on a change (it took a blob gone mid-read as damage, too)."""
    from model_store import store_check

    store = LocalStore(tmp_path)
    store.put((bundle_dir / "c1.safetensors").read_bytes())
    if change == "purge":
        store.put((bundle_dir / "a1.safetensors").read_bytes())
    real, changed = store_check.read_regular, []

    def read_then_change(path: Path) -> bytes:  # the first blob read meets the change
        if path.suffix == ".safetensors" and not changed:
            changed.append(path.name)
            if change == "purge":
                store.deactivate("a")
                store.purge("a")
            else:
                store.put((bundle_dir / "a1.safetensors").read_bytes())
        return real(path)

    monkeypatch.setattr(store_check, "read_regular", read_then_change)
    assert changed == [] and store_check.check_store(tmp_path) == [] and changed
