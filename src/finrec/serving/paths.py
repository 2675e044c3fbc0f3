"""No server paths in any answer: the folders a service reads and writes are replaced in answer texts.

Errors from loading a bundle or opening a store name the files involved, which is what an operator reading the
logs needs, but an answer to a caller must not reveal the server's layout. :func:`register_paths` records the
folders of a running service (workspace, models, data, registry); :func:`scrub_paths` replaces each, longest
first, with ``<server path>``. Logs keep the real paths.

>>> register_paths(["/srv/finrec/models"])
>>> scrub_paths("model bundle /srv/finrec/models/m2 cannot serve")
'model bundle <server path>/m2 cannot serve'
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from pathlib import Path

_lock = threading.Lock()
_paths: list[str] = []
PLACEHOLDER = "<server path>"


def register_paths(paths: Iterable[Path | str | None]) -> None:
    """Add folders (and the files in them) whose names must not reach an answer; both as given and resolved."""
    with _lock:
        for p in paths:
            if p is None or str(p) in ("", "."):
                continue
            for text in {str(p), str(Path(p).resolve()), os.path.abspath(p)}:
                if len(text) > 1 and text not in _paths:
                    _paths.append(text)
        _paths.sort(key=len, reverse=True)  # longest first: a folder inside another is replaced whole


def scrub_paths(text: str) -> str:
    """``text`` with every registered folder replaced by ``<server path>``."""
    for p in _paths:
        if p in text:
            text = text.replace(p, PLACEHOLDER)
    return text


def scrub_value(value: object) -> object:
    """A JSON-ready value with :func:`scrub_paths` applied to every string in it."""
    if isinstance(value, str):
        return scrub_paths(value)
    if isinstance(value, dict):
        return {k: scrub_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrub_value(v) for v in value]
    return value
