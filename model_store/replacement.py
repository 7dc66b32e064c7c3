"""What a task's new version costs the classes of the version it replaces, in sentences: said by the server in
an upload's answer (`warnings`) and by `clipbank push` / `clipbank tasks activate`. The interference gate
measures other tasks; a version of the same task that forgets its parent's classes passes it (an outside check:
a v2 trained on 2 new classes replaced a v1 of 6, and its old classes fell to 0%, with nothing said to a Python
or HTTP client)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import ClipbankError


def partial_classes(measured: Any, classes: list | tuple | None) -> str:
    """` (2/10 classes)` when the validation accuracy was measured on only some of the version's classes."""
    if not isinstance(measured, int | float) or classes is None or measured >= len(classes):
        return ""
    return f" ({int(measured)}/{len(classes)} classes)"


def replacement_notes(task: str, new: Mapping[str, Any], old: Mapping[str, Any], would: bool = False) -> list[str]:
    """Sentences on version `new` of `task` replacing version `old` (each `{version, classes, metrics}`, as
    `GET /tasks/TASK` lists them): the classes it lacks, the classes it was trained on no images of, a validation
    accuracy well under the old one's. `would`: it is not active yet (stored inactive, in shadow)."""
    v, replaced = new.get("version"), old.get("version")
    kept = set(new.get("classes") or ())
    dropped = [c for c in old.get("classes") or () if c not in kept]
    verb = "would replace" if would else "replaces"
    newer = isinstance(v, int) and isinstance(replaced, int) and v > replaced  # else a rollback: no training advice
    back = f"Roll back with `clipbank tasks activate {task} {replaced}`. " if newer and not would else ""
    notes = []
    if dropped:
        shown = ", ".join(dropped[:8]) + (", ..." if len(dropped) > 8 else "")
        keep = (
            "To keep them, train a version on images of every class"
            if newer
            else f"v{v} is older than v{replaced}: it was trained before those classes"
        )
        notes.append(
            f"task {task} v{v} {verb} v{replaced} and lacks {len(dropped)} of its {len(old.get('classes') or ())} "
            f"classes ({shown}): their images {'would be' if would else 'are now'} answered over v{v}'s classes when "
            f"sent without labels; sent with their names beside some of v{v}'s classes, a name v{v} never learned wins "
            f"only as far as both v{v} and zero-shot CLIP favour it (docs/method.md), so they are often answered "
            f"with one of v{v}'s classes. {back}{keep}"
        )
    classes, trained = new.get("classes") or (), (new.get("metrics") or {}).get("train_classes")
    if isinstance(trained, int | float) and 0 < trained < len(classes):  # an outside check: 88% -> 25%, unsaid
        advice = f" {back}To keep them, train a version on images of every class" if newer else ""
        notes.append(
            f"task {task} v{v} was trained on images of {int(trained)} of its {len(classes)} classes: the others "
            f"{'would be' if would else 'are'} answered by experts that never saw them, mostly wrong.{advice}"
        )
    was, now = ((x.get("metrics") or {}).get("val_accuracy") for x in (old, new))
    if isinstance(was, int | float) and isinstance(now, int | float) and now < was - 0.05:
        on_some = [partial_classes((x.get("metrics") or {}).get("val_classes"), x.get("classes")) for x in (new, old)]
        notes.append(  # an outside check's v2 "100.0%" was on 2 of its 8 classes (29% on all 8): said, as in the table
            f"task {task} v{v}: validation accuracy {now:.1%}{on_some[0]} against v{replaced}'s {was:.1%}"
            f"{on_some[1]} (each on its own validation images)"
        )
    return notes


def stored_replacement_notes(store: Any, before: Any, task: str, version: int, would: bool) -> list[str]:
    """`replacement_notes` of stored `version` of `task` (uploaded, activated, trained into the store) against the
    task's active version in the store index `before` the change (None: it could not be read; no remark then)."""
    record = before.tasks.get(task) if before is not None else None
    old = record.active_record() if record is not None else None
    if old is None or old.version == version:
        return []
    try:
        new = store.version(task, version)
    except (ClipbankError, OSError):  # the store cannot say now: the change stands, a remark less
        return []
    as_listed = [{"version": r.version, "classes": r.classes, "metrics": dict(r.metrics)} for r in (new, old)]
    return replacement_notes(task, *as_listed, would)
