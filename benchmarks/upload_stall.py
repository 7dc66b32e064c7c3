"""What a large upload costs the requests beside it: `python -m benchmarks.upload_stall [TREE ...]`.

A server on the tiny backbone answers one client's `/classify` (one small image, two labels) in a loop while a
bundle at the bound of 100,000 prompts (10,000 classes x 10 templates) is uploaded. Reported per tree (a source
tree to serve from, this one when none is given, so that an older checkout can be measured beside it): the
upload's time, and the slowest and median classify while it ran. About a minute per tree here.
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import httpx
from PIL import Image

from benchmarks.process import tree_server
from benchmarks.samples import png_bytes

TOKEN = "upload-stall-token-0123456789"


def big_bundle() -> bytes:
    from model_store.backbone import load_backbone
    from model_store.bank import empty_bank
    from tests.helpers import edit_bundle, random_bundle

    classes = tuple(f"thing number {i}" for i in range(10_000))
    templates = [f"a photo of a {{}}, view {k}." for k in range(10)]
    data = random_bundle(empty_bank(load_backbone("tiny", device="cpu")), "huge", seed=1, classes=classes)
    return edit_bundle(data, lambda m: m.update(templates=templates), fix_digest=True)


def measure(tree: str | None, bundle: bytes) -> dict:
    png = png_bytes(Image.new("RGB", (64, 64), (200, 30, 30)))
    env = {"CLIPBANK_ADMIN_TOKEN": TOKEN, "CLIPBANK_GATE_MAX_ZERO_SHOT": "1.0", "CLIPBANK_GATE_MAX_STOLEN": "1.0"}
    with tree_server(tree, env, "upload-stall-") as url:
        seconds: list[float] = []
        statuses: set[int] = set()
        done = threading.Event()

        def classify() -> None:
            with httpx.Client(base_url=url, timeout=600) as c:
                while not done.is_set():
                    t = time.perf_counter()
                    r = c.post("/classify", files={"images": ("a.png", png)}, data={"labels": ["a", "b"]})
                    seconds.append(time.perf_counter() - t)
                    statuses.add(r.status_code)

        client = threading.Thread(target=classify)
        client.start()
        time.sleep(2)
        t = time.perf_counter()
        r = httpx.post(
            f"{url}/tasks",
            files={"bundle": ("b.safetensors", bundle)},
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=900,
        )
        upload = time.perf_counter() - t
        done.set()
        client.join()
    seconds.sort()
    return {
        "tree": tree or ".",
        "upload_status": r.status_code,
        "upload_seconds": round(upload, 1),
        "classify_requests": len(seconds),
        "classify_statuses": sorted(statuses),
        "classify_max_seconds": round(seconds[-1], 3),
        "classify_p50_seconds": round(seconds[len(seconds) // 2], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="*", help="source trees to serve from (default: this one)")
    args = parser.parse_args()
    bundle = big_bundle()
    print(json.dumps([measure(tree, bundle) for tree in args.trees or [None]], indent=1))


if __name__ == "__main__":
    main()
