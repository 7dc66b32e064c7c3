"""An offline domain written out as ImageFolder trees, as a user's own data would be (`clipbank data export`)."""

from __future__ import annotations

import os
import secrets
import shutil
import stat
from pathlib import Path

from .domains import SPLITS, class_folder, get_domain


def export_domain(name: str, out: str | os.PathLike, splits: tuple[str, ...] = SPLITS) -> dict[str, int]:
    """Write a domain as ImageFolder trees `out/<split>/<class>/<n>.png`; returns images written per split. They
    are written in a hidden sibling folder, renamed to `out` when complete: a stopped export leaves nothing."""
    domain = get_domain(name)
    if not str(out).strip() or (Path(out).is_dir() and any(Path(out).iterdir())):  # classes would mix
        raise ValueError(f"{str(out)!r} is not a new or empty folder: export into a new folder")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{str(out)!r} is a file: export into a new folder")
    try:  # before any image is made: a parent that is a file, a folder that cannot be written
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = out.parent / f".{out.name}.probe-{secrets.token_hex(4)}"
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        raise type(e)(f"cannot export into {str(out)!r}: {e.strerror or e} ({e.filename or out.parent})") from None
    work = out.with_name(f".{out.name}.part-{secrets.token_hex(4)}")
    counts = {}
    try:
        for split in splits:
            images, labels = domain.split(split)
            for i, (img, label) in enumerate(zip(images, labels, strict=True)):
                (folder := work / split / class_folder(domain.classes[label])).mkdir(parents=True, exist_ok=True)
                img.save(folder / f"{i:05d}.png")
            counts[split] = len(images)
        if out.is_dir():  # empty, as checked: replaced whole, with the permissions the user gave it
            os.chmod(work, stat.S_IMODE(out.stat().st_mode))
            out.rmdir()
        work.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # gone once renamed; what an error or Ctrl-C left otherwise
    return counts
