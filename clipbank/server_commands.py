"""`clipbank push` and `clipbank tasks`: change and read a running server's tasks, through its gated API.

`clipbank store ...` does the same on a store folder directly, ungated; these go through the server, so the
interference gate decides an activation, and `--wait-all` returns once every Ray replica serves the change."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .classify_command import DEFAULT_URL
from .flags import ADMIN_TOKEN_HELP, add_timeout, command_timeout, command_token, version_number
from .output import print_json
from .tables import print_tasks


def _client(args: argparse.Namespace):
    from service.client import ClipbankClient

    return ClipbankClient(args.url, command_token(args.token, "admin_token"), timeout=command_timeout(args))


def _push(args: argparse.Namespace) -> int:
    from service.client import ClipbankHTTPError

    path = Path(args.file)
    manifest = _manifest_of(path) if path.is_file() else {}  # a pipe is read once, by the upload
    with _client(args) as client:
        mode = "shadow" if args.shadow else "inactive" if args.no_activate else "active"
        before = _task_or_none(client, manifest.get("task"), before_change=True)
        try:
            out = client.push(path, force=args.force, mode=mode, wait_all=args.wait_all)
        except ClipbankHTTPError as e:
            if args.exists_ok and _stored_already(e, mode):
                return 0
            raise
        print_json(out)  # the version stored, whatever the comparison below meets
        compare_with_before(client, before, out, out.get("version"), mode != "active")
        shadowed = before.get("shadow_version") if isinstance(before, dict) else None
        if mode == "shadow" and shadowed is not None and shadowed != out.get("version"):
            print(
                f"task {out.get('task')}: v{shadowed} was in shadow and is no more: its shadow figures are gone "
                f"(`clipbank shadow {out.get('task')} --version {shadowed}` puts it back, from 0)",
                file=sys.stderr,
            )
    if mode != "active":
        say_failing_gate(out)
    say_gate_notes(out)
    for warning in _training_warnings(manifest):
        print(f"  its training warned: {warning}", file=sys.stderr)
    return 0


def _stored_already(e: Exception, mode: str) -> bool:
    """`--exists-ok`: whether `e` says this very bundle is stored, as `mode` asks (said, and its details printed);
    a CI job's push retried after a timeout whose upload landed got exit 1 (an outside check)."""
    details = getattr(e, "details", None)
    if getattr(e, "code", None) != "version_conflict" or not isinstance(details, dict) or not details.get("same_bytes"):
        return False
    task, version, state = details.get("task"), details.get("version"), details.get("state")
    if state != mode:
        print(f"task {task} v{version}: this very bundle is stored already, {state}, not {mode}", file=sys.stderr)
        return False
    print_json(details)
    print(f"task {task} v{version}: this very bundle is stored already, {state}: nothing changed", file=sys.stderr)
    return True


def _manifest_of(path: Path) -> dict:
    """The bundle file's manifest, from its header alone ({} if it cannot be read: the server names why)."""
    from model_store.bundle_format import MANIFEST_KEY, file_head, read_metadata
    from model_store.errors import ClipbankError
    from model_store.safejson import JSONRefused
    from model_store.safejson import loads as bounded_loads

    try:
        manifest = bounded_loads(read_metadata(file_head(path))[MANIFEST_KEY])
    except (OSError, JSONRefused, ClipbankError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def _task_or_none(client, task: object, generation: object = None, before_change: bool = False) -> dict | None:
    """GET /tasks/TASK, as of `generation` at least (read your own writes through any replica). `before_change`:
    no answer at all (a timeout, a refused connection) is raised, as the change's own would come no sooner (an
    outside check's push waited 60 s here, then 60 s more, and said "within 60 s"); nothing is changed then."""
    from service.client import ClipbankHTTPError

    if not isinstance(task, str):
        return None
    try:
        return client.task(task, generation if isinstance(generation, int) else None)
    except ClipbankHTTPError as e:  # a new task (404), a name the server will refuse
        if e.status == 0 and before_change:
            raise
        return None
    except ValueError:
        return None


def _training_warnings(manifest: dict) -> list[str]:
    training = manifest.get("training") if isinstance(manifest.get("training"), dict) else {}
    routing = training.get("routing") if isinstance(training.get("routing"), dict) else {}
    said = [*(training.get("val_warnings") or ()), *(routing.get("warnings") or ())]
    return [w for w in said if isinstance(w, str)]


def compare_with_before(client, before: dict | None, out: dict, version: object, would: bool) -> None:
    """On stderr, the server's `warnings` on what the change costs the version it replaced; from a server older
    than them, `say_what_it_replaces` for `version` of out's task, against the version `before` (GET /tasks/TASK
    read before the change) had active; `would`: it is not active yet (stored inactive, in shadow)."""
    if isinstance(out.get("warnings"), list):  # the server compared it with the version it replaces
        for note in out["warnings"]:
            print(note, file=sys.stderr)
        return
    replaced = before.get("active_version") if isinstance(before, dict) else None
    if replaced is None or replaced == version or not isinstance(version, int):
        return
    try:
        task = _task_or_none(client, out.get("task"), out.get("generation"))
        say_what_it_replaces({"task": out.get("task"), "version": version}, replaced, task, would)
    except (AttributeError, TypeError, ValueError) as e:  # an answer of another shape: a remark less
        print(f"(could not compare with v{replaced}: {type(e).__name__}: {e})", file=sys.stderr)


def say_what_it_replaces(out: dict, replaced: int, task: dict | None, would: bool = False) -> None:
    """On stderr: `model_store.replacement.replacement_notes` of out's version against version `replaced` of `task`
    (`GET /tasks/TASK`); a server that says them in its answer (`warnings`) is read instead (`_push`)."""
    from model_store.replacement import replacement_notes

    versions = {v.get("version"): v for v in (task or {}).get("versions") or () if isinstance(v, dict)}
    old, new = versions.get(replaced), versions.get(out.get("version"))
    if old and new:
        for note in replacement_notes(str(out.get("task")), new, old, would):
            print(note, file=sys.stderr)


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


SELF_CLAIM_LOW = 0.5  # of its own probes: under it, a version gets little of its own traffic


def say_gate_notes(out: dict) -> None:
    """On stderr, what the gate's report shows beyond its limits (outside checks): a version whose own probes go
    elsewhere (a task trained on images another task claims got none of its traffic, and nothing said so), and
    images of other tasks that the task's serving version took already, which the gate does not count again."""
    gate = out.get("gate")
    if not isinstance(gate, dict):
        return
    name = f"task {out.get('task')} v{gate.get('version')}"
    own, routes = gate.get("self_claim"), gate.get("own_routes")
    if isinstance(own, int | float) and own < SELF_CLAIM_LOW:
        where = ", ".join(f"{t} {share:.1%}" for t, share in sorted((routes or {}).items(), key=lambda kv: -kv[1]))
        print(
            f"{name} is routed only {own:.1%} of its own probe images{f' (the rest: {where})' if where else ''}: "
            "it will get little of its domain's traffic; another task's selector claims those images first",
            file=sys.stderr,
        )
    limits = gate.get("limits") or {}
    kept = gate.get("zero_shot_already")
    if isinstance(kept, int | float) and kept > limits.get("max_zero_shot_captured", 0.05):
        print(
            f"{name} keeps {kept:.1%} of the generic images zero-shot would answer, which its version serving before "
            "took already (so the gate does not count them)",
            file=sys.stderr,
        )
    limit = limits.get("max_stolen", 0.02)
    for task, share in sorted((gate.get("already_taken") or {}).items(), key=lambda kv: -kv[1]):
        if isinstance(share, int | float) and share > limit:
            print(
                f"{name} keeps {share:.1%} of the images of task {task} (by the selectors alone, without labels), "
                "which its version serving before took already, so the gate does not count them",
                file=sys.stderr,
            )


def _tasks(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.tasks_cmd == "activate":
            before = _task_or_none(client, args.task, before_change=True)
            out = client.activate(args.task, args.version, force=args.force, wait_all=args.wait_all)
            if not args.json:
                _activated(out)
            say_gate_notes(out)
            compare_with_before(client, before, out, out.get("active_version"), False)
        elif args.tasks_cmd == "deactivate":
            before = _task_or_none(client, args.task, before_change=True) if args.purge else None
            out = client.delete(args.task, purge=args.purge, wait_all=args.wait_all)
            shadowed = before.get("shadow_version") if isinstance(before, dict) else None
            if shadowed is not None and str(shadowed) not in (out.get("kept") or {}):  # said as "N blob(s) deleted"
                print(f"task {args.task}: v{shadowed}, in shadow, was purged too", file=sys.stderr)
        else:
            out = _listed(client)
    if args.json:
        print_json(out)
    elif args.tasks_cmd == "activate":
        pass  # said above, before the comparison with the version it replaced
    elif args.tasks_cmd == "deactivate":
        print_deactivated(out, args.purge)
    elif not (isinstance(out, dict) and isinstance(out.get("generation"), int) and isinstance(out.get("tasks"), list)):
        raise ValueError(f"{args.url} answered GET /tasks without a generation and tasks: is it a clipbank server?")
    else:
        print_tasks(out["generation"], out["tasks"], f"server {args.url}")
    return 0


def _listed(client: Any) -> dict:
    """GET /tasks; when the store cannot be listed, what the server still serves is said first (its error's
    `details.serving`): an operator looks exactly then (an outside check)."""
    from service.client import ClipbankHTTPError

    try:
        return client.tasks()
    except ClipbankHTTPError as e:
        served = (e.details or {}).get("serving") if isinstance(e.details, dict) else None
        if isinstance(served, list):
            said = ", ".join(f"{t.get('task')} v{t.get('version')}" for t in served if isinstance(t, dict)) or "none"
            generation = e.details.get("generation")  # type: ignore[union-attr]
            print(f"the server still serves (generation {generation}): {said}", file=sys.stderr)
        raise


def _activated(out: dict) -> None:
    gate = out.get("gate") or {}
    print(f"task {out['task']}: version {out['active_version']} is active (generation {out['generation']})")
    if not gate:
        print("  it was active already: nothing changed", file=sys.stderr)
    elif gate.get("passed") is True:  # an outside check: activating said nothing of the gate it passed
        stolen = gate.get("stolen") if isinstance(gate.get("stolen"), dict) else {}
        most = max(stolen.items(), key=lambda kv: kv[1], default=None)
        took = f"at most {most[1]:.1%} of the images of task {most[0]}" if most else "no other task's images"
        captured = gate.get("zero_shot_captured")
        zero = f", {captured:.1%} of the generic images zero-shot answers" if isinstance(captured, float) else ""
        unmeasured = [str(t) for t in gate.get("unmeasured") or ()]
        missing = f" (not measured on {', '.join(unmeasured)}: no probes)" if unmeasured else ""
        print(f"  the interference gate passed it: it would take {took}{zero}{missing}", file=sys.stderr)
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
        who = f"task {users[0]} uses" if len(users) == 1 else f"tasks {', '.join(users)} use"
        print(f"  kept version {version}: {who} its experts")


def _help_of(parser: argparse.ArgumentParser, flag: str) -> str | None:
    """The help text `parser` gives `flag`."""
    return next(a.help for a in parser._actions if flag in a.option_strings)


def _server_flags(p: argparse.ArgumentParser, url: str, wait: bool = True) -> None:
    p.add_argument("--url", default=url, help=f"server URL ($CLIPBANK_URL, default {DEFAULT_URL})")
    p.add_argument("--token", help=ADMIN_TOKEN_HELP)
    add_timeout(p)
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
    pu.add_argument(
        "--exists-ok",
        action="store_true",
        help="exit 0 when this very bundle is stored already, in the state asked (a retried CI job's push)",
    )
    pu.add_argument(  # as the other server commands: a script reads {"error": ...} on stdout (docs/service.md)
        "--json", action="store_true", help="on a failure, print the error as a JSON object too (an answer is JSON)"
    )
    pu.set_defaults(fn=_push)

    ts = sub.add_parser("tasks", help="a running server's tasks (a table), or activate / deactivate one, gated")
    _server_flags(ts, url, wait=False)
    ts.add_argument("--json", action="store_true", help="print the server's JSON answer instead")
    tsub = ts.add_subparsers(dest="tasks_cmd")  # none: list
    tsub.add_parser("list", help="one row per stored version: state, classes, size, trained, accuracy")
    a = tsub.add_parser("activate", help="make a stored version active (rollback, roll forward, promotion), gated")
    a.add_argument("task")
    a.add_argument("version", type=version_number)
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
    for p in tsub.choices.values():  # the flags after the sub-command, too, with the same help
        for flag in ("--url", "--token"):
            p.add_argument(flag, default=argparse.SUPPRESS, help=_help_of(ts, flag))
        add_timeout(p, argparse.SUPPRESS)  # its type too: a string reached the client (the review's)
        p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=_help_of(ts, "--json"))
    ts.set_defaults(fn=_tasks)
