"""`clipbank push` and `clipbank tasks`: change and read a running server's tasks, through its gated API.

`clipbank store ...` does the same on a store folder directly, ungated; these go through the server, so the
interference gate decides an activation, and `--wait-all` returns once every Ray replica serves the change."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from model_store.settings import env_value

from .classify_command import DEFAULT_URL
from .output import print_json
from .tables import print_tasks


def _client(args: argparse.Namespace):
    from service.client import ClipbankClient

    return ClipbankClient(args.url, args.token)


def _push(args: argparse.Namespace) -> int:
    with _client(args) as client:
        mode = "shadow" if args.shadow else "inactive" if args.no_activate else "active"
        out = client.push(Path(args.file), force=args.force, mode=mode, wait_all=args.wait_all)
    print_json(out)
    if mode != "active":
        say_failing_gate(out)
    return 0


def say_failing_gate(out: dict) -> None:
    """On stderr: a version stored inactive or in shadow whose gate report fails, which activating it will meet
    (an outside check: it showed only deep in the JSON)."""
    gate = out.get("gate")
    if not isinstance(gate, dict) or gate.get("passed") is not False:
        return
    task, version = out.get("task"), out.get("version", out.get("shadow_version"))
    print(
        f"task {task} v{version} fails the interference gate: activating it (`clipbank tasks activate {task} "
        f"{version}`) will be refused unless --force:",
        file=sys.stderr,
    )
    for offence in gate.get("offences") or ():
        print(f"  {offence}", file=sys.stderr)


def _tasks(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.tasks_cmd == "activate":
            out = client.activate(args.task, args.version, force=args.force, wait_all=args.wait_all)
        elif args.tasks_cmd == "deactivate":
            out = client.delete(args.task, purge=args.purge, wait_all=args.wait_all)
        else:
            out = client.tasks()
    if args.json:
        print_json(out)
    elif args.tasks_cmd == "activate":
        _activated(out)
    elif args.tasks_cmd == "deactivate":
        print_deactivated(out, args.purge)
    elif not (isinstance(out, dict) and isinstance(out.get("generation"), int) and isinstance(out.get("tasks"), list)):
        raise ValueError(f"{args.url} answered GET /tasks without a generation and tasks: is it a clipbank server?")
    else:
        print_tasks(out["generation"], out["tasks"], f"server {args.url}")
    return 0


def _activated(out: dict) -> None:
    gate = out.get("gate") or {}
    print(f"task {out['task']}: version {out['active_version']} is active (generation {out['generation']})")
    if not gate:
        print("  it was active already: nothing changed", file=sys.stderr)
    for offence in gate.get("offences") or ():  # let through by --force
        print(f"  forced past the gate: {offence}", file=sys.stderr)


def print_deactivated(out: dict, purge: bool) -> None:
    """What `tasks deactivate` (a server) and `store deactivate` (a store) print: `out` is the server's answer."""
    if not purge:
        if out.get("was_active", True):
            print(f"task {out['task']}: deactivated (generation {out['generation']}); its versions stay stored")
        else:
            print(f"task {out['task']}: it had no active version; nothing changed")
        if out.get("shadow_version") is not None:
            print(
                f"  version {out['shadow_version']} is still in shadow, scoring live traffic: "
                f"`clipbank shadow {out['task']} --stop` ends that",
                file=sys.stderr,
            )
        return
    done = "deactivated and purged" if out.get("was_active", True) else "purged (it had no active version)"
    listed = "; it stays listed, with the versions other tasks' experts need" if out.get("kept") else ""
    print(f"task {out['task']}: {done}, {out['purged_blobs']} blob(s) deleted{listed}")
    for version, users in sorted(out.get("kept", {}).items(), key=lambda kv: int(kv[0])):
        print(f"  kept version {version}: tasks {', '.join(users)} use its experts")


def _server_flags(p: argparse.ArgumentParser, url: str, wait: bool = True) -> None:
    p.add_argument("--url", default=url, help=f"server URL ($CLIPBANK_URL, default {DEFAULT_URL})")
    p.add_argument("--token", default=env_value("admin_token"), help="admin token ($CLIPBANK_ADMIN_TOKEN)")
    if wait:
        p.add_argument(
            "--wait-all", action="store_true", help="return once every Ray replica serves the change (else 504)"
        )


def add_server_parsers(sub, url: str) -> None:
    pu = sub.add_parser("push", help="upload a bundle to a running server (hot-swap)")
    pu.add_argument("file")
    _server_flags(pu, url)
    how = pu.add_mutually_exclusive_group()
    how.add_argument("--no-activate", action="store_true", help="store the version without routing to it")
    how.add_argument(
        "--shadow", action="store_true", help="store it in shadow: it scores live traffic without answering it"
    )
    pu.add_argument("--force", action="store_true", help="override the interference gate (docs/safety.md)")
    pu.set_defaults(fn=_push)

    ts = sub.add_parser("tasks", help="a running server's tasks (a table), or activate / deactivate one, gated")
    _server_flags(ts, url, wait=False)
    ts.add_argument("--json", action="store_true", help="print the server's JSON answer instead")
    tsub = ts.add_subparsers(dest="tasks_cmd")  # none: list
    tsub.add_parser("list", help="one row per stored version: state, classes, size, trained, accuracy")
    a = tsub.add_parser("activate", help="make a stored version active (rollback, roll forward, promotion), gated")
    a.add_argument("task")
    a.add_argument("version", type=int)
    a.add_argument("--force", action="store_true", help="override the interference gate (docs/safety.md)")
    d = tsub.add_parser("deactivate", help="stop routing to a task (its versions stay stored)")
    d.add_argument("task")
    d.add_argument(
        "--purge",
        action="store_true",
        help="also forget the task and delete its bundles, except versions whose experts other tasks use",
    )
    for p in (a, d):
        p.add_argument("--wait-all", action="store_true", help="return once every Ray replica serves the change")
    for p in tsub.choices.values():  # the flags after the sub-command, too
        for flag in ("--url", "--token"):
            p.add_argument(flag, default=argparse.SUPPRESS, help="as before the sub-command")
        p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="as before the sub-command")
    ts.set_defaults(fn=_tasks)
