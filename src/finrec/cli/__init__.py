"""The ``finrec`` command line. Commands are verbs; every option is explained in ``--help``.

Settings come from ``--config FILE`` (or ``$FINREC_CONFIG``, or ``./finrec.toml``)
and ``FINREC_*`` variables; flags override both. Problems the user can fix are
printed as one clear message with a hint, never as a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

# LightGBM and PyTorch use OpenMP; its default busy-waiting threads slow training 20-200x on a
# machine whose cores are shared with another process. Passive waiting costs nothing when idle.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from finrec.cli._common import ENGINE_HELP, engine_of, err, out
from finrec.cli._common import is_store_error as _is_store_error
from finrec.cli._common import open_events_for_reading as _open_events_for_reading
from finrec.cli._common import settings_of as _settings
from finrec.config import load_settings, resolve_config_file
from finrec.errors import DataValidationError, FinrecError

#: `finrec --help` lists the commands in the order a user meets them, whatever order they are defined in.
COMMAND_ORDER = ("generate", "validate", "train", "evaluate", "recommend", "materialize", "serve", "monitor",
                 "registry", "experiment", "retrain", "simulate", "scheduler", "audit", "keygen", "config",
                 "demo")  # fmt: skip


class _InOrder(TyperGroup):
    def list_commands(self, ctx: Any) -> list[str]:  # typer's own (vendored) click.Context
        names = super().list_commands(ctx)
        return sorted(names, key=lambda n: COMMAND_ORDER.index(n) if n in COMMAND_ORDER else len(COMMAND_ORDER))


app = typer.Typer(
    cls=_InOrder,
    name="finrec",
    help="Recommendation engine for financial products: synthetic world, data validation, "
    "two-stage model and a guarded real-time API.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect the resolved settings.", no_args_is_help=True)
app.add_typer(config_app, name="config")

from finrec.cli.experiment import experiment_app  # noqa: E402
from finrec.cli.materialize import materialize  # noqa: E402
from finrec.cli.registry import registry_app  # noqa: E402
from finrec.cli.retrain import retrain  # noqa: E402
from finrec.cli.scheduler import scheduler_app  # noqa: E402
from finrec.cli.simulate import simulate  # noqa: E402

app.add_typer(registry_app, name="registry")
app.add_typer(experiment_app, name="experiment")
app.add_typer(scheduler_app, name="scheduler")
app.command()(retrain)
app.command()(materialize)
app.command()(simulate)


@app.callback()
def _root(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="TOML settings file. Default: $FINREC_CONFIG, else ./finrec.toml if it exists. "
            "FINREC_* environment variables override it (nested keys joined by __).",
        ),
    ] = None,
) -> None:
    ctx.obj = {"settings": load_settings(config), "config_file": resolve_config_file(config, os.environ)}


# -- generate ---------------------------------------------------------------------------------


@app.command()
def generate(
    ctx: typer.Context,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the dataset to (created).")],
    users: Annotated[int | None, typer.Option(help="Number of customers. Default from settings: 200000.")] = None,
    products: Annotated[
        int | None, typer.Option(help="Number of products, at least 10 (one per category). Default: 300.")
    ] = None,
    months: Annotated[int | None, typer.Option(help="Months of funnel events, 1-120. Default: 12.")] = None,
    seed: Annotated[
        int | None, typer.Option(help="Random seed; the same seed gives identical tables. Default: 7.")
    ] = None,
    start: Annotated[
        str | None, typer.Option(help="First day of the period, YYYY-MM-DD; the period must end in the past.")
    ] = None,
    sessions_per_month: Annotated[
        float | None, typer.Option(help="Mean recommendation sessions per customer and month. Default: 0.7.")
    ] = None,
    slate_size: Annotated[int | None, typer.Option(help="Products shown per session, 1-20. Default: 5.")] = None,
    drift_month: Annotated[
        int | None,
        typer.Option(help="Inject a rate shock from this month (1-based): demand shifts from deposits to loans. "
                     "Up to --months + 12: a month after the data makes a shock only `finrec simulate` lives through."),
    ] = None,
    drift_strength: Annotated[float, typer.Option(help="Size of the rate shock, in logit units.")] = 1.0,
    missing_rate: Annotated[
        float, typer.Option(help="Share of missing values in optional customer columns (income, credit score...).")
    ] = 0.02,
    fmt: Annotated[str, typer.Option("--format", help="Table format: parquet or csv.")] = "parquet",
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
    validate: Annotated[bool, typer.Option(help="Validate the written dataset against the contract.")] = True,
    engine: Annotated[
        str | None,
        typer.Option(help="duckdb: blocks of 25,000 customers one after the other in this process, one file a "
                     "table. spark: the blocks in parallel on Spark (master and memory from the engine settings; "
                     "needs PySpark and Java 17), users/ and events/ as folders of Parquet part files, Parquet only. "
                     "Both give the same rows for the same seed. Default: engine.name in the settings (duckdb)."),
    ] = None,
) -> None:
    """Generate a synthetic financial world: customers, products, funnel events and their ground truth.

    Writes users, products and events in the data contract (docs/data.md), a
    ground_truth/ folder with every customer's true preferences, and a manifest.
    """
    from finrec.data.synthetic.generate import WorldConfig, generate_world

    settings = _settings(ctx)
    engine = engine or settings.engine.name
    if engine not in ("duckdb", "spark"):
        raise FinrecError(f"unknown engine {engine!r}", hint="--engine duckdb or --engine spark")
    g = settings.generate
    cfg = WorldConfig(
        users=users if users is not None else g.users,
        products=products if products is not None else g.products,
        months=months if months is not None else g.months,
        seed=seed if seed is not None else g.seed,
        start=start if start is not None else g.start,
        sessions_per_month=sessions_per_month if sessions_per_month is not None else g.sessions_per_month,
        slate_size=slate_size if slate_size is not None else g.slate_size,
        drift_month=drift_month,
        drift_strength=drift_strength,
        missing_rate=missing_rate,
        format=fmt,  # type: ignore[arg-type]
    )
    if engine == "spark":
        from finrec.data.synthetic.spark import check_for_spark, generate_world_spark
        from finrec.engine.spark import spark_session

        check_for_spark(cfg)  # before starting a JVM
        summary = generate_world_spark(cfg, out_dir, spark_session(settings.engine), overwrite=overwrite)
    else:
        summary = generate_world(cfg, out_dir, overwrite=overwrite, progress=True)
    _print_counts(summary.counts, f"Generated {out_dir} in {summary.seconds:.1f} s on {engine}")
    if validate:
        _validate_or_exit(ctx, out_dir, quiet=True)


def _print_counts(counts: dict[str, int], title: str) -> None:
    out.print(title)
    table = Table(show_header=True)
    table.add_column("table / event type")
    table.add_column("rows", justify="right")
    for k, v in counts.items():
        table.add_row(k, f"{v:,}")
    out.print(table)


# -- validate ---------------------------------------------------------------------------------


@contextmanager
def _spark_sample(ctx: typer.Context, data: Path, settings: Any) -> Iterator[tuple[Any, Any, Any]]:
    """Validate ``data``, then draw a sample of its customers with Spark: (dataset, settings naming the engine,
    the open :class:`~finrec.engine.sample.CustomerSample`)."""
    from finrec.engine.sample import CustomerSample
    from finrec.engine.spark import spark_session

    dedupe = _validate_or_exit(ctx, data, quiet=True).repeats_event_ids
    settings = settings.model_copy(update={"engine": settings.engine.model_copy(update={"name": "spark"})})
    sample = CustomerSample(spark_session(settings.engine), data, settings.engine.sample_customers,
                            seed=settings.train.seed, dedupe=dedupe)  # fmt: skip
    with sample as ds:
        out.print(f"spark: {ds.n_users:,} of {sample.n_customers:,} customers sampled whole, {len(ds.events):,} "
                  "events; the catalogue's statistics count every customer")  # fmt: skip
        yield ds, settings, sample


def _validate_or_exit(ctx: typer.Context, data: Path, quiet: bool = False, json_out: Path | None = None) -> Any:
    from finrec.data.validate import validate_dataset

    v = _settings(ctx).validation
    report = validate_dataset(data, future_tolerance_seconds=v.future_tolerance_seconds, max_examples=v.max_examples)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report.to_dict(), indent=1))
    if not quiet or not report.ok:
        report.render(out)
    if not report.ok:
        raise DataValidationError(report)
    if quiet:
        out.print(f"[green]valid[/]: {data} meets the data contract ({len(report.warnings)} warnings)")
    return report


@app.command()
def validate(
    ctx: typer.Context,
    data: Annotated[Path, typer.Option("--data", "-d", help="Dataset folder with users, products and events tables.")],
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the report as JSON to this file.")] = None,
) -> None:
    """Check a dataset against the data contract and report every problem at once.

    Exit code 0: valid (warnings allowed); 1: the data breaks the contract; 2: usage error
    (for example the folder or a table is missing).
    """
    _validate_or_exit(ctx, data, json_out=json_out)


# -- train, recommend, evaluate ---------------------------------------------------------------


@app.command()
def features(
    ctx: typer.Context,
    data: Annotated[Path, typer.Option("--data", "-d", help="Dataset folder (validated first; see docs/data.md).")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the tables to (created).")],
    cutoff: Annotated[
        str | None, typer.Option(help="Features as of this UTC time (ISO 8601; events strictly before it count). "
                                 "Default: just after the last event.")
    ] = None,
    engine: Annotated[str | None, typer.Option(help=ENGINE_HELP)] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
) -> None:
    """Write the point-in-time feature tables at a cutoff, keyed by id, as Parquet.

    behaviour (per customer), holdings, category_engagement, pair_history and history (per customer and
    product), demand (per product): the tables of the one feature definition, from DuckDB or Spark, for
    inspection, for another tool, or to compare the engines row for row.
    """
    import pandas as pd

    from finrec.features.export import export_features

    at = None
    if cutoff is not None:
        try:
            stamp = pd.Timestamp(cutoff)
        except ValueError:
            raise FinrecError(f"--cutoff {cutoff!r} is not a time",
                              hint="use ISO 8601, e.g. 2024-06-30T00:00:00Z") from None  # fmt: skip
        at = int((stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp).timestamp())  # naive times are UTC
    dedupe = _validate_or_exit(ctx, data, quiet=True).repeats_event_ids
    manifest = export_features(data, out_dir, _settings(ctx), at, engine_of(ctx, engine), overwrite, dedupe)
    rows = ", ".join(f"{k} {v:,}" for k, v in manifest["metrics"]["rows"].items())
    out.print(f"[green]wrote[/] {out_dir}: {rows} rows; cutoff {manifest['config']['cutoff']}")


@app.command()
def train(
    ctx: typer.Context,
    data: Annotated[Path, typer.Option("--data", "-d", help="Dataset folder (validated first; see docs/data.md).")],
    model_dir: Annotated[
        Path,
        typer.Option("--model-dir", "-m", help="Where to write the model bundle (an existing bundle is replaced)."),
    ],
    engine: Annotated[str | None, typer.Option(help=ENGINE_HELP + " With spark, the model learns from a sample of "
                                               "whole customers ([engine] sample_customers) and the catalogue's "
                                               "statistics count every customer.")] = None,
) -> None:
    """Train the two-stage model: two-tower retrieval, approval odds and a LightGBM ranker.

    Splits the events in time (retrieval windows, ranker window, held-out evaluation window;
    see `finrec config show` [train]), trains every stage and writes a versioned bundle with a
    manifest (data fingerprint, settings, code version, metrics). Stages without enough signal in
    the data fall back (popularity retrieval, retrieval order) and the manifest says so.
    """
    from finrec import pipeline

    settings = _settings(ctx)
    t = settings.train
    if t.two_tower_workers > 1 and t.two_tower_launcher == "spark" and engine_of(ctx, engine) != "spark":
        raise FinrecError("[train] two_tower_launcher = \"spark\" starts the two-tower's processes with Spark, "
                          "and this train runs on the embedded engine",
                          hint="pass --engine spark, or set [train] two_tower_launcher = \"local\"")  # fmt: skip
    if engine_of(ctx, engine) == "spark":
        with _spark_sample(ctx, data, settings) as (ds, settings, sample):
            # The model learns from the sample; its candidate sources are then fitted on every customer, so that
            # the bundle serves (recommend, materialize, the API) the whole base as trained.
            manifest = pipeline.train(data, model_dir, settings, progress=True, dataset=ds,
                                      fit_sources=sample.fit_sources_on_everyone)  # fmt: skip
    else:
        manifest = pipeline.train(data, model_dir, settings, progress=True)
    m = manifest["metrics"]
    out.print(f"[green]trained[/] {model_dir}  version {m['model_version']}")
    for stage, kind in m["stages"].items():
        out.print(f"  {stage}: {kind}")
    from finrec.twostage.train import validation_lines

    plan = m.get("validation", {}).get("plan", {})
    if plan.get("reason"):
        out.print(f"  validation plan: {plan['reason']}", markup=False, soft_wrap=True)
    for line in validation_lines(m.get("validation", {})):
        out.print(line, markup=False, highlight=False, soft_wrap=True)
    out.print(f"  serves: [bold]{m.get('serves', 'stack')}[/] (the best on validation; never below popularity)")
    for name, section in m["training"].items():
        shown = {k: v for k, v in section.items() if not isinstance(v, dict | list)}
        out.print(f"  {name}: {shown}")
    for fb in m["fallbacks"]:
        out.print(f"[yellow]fallback[/]: {fb}")
    out.print(f"  seconds: {m['seconds']}")


@app.command()
def recommend(
    ctx: typer.Context,
    model_dir: Annotated[Path, typer.Option("--model-dir", "-m", help="Model bundle written by `finrec train`.")],
    data: Annotated[
        Path, typer.Option("--data", "-d", help="Dataset folder: features are computed at its last event.")
    ],
    users: Annotated[Path, typer.Option("--users", "-u", help="Text file with one user id per line.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output file, .csv or .parquet.")],
    k: Annotated[int, typer.Option("--k", "-k", help="Recommendations per customer (1-1000).")] = 10,
    exclude: Annotated[
        str,
        typer.Option(
            help="held: leave out what the customer holds (default); interacted: also anything they interacted "
            "with; none: leave out nothing."
        ),
    ] = "held",
    engine: Annotated[str | None, typer.Option(help=ENGINE_HELP + " With spark, --output is a folder of part "
                                               "files and ids are written as text.")] = None,
) -> None:
    """Batch recommendations: columns user_id, rank, product_id, score.

    Only products the customer is eligible for and suited to are recommended, and fewer than k
    when fewer pass the rules. Customers unknown to the data get popular products that need no
    profile to be eligible; never an error.
    """
    from finrec import pipeline

    settings = _settings(ctx)
    if engine_of(ctx, engine) == "spark":
        from finrec.engine.batch import spark_recommend
        from finrec.engine.spark import spark_session

        pipeline.check_recommend_request(k, exclude, output)  # before validation and Spark's start-up
        dedupe = _validate_or_exit(ctx, data, quiet=True).repeats_event_ids
        res = spark_recommend(spark_session(settings.engine), model_dir, data, users, k, output, settings, exclude,
                              dedupe=dedupe)  # fmt: skip
    else:
        res = pipeline.recommend(model_dir, data, users, k, output, settings, exclude=exclude, progress=True)
    unknown = (
        f"; {res['unknown_users']} unknown to the data got the most popular products that need no profile"
        if res["unknown_users"]
        else ""
    )
    out.print(
        f"[green]wrote[/] {res['rows']:,} rows for {res['users']:,} customers to {output}{unknown}; "
        f"model {res['model_version']}"
    )


@app.command()
def evaluate(
    ctx: typer.Context,
    model_dir: Annotated[Path, typer.Option("--model-dir", "-m", help="Model bundle written by `finrec train`.")],
    data: Annotated[Path, typer.Option("--data", "-d", help="Dataset folder (the held-out window is its last days).")],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="report.json; an HTML report with plots is written next to it.")
    ] = Path("report.json"),
    ground_truth: Annotated[
        Path | None,
        typer.Option(help="Ground truth folder for the oracle (default: DATA/ground_truth when it exists)."),
    ] = None,
    engine: Annotated[str | None, typer.Option(help=ENGINE_HELP + " With spark, the evaluation customers come "
                                               "from a sample of whole customers ([engine] sample_customers).")] = None,
) -> None:
    """Offline evaluation on the held-out window against baselines and, on synthetic data, the oracle.

    Models: random, popularity, popularity_eligible, two_tower, two_stage, oracle. Metrics: ndcg@k,
    map@k, mrr, hit_rate@k, recall@k and recall@N of retrieval, coverage@k, and on synthetic data
    true_conversion@k; bootstrap 95% intervals and a breakdown by customer segment.
    """
    from finrec import pipeline

    settings = _settings(ctx)
    if engine_of(ctx, engine) == "spark":
        with _spark_sample(ctx, data, settings) as (ds, settings, _):
            report = pipeline.evaluate(model_dir, data, output, settings, ground_truth=ground_truth, progress=True,
                                       dataset=ds)  # fmt: skip
    else:
        report = pipeline.evaluate(model_dir, data, output, settings, ground_truth=ground_truth, progress=True)
    k = report["model"]["k"]
    table = Table(title=None)
    metrics = [f"ndcg@{k}", f"map@{k}", "mrr", f"hit_rate@{k}", f"coverage@{k}", f"true_conversion@{k}"]
    table.add_column("model", no_wrap=True)
    for m in metrics:
        table.add_column(m, justify="right")
    for name, vals in report["models"].items():
        cells = []
        for m in metrics:
            v = vals.get(m)
            cells.append(
                "—"
                if v is None
                else (f"{v['mean']:.4f}" + (f" ±{(v['high'] - v['low']) / 2:.4f}" if "low" in v else ""))
            )
        table.add_row(name, *cells)
    out.print(table)
    for note in report["notes"]:
        out.print(f"  {note}")
    out.print(f"[green]wrote[/] {output} and {output.with_suffix('.html')}")


# -- config -----------------------------------------------------------------------------------


@config_app.command("show")
def config_show(
    ctx: typer.Context,
    fmt: Annotated[str, typer.Option("--format", help="Output format: toml or json.")] = "toml",
) -> None:
    """Print the resolved settings (defaults < file < FINREC_* variables)."""
    settings = _settings(ctx)
    data = settings.model_dump(mode="json")
    source = ctx.obj["config_file"]
    if fmt == "json":
        print(json.dumps(data, indent=2))
        return
    if fmt != "toml":
        raise FinrecError(f"unknown --format {fmt!r}", hint="use toml or json")
    print(f"# resolved settings; file: {source or '(none)'}; FINREC_* variables applied")
    print(_to_toml(data))


def _to_toml(data: dict[str, Any], prefix: str = "") -> str:
    scalars = {k: v for k, v in data.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    lines = [f"{k} = {json.dumps(v)}" for k, v in scalars.items()]
    for k, v in tables.items():
        name = f"{prefix}{k}"
        lines += ["", f"[{name}]", _to_toml(v, prefix=f"{name}.")]
    return "\n".join(lines).strip("\n")


# -- serve and audit ----------------------------------------------------------------------------


def _free_port(host: str, port: int) -> None:
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise FinrecError(f"cannot listen on {host}:{port}: {exc.strerror}",
                              hint="stop what uses the port or pass another --port") from None  # fmt: skip


@app.command()
def serve(
    ctx: typer.Context,
    model_dir: Annotated[
        Path | None, typer.Option("--model-dir", "-m", help="Model bundle to serve (written by `finrec train`). "
                                  "Default: the model registry's champion (and each experiment arm's model), "
                                  "followed without a restart when promoted or rolled back.")
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option("--data", "-d", help="Dataset with the customers and products to serve. "
                     "Default: the dataset the model was trained on (from its manifest)."),
    ] = None,
    host: Annotated[str | None, typer.Option(help="Interface to listen on. Default: 127.0.0.1.")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port. Default: 8000.")] = None,
    workers: Annotated[
        int | None, typer.Option(help="Server processes, each with its own copy of the model. Default: 1.")
    ] = None,
    clock: Annotated[
        str | None,
        typer.Option(help="`wall` (default): the machine's clock. `data`: time continues from the end of the data, "
                     "for replaying a synthetic world (cooling-off and frequency caps then see its events)."),
    ] = None,
    clock_speed: Annotated[
        float | None,
        typer.Option(help="With --clock data: data seconds per wall second (1440 = a day a minute), for closed-loop "
                     "simulations. Default: 1."),
    ] = None,
    access_log: Annotated[bool, typer.Option(help="Log every request as a JSON line (route, status, ms).")] = False,
    no_auth: Annotated[
        bool, typer.Option("--no-auth", help="Development only: no API keys, every caller has every scope. Refused "
                           "on any address but a loopback one (127.0.0.1, ::1); logged loudly.")
    ] = False,
) -> None:
    """Serve the API: GET /recommend/{user_id}, POST /recommend, POST /events, /health, /ready, /metrics, /docs.

    Loads the model and the customers' data, then listens with uvicorn (uvloop, httptools). Every answer
    passes the guardrails before any scoring and is written to the audit log (see `finrec audit`).
    Callers need API keys with scopes ([[auth.keys]], docs/security.md); with none configured, on a loopback
    address a development key with every scope is made and printed. Logs are JSON lines on stderr. Stop with
    Ctrl-C.
    """
    import tempfile

    import uvicorn

    from finrec.config import dump_resolved_settings
    from finrec.serving.app import create_app
    from finrec.serving.auth import KeyTable, is_loopback
    from finrec.serving.logs import configure_json_logging
    from finrec.serving.service import Service

    base = _settings(ctx)
    updates = {k: v for k, v in {"model_dir": model_dir, "data": data, "host": host, "port": port,
                                 "workers": workers, "clock": clock, "clock_speed": clock_speed}.items()
               if v is not None}  # fmt: skip
    try:
        serve_settings = type(base.serve).model_validate({**base.serve.model_dump(), **updates})
    except ValueError as exc:
        raise FinrecError(f"invalid option: {exc}", hint="see `finrec serve --help`") from None
    settings = base.model_copy(update={"serve": serve_settings})
    settings = _with_keys(settings, no_auth)
    srv = settings.serve
    KeyTable.from_settings(settings)  # a short, empty or unreadable key stops the start here, before any work
    if settings.auth.disabled and not is_loopback(srv.host):
        raise FinrecError(f"--no-auth is refused on {srv.host}: anyone who reaches it would have every scope",
                          hint="serve on --host 127.0.0.1, or configure API keys ([[auth.keys]], docs/security.md)")
    _free_port(srv.host, srv.port)
    os.umask(0o077)  # every file the service makes (event store, audit log, keys) is its user's alone
    configure_json_logging()
    if access_log:
        os.environ["FINREC_ACCESS_LOG"] = "1"
    common = {"host": srv.host, "port": srv.port, "loop": "uvloop", "http": "httptools", "access_log": False,
              "log_config": None, "timeout_graceful_shutdown": 10,
              "timeout_keep_alive": srv.keep_alive_seconds}  # fmt: skip
    if srv.workers == 1:
        service = Service.from_settings(settings)
        out.print(f"serving model {service.recommender.model.version} on http://{srv.host}:{srv.port} "
                  f"(Swagger UI: http://{srv.host}:{srv.port}/docs)")  # fmt: skip
        try:
            uvicorn.run(create_app(settings, service=service), **common)
        finally:
            service.close()
        return
    # Several processes: each worker builds its own app from the settings resolved here (file, variables, flags),
    # written to a private file; metrics are shared via files.
    from finrec.pipeline import load_model

    if srv.model_dir is not None:
        load_model(srv.model_dir)  # a missing or corrupt bundle fails here, clearly, not in every worker
    else:  # every worker serves the registry's champion and follows it
        from finrec.registry import CHAMPION, ModelRegistry

        registry = ModelRegistry.from_settings(settings)
        load_model(registry.path(registry.require(CHAMPION)))
    private = tempfile.mkdtemp(prefix="finrec-serve-")  # 0700
    resolved = Path(private) / "settings.json"
    dump_resolved_settings(_absolute(settings), resolved)
    os.environ["FINREC_RESOLVED_SETTINGS"] = str(resolved)
    metrics_dir = Path(private) / "metrics"
    metrics_dir.mkdir()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    out.print(f"serving {srv.model_dir or 'the registry champion'} with {srv.workers} workers on http://{srv.host}:{srv.port}")
    try:
        uvicorn.run("finrec.serving.app:app_from_environment", factory=True, workers=srv.workers,
                    **common)  # fmt: skip
    finally:
        import shutil

        shutil.rmtree(private, ignore_errors=True)


def _absolute(settings: Any) -> Any:
    """The settings with the folders a worker opens made absolute (workers may not share the working folder)."""
    srv = settings.serve
    serve = srv.model_copy(update={k: getattr(srv, k).resolve() for k in ("model_dir", "data", "models_root",
                                                                           "audit_log", "audit_key_file",
                                                                           "request_key_file")
                                   if getattr(srv, k) is not None})  # fmt: skip
    registry = settings.registry.model_copy(update={"root": settings.registry.path(settings.workspace).resolve()})
    return settings.model_copy(update={"workspace": settings.workspace.resolve(), "serve": serve,
                                       "registry": registry})  # fmt: skip


def _with_keys(settings: Any, no_auth: bool) -> Any:
    """The settings with authentication as `finrec serve` runs it: off with --no-auth; a development key when
    no key is configured and the address is a loopback one (printed, with a curl line); else unchanged."""
    from finrec.config import KeySettings
    from finrec.serving.auth import SCOPES, ensure_dev_key, hash_key, is_loopback

    srv = settings.serve
    if no_auth:
        err.print("[bold red]WARNING: authentication is OFF (--no-auth)[/]: every caller on this machine has every "
                  "scope, admin included. For development only.")  # fmt: skip
        return settings.model_copy(update={"auth": settings.auth.model_copy(update={"disabled": True})})
    if settings.auth.keys or srv.api_key is not None or settings.auth.disabled:
        return settings
    if not is_loopback(srv.host):
        raise FinrecError(f"no API keys are configured, and {srv.host} is reachable from other machines",
                          hint="configure keys in [[auth.keys]] (`finrec keygen` makes one; docs/security.md)")
    path = settings.auth.dev_key_file or settings.workspace / "secrets" / "dev-api-key"
    key = ensure_dev_key(path)
    dev = KeySettings(name="dev", scopes=list(SCOPES), sha256=hash_key(key), rate_per_second=None)
    url = f"http://{srv.host}:{srv.port}"
    out.print(f"[bold yellow]development key[/] (every scope; kept in {path}; configure \\[\\[auth.keys]] for real "
              f"use):\n  {key}\n  try: curl -H 'X-API-Key: {key}' '{url}/recommend/1?k=5'")  # fmt: skip
    return settings.model_copy(update={"auth": settings.auth.model_copy(update={"keys": [dev]})})


@app.command()
def audit(
    ctx: typer.Context,
    user: Annotated[str, typer.Option("--user", "-u", help="Customer id whose answers to show.")],
    limit: Annotated[int, typer.Option(help="Show at most this many of the latest answers.", min=1)] = 20,
    json_output: Annotated[bool, typer.Option("--json", help="Print the records as JSON lines.")] = False,
    audit_log: Annotated[
        Path | None, typer.Option(help="Audit log file. Default: serve.audit_log, else <workspace>/audit/audit.jsonl.")
    ] = None,
) -> None:
    """Show what a customer was shown and why: the audit records of their answers, oldest first.

    Records are keyed by a pseudonym (a keyed hash of the customer id); the key file next to the log
    turns the id into the pseudonym. Without that key no record can be found.
    """
    from finrec.serving.audit import read_existing_key, read_records

    settings = _settings(ctx)
    path, key_path = settings.serve.audit_paths(settings.workspace)
    if audit_log is not None:
        path, key_path = audit_log, settings.serve.audit_key_file or audit_log.with_name("audit.key")
    key = read_existing_key(path, key_path)
    result = read_records(path, key, user.strip(), limit)
    if json_output:
        for r in result.records:
            out.print_json(json.dumps(r))
        return
    if not result.records:
        out.print(f"no answers recorded for customer {user!r} in {path}")
    for r in result.records:
        request = r.get("request_id") or r.get("request")  # older logs: the id; now its keyed hash
        table = Table(title=f"{r.get('time')}  request {request}  model {r.get('model_version')}"
                            f"{'  arm ' + str(r['arm']) if r.get('arm') else ''}", title_justify="left")  # fmt: skip
        for col in ("rank", "product", "score", "reasons"):
            table.add_column(col)
        for it in r.get("items", []):
            table.add_row(str(it.get("rank")), str(it.get("product_id")), f"{it.get('score', 0):.4f}",
                          ", ".join(it.get("reasons", [])))  # fmt: skip
        out.print(table)
        removed = {k: v for k, v in (r.get("excluded") or {}).items() if v}
        out.print("removed before scoring: " + (", ".join(f"{k} {v}" for k, v in removed.items()) or "none"))
    if result.skipped_lines:
        err.print(f"[yellow]warning[/]: {result.skipped_lines} unreadable line(s) skipped in {path}")



# -- monitor ----------------------------------------------------------------------------------


@app.command()
def monitor(
    ctx: typer.Context,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Folder to write index.html and monitor.json to (created).")
    ],
    model_dir: Annotated[
        Path | None,
        typer.Option("--model-dir", "-m", help="Model bundle whose drift to check against its training reference. "
                     "Default: serve.model_dir; without a bundle the report says drift is not available."),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option("--data", "-d", help="Dataset with the customers (fairness groups) and the catalogue (coverage); "
                     "also the current data of the drift check. Default: serve.data, else the model's training data."),
    ] = None,
    event_store: Annotated[
        str | None,
        typer.Option(help="Event store URL (sqlite:///path, redis://host:6379/0). "
                     "Default: serve.event_store, else sqlite:///<workspace>/events.db."),
    ] = None,
    audit_log: Annotated[
        Path | None,
        typer.Option(help="The service's audit log; its key audit.key sits next to it (or serve.audit_key_file). "
                     "Default: serve.audit_log, else <workspace>/audit/audit.jsonl."),
    ] = None,
    full: Annotated[
        bool,
        typer.Option("--full", help="Read both stores whole instead of the monitoring roll-up (the workspace's "
                     "monitoring/rollup.db, brought up to date first): slower, grows with history; for a check."),
    ] = False,
) -> None:
    """Monitoring report of the live service: conversion, guardrail health, fairness, drift and alerts.

    Folds what is new in the event store and the audit log of a service (`finrec serve`) into the monitoring
    roll-up (events joined to the answers they came from), then writes OUTPUT/index.html (self-contained:
    plots inline) and OUTPUT/monitor.json from its aggregates, with the scheduled jobs' latest runs. The same
    page is served live at /dashboard. See docs/monitoring.md.
    """
    from finrec.monitoring.report import build_monitor_report, optional_drift, render_html, stored_alerts
    from finrec.serving.audit import read_existing_key

    settings = _settings(ctx)
    srv = settings.serve
    audit_path, key_path = srv.audit_paths(settings.workspace)
    if audit_log is not None:
        audit_path, key_path = audit_log, srv.audit_key_file or audit_log.with_name("audit.key")
    key = read_existing_key(audit_path, key_path)
    model_dir = model_dir or srv.model_dir
    data_dir = data or srv.data or _trained_on(model_dir)
    dataset = None
    if data_dir is not None:
        from finrec.data.dataset import load_dataset

        dataset = load_dataset(data_dir, future_tolerance_seconds=settings.validation.future_tolerance_seconds)
    else:
        err.print("[yellow]warning[/]: no dataset (pass --data): fairness and catalogue coverage are skipped")
    store_url = event_store or srv.event_store_url(settings.workspace)
    store = _open_events_for_reading(store_url)
    drift = optional_drift(model_dir, data_dir, settings)
    alerts, alerts_note = stored_alerts(settings)
    try:
        report = (build_monitor_report(store, audit_path, key, dataset, settings, drift, alerts) if full
                  else _rollup_report(settings, store, store_url, audit_path, key, dataset, drift, alerts))  # fmt: skip
    except Exception as exc:
        if isinstance(exc, FinrecError) or not _is_store_error(exc):
            raise
        raise FinrecError(f"cannot read the event store: {type(exc).__name__}: {exc}",
                          hint="check the --event-store URL and that the store is reachable") from None  # fmt: skip
    finally:
        store.close()
    if alerts_note:
        report["notes"].append(alerts_note)
    output.mkdir(parents=True, exist_ok=True)
    (output / "monitor.json").write_text(json.dumps(report, indent=1, allow_nan=False))
    (output / "index.html").write_text(render_html(report), encoding="utf-8")
    _print_monitor_summary(report)
    out.print(f"[green]wrote[/] {output / 'index.html'} and {output / 'monitor.json'}")


def _rollup_report(settings: Any, store: Any, store_url: str, audit_path: Path, key: bytes, dataset: Any,
                   drift: dict[str, Any], alerts: list[dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
    """The report from the workspace's roll-up, folding in what is new when no scheduler is folding it now."""
    from finrec.jobs.history import read_history
    from finrec.jobs.locks import open_job_lock, wait_free
    from finrec.monitoring.report import build_rollup_report
    from finrec.monitoring.rollup import MonitoringRollup, rollup_path, sources_of

    s = settings.schedule
    lock = open_job_lock(s.lock, settings.workspace, settings.serve.event_store, s.lock_seconds)
    rollup = MonitoringRollup(rollup_path(settings.workspace), key,
                              retention_seconds=settings.serve.request_id_max_age_days * 86_400,
                              sources=sources_of(store_url, audit_path))  # fmt: skip
    try:
        lease, update = wait_free(lock, "rollup", timeout=120), None
        if lease is not None:
            with lease:
                update = rollup.update(store, audit_path)
        else:
            err.print("[yellow]warning[/]: another runner is folding the roll-up; the report may miss the newest "
                      "records")  # fmt: skip
        return build_rollup_report(rollup, dataset, settings, drift, alerts, read_history(settings.workspace),
                                   update)  # fmt: skip
    finally:
        rollup.close()


def _trained_on(model_dir: Path | None) -> Path | None:
    if model_dir is None:
        return None
    from finrec.artifacts import read_manifest

    data = read_manifest(model_dir).get("inputs", {}).get("data")
    return Path(data) if data and Path(data).is_dir() else None


def _print_monitor_summary(report: dict[str, Any]) -> None:
    from finrec.monitoring.conversion import RATES, label

    conv = report["conversion"]
    table = Table(title=f"conversion per impression ({conv['confidence']:.0%} Wilson interval)", title_justify="left")
    for col in ("model version / arm", "impressions", *(r.replace("_", " ") for r in RATES)):
        table.add_column(col, justify="left" if col.startswith("model") else "right")
    for r in conv["totals"]:
        cells = [f"{r[n]['rate']:.2%} [{r[n]['low']:.2%}, {r[n]['high']:.2%}]" if r[n]["rate"] is not None else "—"
                 for n in RATES]  # fmt: skip
        table.add_row(label(r["model_version"], r["arm"]), f"{r['impressions']:,}", *cells)
    out.print(table if conv["totals"] else "conversion: no funnel events in the event store yet")
    h = report["health"]
    if h["answers"]:
        pct = lambda v: "—" if v is None else f"{v:.1%}"  # noqa: E731
        out.print(f"answers: {h['answers']:,}; empty {pct(h['empty']['rate'])}, short {pct(h['short']['rate'])}; "
                  f"catalogue coverage {pct(h['coverage']['coverage'])}")  # fmt: skip
    drift = report.get("drift") or {}
    if drift.get("available") is False:
        out.print(f"drift: not available ({drift.get('reason')})")
    else:
        out.print("drift: " + ("[red]alert[/] " + ", ".join(drift.get("drifted") or []) if drift.get("alert")
                               else "no alert"))  # fmt: skip
    out.print(f"stored alerts: {len(report['alerts'])}")
    flagged = (report.get("fairness") or {}).get("flagged") or []
    out.print("fairness: " + ("[red]flagged[/] " + "; ".join(flagged) if flagged else "nothing flagged"))


@app.command()
def keygen(
    name: Annotated[str, typer.Option(help="The key's name, as logged and recorded.")] = "my-client",
    scope: Annotated[
        list[str] | None, typer.Option("--scope", "-s", help="A scope of the key; repeat for several. Default: "
                                       "recommend.")
    ] = None,
) -> None:
    """Make a random API key: prints the key (give it to the caller) and the \\[\\[auth.keys]] table with its SHA-256
    (put that in the settings file; the key itself never goes there)."""
    from finrec.config import SCOPES
    from finrec.serving.auth import hash_key, new_key

    scopes = scope or ["recommend"]
    bad = [s for s in scopes if s not in SCOPES]
    if bad:
        raise FinrecError(f"unknown scope {', '.join(bad)}", hint=f"scopes: {', '.join(SCOPES)}")
    key = new_key()
    out.print(f"key (give it to {name}; it is shown once):\n  {key}\n")
    out.print("settings (finrec.toml):", markup=False)
    out.print(f'[[auth.keys]]\nname = "{name}"\nscopes = {json.dumps(scopes)}\nsha256 = "{hash_key(key)}"',
              markup=False, highlight=False)  # fmt: skip


# -- demo -------------------------------------------------------------------------------------


@app.command()
def demo(
    ctx: typer.Context,
    workspace: Annotated[
        Path | None, typer.Option(help="Folder for the demo's data (and later models). Default: settings.workspace.")
    ] = None,
    regenerate: Annotated[bool, typer.Option(help="Generate the world again even if it already exists.")] = False,
    serve_api: Annotated[
        bool, typer.Option("--serve/--no-serve", help="Serve the API at the end (until Ctrl-C).")
    ] = True,
    quick_start: Annotated[
        bool, typer.Option("--quick-start/--no-quick-start", help="Answer within a minute of the data: serve a "
                           "popularity model (same guardrails and reasons) from the workspace's registry while the "
                           "two-stage model trains beside the API, then promote it (the service switches without a "
                           "restart) and evaluate it. --no-quick-start: serve once the two-stage model is trained.")
    ] = True,
    evaluate_first: Annotated[
        bool, typer.Option("--evaluate-first", help="Train, run the offline evaluation, then serve (the order before "
                           "quick start; the first answer comes minutes later).")
    ] = False,
) -> None:
    """Run the main job on embedded defaults: synthetic world, validation, training, the API, evaluation.

    Writes the world, the model bundle and the evaluation report (JSON and HTML) under the workspace and
    serves the API on http://127.0.0.1:8000 (Swagger UI at /docs) until Ctrl-C. By default the API answers
    as soon as a popularity model is trained (about a minute); the two-stage model trains beside it, takes
    over when ready (promoted in <workspace>/registry; the demo says when), and is then evaluated in a
    process of lower priority. --no-serve: train, evaluate, stop.
    """
    from finrec.artifacts import read_manifest
    from finrec.data.synthetic.generate import WorldConfig, generate_world

    settings = _settings(ctx)
    ws = workspace or settings.workspace
    settings = settings.model_copy(update={"workspace": ws})  # the service's audit log and events go there too
    ctx.obj["settings"] = settings
    if serve_api:
        _free_port(settings.serve.host, settings.serve.port)  # fail now, not after training
    data = ws / "data"
    g = settings.generate
    cfg = WorldConfig(
        users=g.users, products=g.products, months=g.months, seed=g.seed, start=g.start,
        sessions_per_month=g.sessions_per_month, slate_size=g.slate_size,
    )  # fmt: skip
    reuse = False
    if data.is_dir() and not regenerate:
        try:
            reuse = read_manifest(data, "dataset")["config"]["generator"] == asdict(cfg)
        except (FinrecError, KeyError):
            reuse = False
    out.rule("[bold]1. synthetic world")
    if reuse:
        out.print(f"reusing {data} (same settings; --regenerate to rebuild)")
    else:
        summary = generate_world(cfg, data, overwrite=True, progress=True)
        _print_counts(summary.counts, f"Generated {data} in {summary.seconds:.1f} s")
    out.rule("[bold]2. validation")
    _validate_or_exit(ctx, data, quiet=True)
    model_dir, report = ws / "model", ws / "report.json"
    srv = settings.serve
    url = f"http://{srv.host}:{srv.port}"
    if serve_api and quick_start and not evaluate_first:
        # The first answer comes from a popularity model (a minute to train; the same guardrails and reasons), served
        # from the registry; the two-stage model trains beside the API and is promoted when ready: the service
        # follows the registry's champion without a restart.
        from finrec.cli._beside import TrainBeside, serve_stand_in

        out.rule("[bold]3. a popularity model to answer now; the two-stage model trains beside the API")
        stand_in = ws / "popularity-model"
        ctx.obj["settings"] = settings.model_copy(update={"train": settings.train.model_copy(update={"model":
                                                                                                   "popularity"})})
        try:
            ctx.invoke(train, ctx=ctx, data=data, model_dir=stand_in)
        finally:
            ctx.obj["settings"] = settings
        serve_stand_in(settings, stand_in)
        out.rule("[bold]4. API (popularity until the two-stage model takes over; then its offline evaluation)")
        out.print(f"Swagger UI: {url}/docs (Authorize with the key below)   stop: Ctrl-C")
        beside = TrainBeside(ctx.obj["config_file"], settings, data, model_dir, report, url)
        try:
            ctx.invoke(serve, ctx=ctx, model_dir=None, data=data, host=None, port=None, workers=None,
                       clock=None, clock_speed=None, access_log=False, no_auth=False)  # fmt: skip
        finally:
            beside.stop()
        return
    out.rule("[bold]3. training")
    ctx.invoke(train, ctx=ctx, data=data, model_dir=model_dir)
    if evaluate_first or not serve_api:
        out.rule("[bold]4. offline evaluation")
        ctx.invoke(evaluate, ctx=ctx, model_dir=model_dir, data=data, output=report, ground_truth=None)
    if not serve_api:
        out.print(f"done; serve the model with: finrec serve --model-dir {model_dir} --data {data}")
        return
    out.rule("[bold]4. API" if evaluate_first else "[bold]4. API, with the offline evaluation beside it")
    out.print(f"Swagger UI: {url}/docs (Authorize with the key below)   stop: Ctrl-C")
    from finrec.cli._beside import EvaluateBeside

    beside_eval = None if evaluate_first else EvaluateBeside(ctx.obj["config_file"], model_dir, data, report, url)
    try:
        ctx.invoke(serve, ctx=ctx, model_dir=model_dir, data=data, host=None, port=None, workers=None,
                   clock=None, clock_speed=None, access_log=False, no_auth=False)  # fmt: skip
    finally:
        if beside_eval is not None:
            beside_eval.stop()


def main() -> None:
    """Entry point: run the app, turning user-fixable problems into a message and an exit code."""
    try:
        app()
    except DataValidationError as exc:
        exc.report.render(out)  # the same report `finrec validate` prints
        err.print(f"[bold red]error:[/] {escape(exc.message)}")
        if exc.hint:
            err.print(f"[dim]hint:[/] {escape(exc.hint)}")
        sys.exit(exc.exit_code)
    except FinrecError as exc:
        err.print(f"[bold red]error:[/] {escape(exc.message)}")
        if exc.hint:
            err.print(f"[dim]hint:[/] {escape(exc.hint)}")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("[red]interrupted[/]")
        sys.exit(130)
    except Exception as exc:
        from finrec.engine.spark import spark_failure

        failure = spark_failure(exc)  # a job that died inside Spark (its JVM's log says why)
        if failure is None:
            raise
        err.print(f"[bold red]error:[/] {escape(failure.message)}")
        err.print(f"[dim]hint:[/] {escape(failure.hint or '')}")
        sys.exit(failure.exit_code)


if __name__ == "__main__":  # pragma: no cover
    main()
