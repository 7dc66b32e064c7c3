"""One client holding the buffered request bodies: `python -m benchmarks.client_share [TREE ...]`.

A server with small body limits (1 MB a request, 4 MB buffered in all, 2 MB per client address) on the tiny
backbone. One client (127.0.0.2) opens 4 connections and sends each a body of 999,950 bytes, all but its last
byte (a multipart image part that never ends), and holds them. Another client (127.0.0.3) then classifies one
small image 5 times. Reported per tree (this one when none is given, so an older checkout can be measured beside
it): the other client's statuses, and what the holding connections got. Under a minute per tree.
"""

from __future__ import annotations

import argparse
import json
import socket

import httpx
from PIL import Image

from benchmarks.process import tree_server
from benchmarks.samples import png_bytes

LIMITS = {
    "CLIPBANK_MAX_REQUEST_BYTES": "1000000",
    "CLIPBANK_MAX_UPLOAD_BYTES": "1000000",
    "CLIPBANK_MAX_BUFFERED_BYTES": "4000000",
    "CLIPBANK_MAX_CLIENT_BUFFERED_BYTES": "2000000",
}
HELD = 999_950  # bytes per holding connection: 4 of them leave the other client 200 bytes of the 4 MB
PART = b'--b\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'


def _hold(port: int) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.2", 0))
    head = "POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
    head += f"Content-Length: {HELD + 1}\r\n\r\n"
    conn.sendall(head.encode() + PART + b"x" * (HELD - len(PART)))
    return conn


def _answered(conn: socket.socket) -> str:
    conn.settimeout(0.5)
    try:
        return conn.recv(200).split(b" ")[1].decode()
    except (OSError, IndexError):
        return "held"


def measure(tree: str | None) -> dict:
    png = png_bytes(Image.new("RGB", (64, 64), (200, 30, 30)))
    env = {"CLIPBANK_ADMIN_TOKEN": "client-share-token-0123456789", "CLIPBANK_FROZEN_RUNTIME": "torch", **LIMITS}
    with tree_server(tree, env, "client-share-") as url:
        port = int(url.rsplit(":", 1)[1])
        held = [_hold(port) for _ in range(4)]
        other = httpx.HTTPTransport(local_address="127.0.0.3")
        statuses = []
        with httpx.Client(base_url=url, transport=other, timeout=30) as c:
            for _ in range(5):
                r = c.post("/classify", files={"images": ("a.png", png)}, data={"labels": ["red", "blue"]})
                statuses.append(r.status_code)
        holding = [_answered(conn) for conn in held]
        for conn in held:
            conn.close()
    return {"tree": tree or ".", "other_client": statuses, "holding_connections": holding}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="*", help="source trees to serve from (default: this one)")
    args = parser.parse_args()
    print(json.dumps([measure(tree) for tree in args.trees or [None]], indent=1))


if __name__ == "__main__":
    main()
