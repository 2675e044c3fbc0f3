"""``finrec materialize``: write every customer's serving record to Redis, for replicas that load no customer."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from finrec.cli._common import ENGINE_HELP, engine_of, out, settings_of
from finrec.errors import FinrecError

_REDIS = ("Redis to write to, redis://host:port/db (rediss:// for TLS, redis://:password@host...); serve it "
          "with serve.customer_features set to the same URL.")
_DATA = "Dataset whose customers to materialise, at the end of its events (default: the bundle's training data)."
_MODEL = ("Bundle whose encodings the records hold (default: the registry's champion). Materialise every bundle the "
          "replicas may serve (champion, challenger) from the same data.")
_PREFIX = ("Key prefix in Redis (default: the URL's ?prefix=, else `finrec`); keys are "
           "<prefix>:feat:<snapshot>:<version>:...")
_ENGINE = (ENGINE_HELP + " With spark, the driver holds no customer: each task builds a bucket of customers and "
           "writes their records to Redis itself.")
_BLOCK = ("Customers built at once: per block of the duckdb engine (default 50,000), per task of the spark engine "
          "(default 20,000). Memory grows with it.")
_KEEP = ("Hours the previous snapshot of this model version stays readable after the switch, for replicas still on "
         "it (0: deleted at once).")


def materialize(
    ctx: typer.Context,
    redis: Annotated[str, typer.Option("--redis", help=_REDIS)],
    data: Annotated[Path | None, typer.Option("--data", "-d", help=_DATA)] = None,
    model_dir: Annotated[Path | None, typer.Option("--model-dir", "-m", help=_MODEL)] = None,
    prefix: Annotated[str | None, typer.Option(help=_PREFIX)] = None,
    engine: Annotated[str | None, typer.Option(help=_ENGINE)] = None,
    block: Annotated[int | None, typer.Option(min=100, help=_BLOCK)] = None,
    keep_old_hours: Annotated[float, typer.Option(min=0, help=_KEEP)] = 24.0,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Materialise every customer of DATA for the bundle into Redis, then switch that model version to them.

    Each customer's record (features at the end of the data in the bundle's encodings, holdings, pair history,
    recent declines and impressions) goes to one key; a manifest and the catalogue are written beside them, and
    the model version's `current` pointer moves last, so replicas never read half a snapshot.
    """
    from finrec.pipeline import load_model
    from finrec.serving.materialize import producer
    from finrec.serving.materialized import MaterializedFeatures

    settings = settings_of(ctx)
    name = engine_of(ctx, engine)
    producer(name)  # an engine that is not there fails before any work
    if model_dir is None:
        from finrec.registry import CHAMPION, ModelRegistry

        registry = ModelRegistry.from_settings(settings)
        model_dir = registry.path(registry.require(CHAMPION))
    if not (Path(model_dir) / "manifest.json").is_file():
        raise FinrecError(f"no model bundle at {model_dir}", hint="pass --model-dir, a folder `finrec train` wrote")
    model, manifest = load_model(Path(model_dir))
    data = data or Path(manifest.get("inputs", {}).get("data", ""))
    if not data or not Path(data).is_dir():
        raise FinrecError(f"the dataset folder {data} does not exist", hint="pass --data DATA_FOLDER")
    url = _with_prefix(redis, prefix)
    features = MaterializedFeatures(url, settings.serve.store_timeout_seconds)
    keep = int(keep_old_hours * 3600)
    if name == "spark":
        written = _on_spark(ctx, Path(data), Path(model_dir), model, manifest, features, block, keep)
    else:
        written = _embedded(Path(data), model, manifest, features, block, keep, progress, settings)
    out.print(f"materialised {written['customers']} customers of snapshot {written['snapshot_id']} for model "
              f"version {escape(written['model_version'])} at {features.address} in {written['seconds']} s "
              f"({written['engine']}); serve them with serve.customer_features = {escape(_shown(url))}")  # fmt: skip


def _embedded(data: Path, model: Any, manifest: dict[str, Any], features: Any, block: int | None, keep: int,
              progress: bool, settings: Any) -> dict[str, Any]:  # fmt: skip
    """This machine: the dataset loaded, its customers built block by block (a progress bar per block)."""
    from finrec.data.dataset import load_dataset
    from finrec.serving.materialize import DEFAULT_BLOCK, EmbeddedProducer, materialize

    ds = load_dataset(data, future_tolerance_seconds=settings.validation.future_tolerance_seconds)
    source = EmbeddedProducer(ds, block or DEFAULT_BLOCK)
    if not progress:
        return materialize(source, model, manifest, features, settings, keep_old_seconds=keep)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=out) as bar:  # fmt: skip
        task = bar.add_task("customers", total=ds.n_users)
        return materialize(source, model, manifest, features, settings, keep_old_seconds=keep,
                           on_progress=lambda n: bar.advance(task, n))  # fmt: skip


def _on_spark(ctx: typer.Context, data: Path, model_dir: Path, model: Any, manifest: dict[str, Any], features: Any,
              block: int | None, keep: int) -> dict[str, Any]:  # fmt: skip
    """Spark: the data validated first (Spark does not validate), then each bucket of customers built and written
    by its task; Spark shows no progress per customer, so the buckets are announced and the total printed."""
    from finrec.cli import _validate_or_exit
    from finrec.engine.batch import CUSTOMERS_PER_BUCKET
    from finrec.engine.materialize import SparkProducer
    from finrec.engine.spark import spark_session
    from finrec.serving.materialize import materialize

    settings = settings_of(ctx)
    report = _validate_or_exit(ctx, data, quiet=True)
    dedupe = report.repeats_event_ids
    spark = spark_session(settings.engine)
    with SparkProducer(spark, data, model_dir, dedupe=dedupe, per_bucket=block or CUSTOMERS_PER_BUCKET) as source:
        out.print(f"spark: {source.n_customers:,} customers in {source.buckets:,} buckets of about "
                  f"{source.per_bucket:,}; each bucket's task writes its records to Redis")  # fmt: skip
        return materialize(source, model, manifest, features, settings, keep_old_seconds=keep)


def _with_prefix(url: str, prefix: str | None) -> str:
    if prefix is None:
        return url
    if "prefix=" in url:
        raise FinrecError("the prefix is given twice (--prefix and the URL's ?prefix=)", hint="give one of them")
    return f"{url}{'&' if '?' in url else '?'}prefix={prefix}"


def _shown(url: str) -> str:
    """The URL without its password."""
    from urllib.parse import urlsplit, urlunsplit

    s = urlsplit(url)
    if s.password is None:
        return url
    netloc = f"{s.username or ''}:***@{s.hostname}" + (f":{s.port}" if s.port else "")
    return urlunsplit((s.scheme, netloc, s.path, s.query, ""))
