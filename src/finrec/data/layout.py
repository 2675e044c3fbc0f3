"""Where a dataset's tables are: one file each, or a folder of Parquet part files.

A dataset directory holds ``users``, ``products`` and ``events``, each as one file
(``<name>.parquet``, ``<name>.csv`` or ``<name>.csv.gz``) or as a folder ``<name>/``
(or ``<name>.parquet/``) of Parquet part files, the way Spark writes a table. The part
files are read in name order, as one table.

Examples
--------
>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> _ = (d / "users.csv").write_text("user_id\\nC-1\\n")
>>> find_table(d, "users").name
'users.csv'
"""

from __future__ import annotations

from pathlib import Path

from finrec.data.contract import SUFFIXES, TABLES
from finrec.errors import DataError


def find_table(data_dir: Path, name: str) -> Path:
    """The file, or folder of Parquet part files, holding table ``name`` in ``data_dir``.

    Looks for the files ``<name>.parquet``, ``<name>.csv`` and ``<name>.csv.gz``, and for
    the folders ``<name>/`` and ``<name>.parquet/`` (see :func:`table_files`).

    Raises
    ------
    DataError
        The directory does not exist, nothing holds the table, more than one thing does,
        or its folder holds no Parquet file.
    """
    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise DataError(
            f"data directory {data_dir} does not exist",
            hint="pass --data DIR pointing to a folder with users, products and events tables (see docs/data.md)",
        )
    if not data_dir.is_dir():
        raise DataError(
            f"data path {data_dir} is a file, not a directory",
            hint="pass the folder that holds users, products and events, not a single file",
        )
    candidates = [f"{name}{suffix}" for suffix in SUFFIXES]
    found = [data_dir / c for c in candidates if (data_dir / c).is_file()]
    found += [data_dir / f for f in (name, f"{name}.parquet") if (data_dir / f).is_dir()]
    if len(found) == 1:
        table_files(found[0])  # a folder without part files is refused here, naming it
        return found[0]
    if len(found) > 1:
        raise DataError(
            f"table '{name}' is stored more than once in {data_dir}: "
            f"{', '.join(p.name + ('/' if p.is_dir() else '') for p in found)}",
            hint=f"keep exactly one file or folder for '{name}' and move or delete the others",
        )
    present = sorted(p.name + ("/" if p.is_dir() else "") for p in data_dir.iterdir())
    shown = ", ".join(present[:20]) + (f" and {len(present) - 20} more" if len(present) > 20 else "")
    where = f"it holds: {shown}" if present else "the directory is empty"
    near = [p for p in present if p.lower() in {c.lower() for c in candidates}]
    if near:
        hint = f"file names are case-sensitive: rename {near[0]} to {name}{_suffix_of(near[0])}"
    else:
        hint = f"add the table as {' or '.join(candidates)}, or a folder {name}/ of Parquet files (see docs/data.md)"
    raise DataError(
        f"table '{name}' not found in {data_dir}: looked for {', '.join(candidates)} and {name}/; {where}",
        hint=hint,
    )


def table_files(path: Path) -> list[Path]:
    """The data files of a table found by :func:`find_table`: the file itself, or a folder's part files.

    A folder's part files are its ``*.parquet`` files (not hidden ones, not in subfolders), in name order,
    which is block order for the part files Spark and ``finrec generate`` write (``part-00000-...``).

    Raises
    ------
    DataError
        The folder holds no Parquet file.
    """
    path = Path(path)
    if not path.is_dir():
        return [path]
    parts = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(".parquet") and p.name[0] not in "._")
    if not parts:
        raise DataError(
            f"table folder {path} holds no Parquet file (*.parquet)",
            hint="a table stored as a folder holds Parquet part files (as Spark writes them); "
            "CSV tables are single files",
        )
    return parts


def _suffix_of(filename: str) -> str:
    low = filename.lower()
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if low.endswith(suffix):
            return suffix
    return ""  # pragma: no cover


def find_tables(data_dir: Path) -> dict[str, Path]:
    """The file or folder of every contract table, by table name (see :func:`find_table`)."""
    return {name: find_table(data_dir, name) for name in TABLES}
