"""The rules for a task's class names and prompt templates, shared by the bundle manifest's schema, the trainer
(which checks them before training) and the server (which checks a request's templates)."""

from __future__ import annotations

import string
import unicodedata
from collections.abc import Callable, Sequence
from typing import Any

MAX_CLASSES = 10_000
MAX_TEMPLATES = 128
MAX_PROMPTS = 100_000  # classes x templates: text passes of an upload's trial run
MAX_CLASS_CHARS = 200
MAX_TEMPLATE_CHARS = 300


def shown(value: Any, limit: int = 80) -> str:
    """`repr` cut to `limit` characters, for echoing untrusted values in messages."""
    return cut(repr(value), limit)


def cut(text: str, limit: int) -> str:
    """`text` cut to `limit` characters, the last one an ellipsis when it was longer."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def label_key(label: str) -> str:
    """How labels are matched to a task's classes when routing (`inference.known_tasks`): case, runs of
    whitespace, `_` (which the trainer reads as a space in folder names) and Unicode's composed or decomposed
    spelling (NFC) do not matter, so "Letter A" and "letter_a" name the class "letter a", and "café" typed on Linux
    names the class of a folder named on macOS (which writes "cafe" and a combining accent)."""
    text = unicodedata.normalize("NFC", label).casefold().replace("_", " ")
    return " ".join("".join(c for c in text if not _ignorable(c)).split())


# drawn as nothing and never what tells two names apart: soft hyphen, combining grapheme joiner, zero-width
# space, word joiner, byte order mark, Hangul fillers (letters by category); and variation selectors, below.
# Not every format character: the zero-width joiner makes one emoji of several, and tags make a flag.
_IGNORABLE = frozenset("\u00ad\u034f\u200b\u2060\ufeff\u115f\u1160\u3164\uffa0")


def _ignorable(c: str) -> bool:
    """Part of no name: "x" and "x" + U+FE0F (a variation selector) are one label."""
    return c in _IGNORABLE or 0xFE00 <= ord(c) <= 0xFE0F


def _invisible(c: str) -> bool:
    """Nothing a reader sees: whitespace, a format character, or an ignorable one. A combining mark alone is a
    label (Thai's tone marks, a lone accent); its tokens differ from other marks'."""
    return c.isspace() or unicodedata.category(c) == "Cf" or _ignorable(c)


def label_problem(label: str) -> str | None:
    """What makes a request's label unusable, or None: a control character (NUL, escape; whitespace is fine, the
    tokenizer collapses it), or no visible character at all (only spaces, invisible format characters such as
    the zero-width space, variation selectors or Hangul fillers: an empty label to a reader)."""
    bad = next((c for c in label if unicodedata.category(c) == "Cc" and not c.isspace()), None)
    if bad is not None:
        return f"has a control character (U+{ord(bad):04X})"
    if all(_invisible(c) for c in label):
        return "is empty" if not label.strip() else "has no visible character"
    return None


def template_ok(template: Any) -> bool:
    """A prompt template with exactly one plain `{}`: no field name, conversion or format spec (so
    `.format(label)` always works and costs no more than the label), and at most MAX_TEMPLATE_CHARS long."""
    if not isinstance(template, str) or len(template) > MAX_TEMPLATE_CHARS:
        return False
    try:
        fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    except ValueError:
        return False
    return fields == [("", "", None)]


def _is_text(v: Any, limit: int) -> bool:
    """Non-blank text of at most `limit` characters that is valid Unicode: a lone surrogate (what a file name that
    is not UTF-8 decodes to) could be stored, but not sent back in a JSON answer."""
    return isinstance(v, str) and 0 < len(v) <= limit and v.strip() != "" and _encodable(v)


def _encodable(v: str) -> bool:
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _text_list_problem(manifest: dict, key: str, ok: Callable[[Any], bool], cap: int, what: str) -> list[str]:
    value = manifest.get(key)
    rule = f"{key} must be a list of 1..{cap} distinct {what}"
    if not isinstance(value, list) or not value or len(value) > cap:
        return [f"{rule}; got {'a list of ' + str(len(value)) if isinstance(value, list) else shown(value)}"]
    bad = next((i for i, x in enumerate(value) if not ok(x)), None)
    if bad is not None:
        return [f"{rule}; {key}[{bad}] is {shown(value[bad])}"]
    if len(set(value)) != len(value):
        return [f"{rule}; some repeat"]
    return []


def classes_problem(classes: Any) -> list[str]:
    """What is wrong with a task's class names, by the manifest's rule (the trainer checks them before training)."""
    what = f"non-blank names of 1..{MAX_CLASS_CHARS} characters"
    return _text_list_problem(
        {"classes": classes}, "classes", lambda c: _is_text(c, MAX_CLASS_CHARS), MAX_CLASSES, what
    )


def unanswerable_class(classes: Sequence[str]) -> str | None:
    """Why a class name could not come back as a request's label, or None. A class named with NUL or an escape
    was answered to every client, which got 422 sending it back. Checked on new bundles (training, uploads), not
    on stored ones: a task stored before this rule keeps serving."""
    for i, name in enumerate(classes):
        if (why := label_problem(name)) is not None:
            return f"classes[{i}] {shown(name)} {why}: a class name must be one a request could send as a label"
    return None


def labels_problems(classes: Any, templates: Any) -> list[str]:
    """What is wrong with a task's classes and templates together, by the manifest's rules: the trainer checks
    them before training, so a run is not lost to a bundle that could not be packed (or stored)."""
    problems = _labels_problems({"classes": classes, "templates": templates})
    unanswerable = None if problems else unanswerable_class(classes)
    return [*problems, unanswerable] if unanswerable else problems


def _labels_problems(manifest: dict) -> list[str]:
    problems = classes_problem(manifest.get("classes"))
    what = f"templates of <= {MAX_TEMPLATE_CHARS} characters with one plain '{{}}'"
    problems += _text_list_problem(manifest, "templates", template_ok, MAX_TEMPLATES, what)
    prompts = len(manifest["classes"]) * len(manifest["templates"]) if not problems else 0
    if prompts > MAX_PROMPTS:
        problems.append(f"classes x templates = {prompts} prompts; at most {MAX_PROMPTS}")
    return problems


def twin_labels(labels: Sequence[str], signatures: Sequence[Any], templates: int) -> tuple[str, str] | None:
    """The first two labels whose prompts the tokenizer reads the same under every template, or None.

    `signatures`: one hashable per prompt (its token ids), template-major: template t's prompt of label j at
    `t * len(labels) + j`. Distinct text is not enough: open_clip's tokenizer ignores case, collapses spacing, drops
    some punctuation and cuts prompts at its context length, so such labels get the same embedding and can only
    split the probability between them."""
    n = len(labels)
    seen: dict[tuple, int] = {}
    for j in range(n):
        key = tuple(signatures[t * n + j] for t in range(templates))
        if key in seen:
            return labels[seen[key]], labels[j]
        seen[key] = j
    return None


def twin_message(twins: tuple[str, str]) -> str:
    a, b = twins
    if "_" in a + b and label_key(a) == label_key(b):  # through a task, both are encoded as its class
        return (
            f"{shown(a, 60)} and {shown(b, 60)} name the same class (labels match classes whatever their case, "
            "spacing or `_`), so the model cannot tell them apart: send it once"
        )
    first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    where = f" (they differ first at character {first + 1})" if shown(a, 60) == shown(b, 60) else ""
    return (
        f"{shown(a, 60)} and {shown(b, 60)}{where} are the same text to the backbone's tokenizer (it ignores case, "
        "spacing and how accents are composed, and cuts long prompts), so the model cannot tell them apart: make "
        "them differ"
    )
