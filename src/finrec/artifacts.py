"""Versioned artifacts: a folder written atomically with a manifest.

Every stage writes its output into a temporary sibling folder and renames it
into place only when complete, so a crash or Ctrl-C never leaves a half-written
artifact where a later stage could read it. ``manifest.json`` records what the
artifact is, what it was made from (inputs, config, code version), checksums of
its files and its metrics.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from finrec import __version__
from finrec.errors import ArtifactError

MANIFEST = "manifest.json"


@contextmanager
def atomic_dir(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``target`` when the block ends without error.

    Raises
    ------
    ArtifactError
        ``target`` exists and is not empty, and ``overwrite`` is false.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise ArtifactError(f"{target} exists and is not a folder", hint="choose another output path")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ArtifactError(
            f"output folder {target} already exists and is not empty",
            hint="pass --overwrite to replace it, or choose another --out",
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(target)


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def code_version() -> str:
    """Package version plus the git commit when running from a checkout."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{__version__}+{commit}" if commit else __version__


def write_manifest(
    folder: Path,
    kind: str,
    *,
    config: dict[str, Any],
    inputs: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``manifest.json`` listing every file under ``folder`` with its size and sha256."""
    files = {
        str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {
        "kind": kind,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "code_version": code_version(),
        "config": config,
        "inputs": inputs or {},
        "metrics": metrics or {},
        "files": files,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
    return manifest


def verify_files(folder: Path, manifest: dict[str, Any]) -> None:
    """Check every file the manifest lists against its size and sha256; raises :class:`ArtifactError`.

    Parsers of model files (LightGBM's among them) can crash the process on a truncated file instead of
    raising, so a bundle is checked before anything reads it.
    """
    for name, meta in manifest.get("files", {}).items():
        path = Path(folder) / name
        if not path.is_file():
            raise ArtifactError(f"{folder} is incomplete: {name} is missing", hint="copy or retrain the whole bundle")
        if path.stat().st_size != meta.get("bytes") or sha256_file(path) != meta.get("sha256"):
            raise ArtifactError(f"{folder}/{name} does not match its manifest (changed or damaged)",
                                hint="copy or retrain the whole bundle")  # fmt: skip


def read_manifest(folder: Path, kind: str | None = None) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{folder} has no {MANIFEST}", hint="point at a folder written by finrec")
    try:
        manifest: dict[str, Any] = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}") from None
    if kind is not None and manifest.get("kind") != kind:
        raise ArtifactError(f"{folder} holds a {manifest.get('kind')!r} artifact, expected {kind!r}")
    return manifest
