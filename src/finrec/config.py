"""Settings: embedded defaults, then a TOML file, then ``FINREC_*`` variables.

Precedence, highest first: values passed in code (CLI flags), environment
variables (``FINREC_EVENTS__GRADES__APPLY=3``; nested keys joined by ``__``),
the TOML file (``--config``, else ``$FINREC_CONFIG``, else ``./finrec.toml`` if
it exists), the defaults below. Unknown keys are rejected so a typo never goes
unnoticed. Settings are read at the edges (CLI, app factory) and handed down as
plain values; library code never reads the environment.

Examples
--------
>>> s = load_settings()
>>> s.events.grades["approve"] > s.events.grades["click"]
True
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from finrec.data.contract import EVENT_TYPES
from finrec.errors import ConfigError

DEFAULT_CONFIG_FILE = "finrec.toml"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


DEFAULT_GRADES = {"impression": 0, "view": 1, "click": 2, "apply": 3, "decline": 3, "approve": 4, "hold": 4, "close": 0}


class EventSettings(_Section):
    """How events are read as relevance."""

    grades: dict[str, int] = Field(
        default_factory=lambda: dict(DEFAULT_GRADES),
        description="Relevance grade of each event type (a user-product pair takes its highest grade). "
        "Types left out keep their default grade.",
    )

    @field_validator("grades", mode="before")
    @classmethod
    def _merge_defaults(cls, v: Any) -> Any:
        # One key from a FINREC_EVENTS__GRADES__VIEW variable or a file must not drop the others.
        return {**DEFAULT_GRADES, **v} if isinstance(v, dict) else v

    @field_validator("grades")
    @classmethod
    def _known_types(cls, v: dict[str, int]) -> dict[str, int]:
        unknown = sorted(set(v) - set(EVENT_TYPES))
        if unknown:
            raise ValueError(f"unknown event types {unknown}; known: {list(EVENT_TYPES)}")
        if any(g < 0 for g in v.values()):
            raise ValueError("grades must be >= 0")
        return v

    durability: Literal["process", "power"] = Field(
        "process",
        description="When POST /events answers, its events survive: `process` (a kill of the service: SQLite "
        "synchronous=NORMAL; Redis as configured) or `power` (a power loss or an OS crash too: SQLite "
        "synchronous=FULL, an fsync per batch; a Redis event store is refused unless the server runs with "
        "`appendonly yes` and `appendfsync always`). See docs/security.md for the measured cost.",
    )


class EngineSettings(_Section):
    """Which engine runs the offline stages: embedded DuckDB (one machine) or Apache Spark (a cluster)."""

    name: Literal["duckdb", "spark"] = Field(
        "duckdb", description="`duckdb` (default): embedded, one machine, no server. `spark`: Apache Spark, for "
        "customer bases one machine cannot hold (`pip install 'finrec[spark]'` and Java 17).",
    )
    spark_master: str = Field(
        "local[2]", description="Spark master URL: local[N] on this machine, or the cluster's (yarn, "
        "spark://host:7077, k8s://...). Ignored under spark-submit or Databricks, whose session is used.",
    )
    spark_driver_memory: str = Field("4g", description="Memory of the Spark driver (spark.driver.memory).")
    spark_partitions: int = Field(
        200, ge=1, le=100_000, description="Partitions of shuffles (spark.sql.shuffle.partitions) in a session "
        "finrec starts: Spark's own default, which adaptive execution merges when they are small. finrec raises it "
        "(never lowers it) to one partition per `spark_events_per_partition` events when the log is larger.",
    )
    spark_events_per_partition: int = Field(
        500_000, ge=1_000, le=100_000_000, description="Events of the log one partition holds at most: the typed "
        "log and every shuffle after it get at least events / this many partitions (a 4 GB driver in local[2] "
        "held 650,000 and ran out of heap at 1.3M). Lower it when tasks run out of memory.",
    )
    sample_customers: int = Field(
        1_000_000, ge=1_000, description="With spark, `finrec train` and `finrec evaluate` run on this many "
        "customers at most, taken whole by a seeded hash of their id; every customer still counts in the "
        "catalogue's statistics (demand, conversion, holders) and in the candidate sources at recommendation.",
    )
    spark_conf: dict[str, str] = Field(
        default_factory=dict, description="Further Spark settings, e.g. {\"spark.executor.memory\" = \"8g\"}.",
    )


class ValidationSettings(_Section):
    """Tolerances of `finrec validate`."""

    future_tolerance_seconds: int = Field(
        300, ge=0, description="Timestamps up to this far past the current time are accepted (clock skew)."
    )
    max_examples: int = Field(5, ge=1, le=100, description="Example rows shown per problem.")


class GenerateSettings(_Section):
    """Defaults of `finrec generate` (each is also a flag)."""

    users: int = Field(
        200_000,
        ge=1,
        description="Number of customers. 200k gives the demo's evaluation the power to separate two-stage from "
        "two-tower with non-overlapping intervals (at 20k their difference is within noise).",
    )
    products: int = Field(300, ge=10, description="Number of products (at least one per category).")
    months: int = Field(12, ge=1, le=120, description="Months of funnel events.")
    seed: int = Field(7, description="Random seed; the same seed gives byte-identical tables.")
    start: str = Field("2024-01-01", description="First day of the simulated period (YYYY-MM-DD).")
    sessions_per_month: float = Field(0.7, gt=0, description="Mean recommendation sessions per customer per month.")
    slate_size: int = Field(5, ge=1, le=20, description="Products shown per session.")


class RulesSettings(_Section):
    """Hard rules applied before any scoring."""

    suitability_categories: list[str] | None = Field(
        default_factory=lambda: ["investment_fund", "pension"],
        description="Product categories whose risk_level must not exceed the customer's risk_tolerance "
        "(null: every product with a risk level).",
    )
    max_risk_above_tolerance: int = Field(0, ge=0, le=4, description="Risk levels above tolerance still suitable.")


class TrainSettings(_Section):
    """`finrec train`: temporal split, retrieval, ranking."""

    model: Literal["two_stage", "popularity"] = Field(
        "two_stage",
        description="`two_stage`: two-tower retrieval, then the LightGBM ranker. `popularity`: the most engaged-with "
        "allowed products, with the same guardrails and approval odds: a baseline to A/B test against.",
    )
    validation: Literal["auto", "temporal", "holdout"] = Field(
        "auto",
        description="How the model is validated while choosing what serves, when the data has no impressions "
        "(with impressions the ranker window is used). `temporal`: learn before a cutoff, answer with what "
        "customers newly took after it; `holdout`: hide 20% of each customer's products; `auto`: temporal when "
        "at least 50 customers took new products after the cutoff, else holdout. The plan is printed and kept "
        "in the bundle's manifest.",
    )
    sources: list[Literal["popularity", "recent", "additions", "segment", "item_cf", "transitions"]] = Field(
        default_factory=lambda: ["popularity", "recent", "additions", "segment", "item_cf", "transitions"],  # type: ignore[arg-type]
        description="Candidate sources besides the two-tower: `popularity` (all time), `recent` (last 90 days), "
        "`additions` (what customers add to what they have), `segment` (popularity within the best categorical "
        "customer column), `item_cf` (EASE up to `max_ease_products` products, cosine item-kNN above), "
        "`transitions` (customers who have X add Y next). Each one's score and rank are ranker features.",
    )
    serve: Literal["auto", "stack"] = Field(
        "auto",
        description="What the bundle serves. `auto`: the simplest of popularity, each source, the two-tower and the "
        "stack whose validation NDCG@10 is within one standard error of the best (the two-tower and the stack count "
        "as equally simple; never worse than popularity). "
        "`stack`: the ranker over every source's candidates, whatever validation says (the table is still kept).",
    )
    max_ease_products: int = Field(
        20_000, ge=2, le=20_000, description="Largest catalogue for EASE (a dense products x products inverse)."
    )
    eval_days: float = Field(60, gt=0, description="Length of the held-out evaluation window (days).")
    label_days: float = Field(60, gt=0, description="Length of each training label window (days).")
    max_retrieval_windows: int = Field(4, ge=1, le=24, description="Label windows the retriever learns from.")
    n_candidates: int = Field(100, ge=1, le=5000, description="Candidates retrieved per customer for the ranker.")
    history_length: int = Field(20, ge=1, le=200, description="Recent products in the user tower's history.")
    retrieval_min_grade: int = Field(2, ge=1, description="Lowest grade that is a positive for retrieval.")
    max_ranker_queries: int = Field(
        120_000, ge=100, description="Customer-windows sampled to train the ranker (over every ranker window)."
    )
    ranker_windows: int = Field(
        3,
        ge=1,
        le=6,
        description="Time windows the ranker learns from on temporal data, the latest first, each with features at "
        "its own cutoff (with impressions: what was shown in each; without: what customers newly took), as far as "
        "the data has customers coming back; max_ranker_queries is the budget over all of them.",
    )
    refit_two_tower: bool = Field(
        True,
        description="With impressions: after validation, train the served two-tower again on windows that include "
        "the latest one (the ranker's), for the epochs early stopping chose; false keeps the validated towers.",
    )
    max_retrieval_pairs: int = Field(
        400_000, ge=1_000, description="Positive pairs the two-tower learns from at most (a seeded sample above)."
    )
    two_tower_workers: int = Field(
        1,
        ge=1,
        le=64,
        description="Processes the two-tower trains in, data-parallel (each embeds its share of every batch; the "
        "softmax still runs over the whole batch; gradients summed with gloo). Each process runs torch on one "
        "thread, so up to the machine's cores this divides the two-tower's time. Part of the model's definition "
        "(recorded in the bundle): the same seed and workers give the same weights; other workers, the same model "
        "up to float rounding. Each process holds the training pairs' tensors (bounded by max_retrieval_pairs).",
    )
    two_tower_launcher: Literal["local", "spark"] = Field(
        "local",
        description="What starts the two-tower's processes when two_tower_workers > 1: `local` spawns them on "
        "this machine; `spark` asks Spark's TorchDistributor (needs `finrec[spark]` and Java; local mode: on the "
        "driver, where the training sample is). Both give the same weights.",
    )
    max_ranker_rows: int = Field(
        2_000_000,
        ge=1_000,
        description="Rows of the ranker's training table at most, over every ranker window and the guard's refit: "
        "whole customers are sampled (seeded) to fit, so its memory follows this budget, not the customer count "
        "(at about 0.5 KB a row). Under it, max_ranker_queries alone decides.",
    )
    max_approval_applications: int = Field(
        500_000, ge=1_000, description="Decided applications the approval odds learn from at most (a seeded sample "
        "above, in time order)."
    )
    ranker_rows: Literal["shown", "retrieved"] = Field(
        "shown",
        description="Ranker training rows: `shown` = what each customer was shown in the window (learns preference "
        "given exposure, position-debiased); `retrieved` = the retriever's top candidates, unshown ones as "
        "negatives (also learns what the past policy exposed).",
    )
    ranker_negatives: int = Field(50, ge=1, le=5000, description="Unlabelled candidates per customer (`retrieved`).")
    ranker_min_grade: int = Field(
        2,
        ge=0,
        description="Ranker labels below this grade count as 'shown and ignored' (0). Default 2 (click): a view "
        "mostly says where an offer sat on the page, not whether the customer wanted it; 1 keeps views.",
    )
    position_debias: bool = Field(
        False, description="Let LightGBM's unbiased lambdarank learn and remove position bias from the labels."
    )
    demote_below: float = Field(0.2, ge=0, le=1, description="Approval odds below which a product is demoted.")
    index: Literal["exact", "hnsw", "ivf"] = Field("exact", description="Candidate index (ANN for big catalogues).")
    embedding_dim: int = Field(32, ge=4, le=512)
    max_epochs: int = Field(40, ge=1, le=500)
    seed: int = 0


class EvaluateSettings(_Section):
    """`finrec evaluate`."""

    k: int = Field(10, ge=1, le=100, description="Cut-off of NDCG, MAP and hit rate.")
    min_grade: int = Field(2, ge=1, description="Lowest grade counted as relevant (2 = click).")
    bootstrap: int = Field(1000, ge=100, le=100_000, description="Bootstrap resamples for confidence intervals.")
    max_users: int = Field(100_000, ge=100, description="Evaluation customers sampled at most.")


class ServeSettings(_Section):
    """`finrec serve`: the online API, its guardrails, audit log and event store."""

    host: str = Field("127.0.0.1", description="Interface to listen on (0.0.0.0 for every interface).")
    port: int = Field(8000, ge=1, le=65535, description="TCP port.")
    workers: int = Field(1, ge=1, le=64, description="Server processes (each loads the model).")
    keep_alive_seconds: float = Field(
        75,
        gt=0,
        le=3600,
        description="How long an idle keep-alive connection stays open. Keep it longer than the idle timeout of "
        "any client or proxy in front (httpx 5 s, AWS ALB 60 s): the side that closes first must be the caller, or a "
        "request sent on a connection the server is closing at that moment is reset.",
    )
    model_dir: Path | None = Field(None, description="Model bundle to serve (`finrec serve --model-dir`).")
    data: Path | None = Field(
        None,
        description="Dataset with the customers and products to serve (default: the one the model was trained on).",
    )
    clock: Literal["wall", "data"] = Field(
        "wall",
        description="`wall`: the machine's clock. `data`: time continues from the end of the data (replaying a "
        "synthetic world: cooling-off, frequency caps and launch dates then apply to its events).",
    )
    clock_speed: float = Field(
        1.0,
        ge=1,
        le=1_000_000,
        description="Data clock only: data seconds per wall second (1440 = a day a minute), for closed-loop "
        "simulations that must live through days of feedback, cooling-off and drift in minutes.",
    )
    api_key: SecretStr | None = Field(
        None,
        description="A key with every scope, named `admin` (header X-API-Key), at least 32 characters; from the "
        "environment only (FINREC_SERVE__API_KEY), never from a file. Prefer named keys in [[auth.keys]].",
    )
    cooling_off_days: float = Field(30, ge=0, description="Days after a decline during which a product is not shown.")
    frequency_cap: int = Field(
        3, ge=0, description="Impressions of one product within the window after which it is rested (0: no cap)."
    )
    frequency_window_days: float = Field(7, gt=0, description="Window of the frequency cap (days).")
    require_marketing_consent: bool = Field(
        False, description="Treat unknown marketing consent as an opt-out (an explicit opt-out always is)."
    )
    max_reasons: int = Field(3, ge=0, le=10, description="Model reasons given per item (rule reasons are added).")
    audit_log: Path | None = Field(None, description="Audit log file (default: <workspace>/audit/audit.jsonl).")
    audit_key_file: Path | None = Field(
        None, description="Key of the customer pseudonyms in the audit log (default: <workspace>/audit/audit.key; "
        "created when missing; keep it secret and keep it: without it old records cannot be looked up)."
    )
    event_store: str | None = Field(
        None, description="Where accepted events go: `sqlite:///path/events.db` (default: <workspace>/events.db), "
        "`redis://host:6379/0` (shared by every worker and replica) or `memory://` (lost on exit)."
    )
    online_store: str = Field(
        "memory://",
        description="Online features (recent events per customer, live product counts): `memory://` (this process; "
        "rebuilt from the event store at start-up), `sqlite:///path.db` (one host) or `redis://host:6379/0` "
        "(shared by every worker and replica: a decline posted to one is seen by all).",
    )
    customer_features: str | None = Field(
        None,
        description="Read each customer's features per request from Redis, where `finrec materialize` wrote them "
        "(`redis://host:6379/0`, optionally `?prefix=name`): a worker then loads no customer at start-up (the "
        "catalogue, rules, model and index only), so replicas start in the same time and memory for any number "
        "of customers. Unset: every worker builds the customers' snapshot from --data.",
    )
    max_events_per_request: int = Field(1000, ge=1, le=100_000, description="Largest POST /events batch.")
    max_body_bytes: int = Field(
        1_048_576,
        ge=1024,
        le=1_073_741_824,
        description="Largest request body in bytes (413 beyond it, before it is parsed). Raise it together with "
        "max_events_per_request: an event takes about 250 bytes.",
    )
    request_id_max_age_days: float = Field(
        7,
        gt=0,
        description="Customer-side events (impression, view, click, apply) must name the request_id of an answer "
        "this service gave the same customer at most this long ago (service clock).",
    )
    request_key_file: Path | None = Field(
        None,
        description="Key that signs the request_ids of answers, so that events can prove which answer they follow "
        "(default: <workspace>/secrets/request.key; created with mode 0600; share it between hosts).",
    )
    models_root: Path | None = Field(
        None,
        description="POST /admin/reload loads bundles only from under this folder (default: the folder holding "
        "the bundle served at start-up).",
    )
    store_timeout_seconds: float = Field(
        2.0,
        gt=0,
        le=60,
        description="Longest wait of one store call (a Redis command, a SQLite lock) before the request answers "
        "503 with Retry-After.",
    )
    breaker_failures: int = Field(
        3, ge=1, le=1000, description="Consecutive failures of a store after which calls to it fail fast (503)."
    )
    breaker_reset_seconds: float = Field(
        5.0, gt=0, le=3600, description="How long a tripped store is left alone before one call tries it again."
    )
    catch_up_seconds: float = Field(
        1.0,
        gt=0,
        le=3600,
        description="How often each worker applies events from the event log that its online store has not seen "
        "yet (after an outage of the online store, or events another worker took with a memory:// store).",
    )

    def audit_paths(self, workspace: Path) -> tuple[Path, Path]:
        audit = self.audit_log or workspace / "audit" / "audit.jsonl"
        return audit, self.audit_key_file or audit.with_name("audit.key")

    def request_key_path(self, workspace: Path) -> Path:
        return self.request_key_file or workspace / "secrets" / "request.key"

    def event_store_url(self, workspace: Path) -> str:
        return self.event_store or f"sqlite:///{(workspace / 'events.db').resolve()}"


SCOPES: tuple[str, ...] = ("recommend", "recommend:explain", "events", "events:trusted", "monitor", "admin")


class KeySettings(_Section):
    """One API key: its name, what it may do, and where the service finds it (its hash, or the key itself in an
    environment variable or a file; never the key in the settings file)."""

    name: str = Field(
        ..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="Who holds the key; logged and recorded."
    )
    scopes: list[Literal["recommend", "recommend:explain", "events", "events:trusted", "monitor", "admin"]] = Field(
        ..., min_length=1, description="What the key may do (docs/security.md): " + ", ".join(SCOPES) + "."
    )
    sha256: str | None = Field(
        None, pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the key, as hex (`finrec keygen` prints both)."
    )
    env: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$", description="Environment variable holding the key itself."
    )
    file: Path | None = Field(
        None, description="File holding the key itself (one line; must not be readable by other users)."
    )
    rate_per_second: float | None = Field(
        100.0, gt=0, description="Requests per second this key may make, per worker (null: no limit)."
    )
    burst: int = Field(200, ge=1, description="Requests a key may make at once before its rate applies.")

    @model_validator(mode="after")
    def _one_source(self) -> KeySettings:
        given = [k for k in ("sha256", "env", "file") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"key {self.name!r} needs exactly one of sha256, env, file (got {given or 'none'})")
        return self


class AuthSettings(_Section):
    """Who may call the API: named keys with scopes (header X-API-Key). See docs/security.md."""

    keys: list[KeySettings] = Field(
        default_factory=list, description="API keys (TOML `[[auth.keys]]` tables): name, scopes, and one of "
        "sha256, env, file. With none (and no serve.api_key) `finrec serve` on a loopback address makes a "
        "development key; elsewhere it refuses to start.",
    )
    disabled: bool = Field(
        False,
        description="No authentication: every caller has every scope. Only with `finrec serve --no-auth`, on a "
        "loopback address, for development; logged loudly.",
    )
    dev_key_file: Path | None = Field(
        None, description="Where the development key is kept (default: <workspace>/secrets/dev-api-key)."
    )

    @field_validator("keys")
    @classmethod
    def _unique(cls, v: list[KeySettings]) -> list[KeySettings]:
        names = [k.name for k in v]
        if len(set(names)) != len(names):
            raise ValueError(f"key names must be unique (got {names})")
        return v


class MonitorSettings(_Section):
    """`finrec monitor` and the `/dashboard` page: conversion, drift, guardrail health, fairness."""

    bucket: Literal["hour", "day", "week"] = Field("day", description="Time bucket of the conversion curves.")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="Level of the confidence intervals.")
    psi_threshold: float = Field(
        0.2, gt=0, description="Population stability index above which a feature (or the score) has drifted."
    )
    ks_threshold: float = Field(
        0.1, gt=0, lt=1, description="Kolmogorov-Smirnov statistic above which a feature (or the score) has drifted."
    )
    drift_sample_users: int = Field(
        5000, ge=100, description="Customers sampled for the drift reference and for each drift check."
    )
    fairness_min_ratio: float = Field(
        0.8, gt=0, le=1, description="Adverse impact ratio (lowest group rate / highest) below which a disparity "
        "is flagged (the four-fifths rule)."
    )
    fairness_alpha: float = Field(0.05, gt=0, lt=1, description="Significance level of the fairness tests.")
    min_group_size: int = Field(30, ge=1, description="Groups smaller than this are reported but not tested.")
    min_reported_group_size: int = Field(
        20,
        ge=1,
        description="Fairness cells of groups with fewer customers than this are suppressed on /dashboard and in its "
        "JSON (no counts or rates), so that no small group's numbers single out a customer.",
    )


class RegistrySettings(_Section):
    """The model registry: versions of one model under `<root>/<name>/<version>/` and the aliases that pick them."""

    root: Path | None = Field(
        None, description="Registry folder (local or shared storage). Default: <workspace>/registry."
    )
    name: str = Field(
        "finrec", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="Name of the registered model."
    )
    gate_metric: str = Field(
        "auto",
        pattern=r"^(auto|(ndcg|map|hit_rate|recall|true_conversion)@[0-9]+|mrr)$",
        description="Offline metric of the promotion gate (higher is better), compared on the same evaluation data "
        "and window for challenger and champion: `auto` (ground-truth true_conversion@K on a synthetic world, "
        "else ndcg@K), or ndcg@K, map@K, hit_rate@K, recall@K, true_conversion@K, mrr. Logged metrics favour the "
        "model whose answers produced the logs.",
    )
    max_regression: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Relative drop of the gate metric a challenger may show and still be promoted "
        "(0.01 = 1% worse is tolerated as noise). Worse than that is refused unless forced.",
    )
    poll_seconds: float = Field(
        2.0, gt=0, le=3600, description="How often a serving process checks the registry's aliases for changes."
    )

    def path(self, workspace: Path) -> Path:
        return self.root or workspace / "registry"


class RetrainSettings(_Section):
    """`finrec retrain`: the feedback since the last training, a new model on it, registered as challenger."""

    min_new_events: int = Field(100, ge=1, description="Fewer new events than this: nothing to retrain on yet.")
    eval_days: float | None = Field(
        None, gt=0, description="Held-out window of the retrained model (days; default: [train] eval_days). "
        "Shorter than [train]'s when retraining often on a few days of feedback.",
    )
    label_days: float | None = Field(
        None, gt=0, description="Label window of the retrained model (days; default: [train] label_days).",
    )


class ScheduleSettings(_Section):
    """`finrec scheduler`: which jobs run on their own, and how often. An interval of null turns its job off."""

    drift_check_every_hours: float | None = Field(
        6.0, gt=0, description="Run the drift check of the champion on the service's new feedback this often "
        "(hours; null: never). An alert is stored, delivered to [alerts] sinks and can trigger retraining.",
    )
    retrain_every_days: float | None = Field(
        None, gt=0, description="Retrain this long after the last training (days; null: only on a drift alert "
        "when retrain_on_drift is on).",
    )
    retrain_on_drift: bool = Field(
        True, description="Retrain after a drift alert newer than the last training (the champion's "
        "registration or the last retrain job).",
    )
    drift_retrain_min_hours: float = Field(
        24.0, ge=0, description="With retrain_on_drift, at least this long after the retrain job's last start "
        "before a drift alert starts another (hours; 0: at once). While drift persists, a champion retrained "
        "mostly on data from before it keeps drifting, and every drift check would start another retrain; the "
        "alert is acted on once the interval has passed, not dropped.",
    )
    promote: bool = Field(
        False, description="Let a scheduled retrain promote its challenger when it passes the gate (never forced). "
        "Off: it is registered as challenger, for an A/B test or a promotion by hand.",
    )
    rollup_every_minutes: float | None = Field(
        5.0, gt=0, description="Fold the new events and audit records into the monitoring roll-up this often "
        "(minutes; null: only when /dashboard or `finrec monitor` is built), and check guardrail health and "
        "fairness for alerts.",
    )
    tick_seconds: float = Field(
        30.0, gt=0, le=3600, description="How often `finrec scheduler` looks for a job that is due.",
    )
    lock: str | None = Field(
        None, description="Where the job locks live: null (default) is Redis when serve.event_store is a "
        "redis:// URL, else files under <workspace>/scheduler/locks; or `file:///path/to/folder`, or "
        "`redis://host:6379/0`. Every scheduler, worker and cron job that may run the same job must share it.",
    )
    lock_seconds: float = Field(
        600.0, gt=1, description="A Redis lock expires this long after its holder stops renewing it (a crashed "
        "scheduler); renewed every third of it while the job runs.",
    )

    @field_validator("lock")
    @classmethod
    def _lock_url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("file://", "redis://", "rediss://")):
            raise ValueError(f"{v!r} is not a lock URL: use file:///folder or redis://host:6379/0 (or null)")
        return v


class AlertSettings(_Section):
    """Where alerts go (drift, fairness, guardrail health, retraining) and when guardrail health alerts."""

    webhook_url: str | None = Field(
        None, description="POST every alert as JSON to this http(s) URL (Slack/Teams relays, Alertmanager-style "
        "receivers, an on-call tool). Null: alerts are only stored and exported as Prometheus metrics.",
    )
    webhook_timeout_seconds: float = Field(5.0, gt=0, le=120, description="Timeout of one delivery attempt.")
    webhook_retries: int = Field(3, ge=0, le=20, description="Attempts after the first one fails (5xx, 429, or "
                                 "unreachable); 4xx other than 429 are not retried.")
    webhook_backoff_seconds: float = Field(
        1.0, ge=0, le=300, description="Wait before the first retry; doubled before each next one.",
    )
    dead_letter: Path | None = Field(
        None, description="JSON Lines file of alerts the webhook never accepted (default: "
        "<workspace>/monitoring/dead-letter.jsonl).",
    )
    empty_answer_rate: float = Field(
        0.2, gt=0, le=1, description="Guardrail health alerts when more than this share of the recent answers "
        "are empty (every product removed by a guardrail, or nothing retrieved).",
    )
    health_window_hours: float = Field(
        24.0, gt=0, description="The recent answers of the guardrail health alert: this many hours up to the "
        "newest answer (service clock).",
    )
    health_min_answers: int = Field(
        100, ge=1, description="Fewer recent answers than this: the empty-answer rate is not judged.",
    )

    @field_validator("webhook_url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        from urllib.parse import urlsplit

        if v is None or v == "":
            return None
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{v!r} is not an http(s) URL with a host, e.g. https://hooks.example.com/finrec")
        return v

    def dead_letter_path(self, workspace: Path) -> Path:
        return self.dead_letter or workspace / "monitoring" / "dead-letter.jsonl"


class ArmSettings(_Section):
    """One arm of an experiment: which model serves it and its share of the traffic."""

    model: str = Field(
        ..., min_length=1, description="Registry alias (`champion`, `challenger`) or version that serves this arm."
    )
    weight: float = Field(..., gt=0, description="Relative share of customers (weights need not sum to 100).")


class ExperimentSettings(_Section):
    """An A/B test: customers are split between arms by a salted hash of their id, the same arm every time."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="Experiment name.")
    arms: dict[str, ArmSettings] = Field(..., description="Arm name -> model and weight; at least two arms.")
    salt: str | None = Field(
        None, description="Salt of the assignment hash (default: the name). A new salt reshuffles customers."
    )
    start: datetime | None = Field(None, description="When assignment starts (service clock; unset: at once).")
    stop: datetime | None = Field(None, description="When assignment stops (service clock; unset: never).")
    control: str | None = Field(None, description="The arm the others are compared with (default: the first).")
    primary_metric: Literal["click", "apply", "approve"] = Field(
        "click", description="Conversion the experiment is decided on; the other two are reported."
    )
    alpha: float = Field(0.05, gt=0, lt=0.5, description="False-positive rate of the analysis (two-sided).")
    power: float = Field(0.8, gt=0.5, lt=1, description="Power of the fixed-horizon plan.")
    min_detectable_effect: float = Field(
        0.1, gt=0, description="Relative lift the fixed-horizon plan is sized to detect (0.1 = 10%)."
    )

    @field_validator("arms")
    @classmethod
    def _two_arms(cls, v: dict[str, ArmSettings]) -> dict[str, ArmSettings]:
        if len(v) < 2:
            raise ValueError("an experiment needs at least two arms")
        bad = [a for a in v if not a or len(a) > 64 or not a.replace("-", "").replace("_", "").isalnum()]
        if bad:
            raise ValueError(f"arm names must be letters, digits, - or _ (got {bad})")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentSettings:
        if self.control is not None and self.control not in self.arms:
            raise ValueError(f"control arm {self.control!r} is not one of the arms {list(self.arms)}")
        if self.start is not None and self.stop is not None and self.stop <= self.start:
            raise ValueError("stop must come after start")
        for attr in ("start", "stop"):
            value = getattr(self, attr)
            if value is not None and value.tzinfo is None:
                setattr(self, attr, value.replace(tzinfo=UTC))  # naive times are UTC, as everywhere in finrec
        return self

    @property
    def control_arm(self) -> str:
        return self.control or next(iter(self.arms))


class FinrecSettings(BaseSettings):
    """All finrec settings. See ``finrec config show`` for the resolved values."""

    model_config = SettingsConfigDict(
        env_prefix="FINREC_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    workspace: Path = Field(Path("finrec-workspace"), description="Where `finrec demo` writes data and models.")
    protected_attributes: list[str] = Field(
        default_factory=lambda: ["gender"],
        description="User columns never used as model features; used only to audit fairness.",
    )
    engine: EngineSettings = Field(default_factory=lambda: EngineSettings())
    events: EventSettings = Field(default_factory=EventSettings)
    validation: ValidationSettings = Field(default_factory=lambda: ValidationSettings())
    generate: GenerateSettings = Field(default_factory=lambda: GenerateSettings())
    rules: RulesSettings = Field(default_factory=lambda: RulesSettings())
    train: TrainSettings = Field(default_factory=lambda: TrainSettings())
    evaluate: EvaluateSettings = Field(default_factory=lambda: EvaluateSettings())
    serve: ServeSettings = Field(default_factory=lambda: ServeSettings())
    monitor: MonitorSettings = Field(default_factory=lambda: MonitorSettings())
    auth: AuthSettings = Field(default_factory=lambda: AuthSettings())
    registry: RegistrySettings = Field(default_factory=lambda: RegistrySettings())
    retrain: RetrainSettings = Field(default_factory=lambda: RetrainSettings())
    schedule: ScheduleSettings = Field(default_factory=lambda: ScheduleSettings())
    alerts: AlertSettings = Field(default_factory=lambda: AlertSettings())
    experiments: list[ExperimentSettings] = Field(
        default_factory=list,
        description="A/B tests (TOML `[[experiments]]` tables). At most one may be active at any time.",
    )

    @model_validator(mode="after")
    def _experiments_apart(self) -> FinrecSettings:
        names = [e.name for e in self.experiments]
        if len(set(names)) != len(names):
            raise ValueError(f"experiment names must be unique (got {names})")
        far = datetime.max.replace(tzinfo=UTC)
        near = datetime.min.replace(tzinfo=UTC)
        spans = sorted((e.start or near, e.stop or far, e.name) for e in self.experiments)
        for (_, stop_a, a), (start_b, _, b) in zip(spans, spans[1:], strict=False):
            if start_b < stop_a:
                raise ValueError(f"experiments {a!r} and {b!r} overlap in time; give them start/stop that do not")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Overrides (CLI flags) > FINREC_* environment > TOML file > defaults.
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if settings_cls.model_config.get("toml_file"):
            sources.append(TomlConfigSettingsSource(settings_cls))
        return tuple(sources)


def resolve_config_file(config_file: Path | None, environ: Mapping[str, str]) -> Path | None:
    """The TOML file to read: the explicit one, ``$FINREC_CONFIG``, or ``./finrec.toml`` if present."""
    if config_file is not None:
        return config_file
    if environ.get("FINREC_CONFIG"):
        return Path(environ["FINREC_CONFIG"])
    default = Path(DEFAULT_CONFIG_FILE)
    return default if default.is_file() else None


#: Variables of finrec's own that are not settings: the config file, the resolved settings `finrec serve` hands
#: its worker processes, the access log flag, and the key clients such as `finrec simulate` send.
_OWN_VARIABLES = frozenset({"FINREC_CONFIG", "FINREC_RESOLVED_SETTINGS", "FINREC_ACCESS_LOG", "FINREC_API_KEY"})


def _check_env_names(environ: Mapping[str, str]) -> None:
    """pydantic-settings ignores unknown variables; a typo must not pass silently."""
    known = set(FinrecSettings.model_fields)
    bad = sorted(
        k
        for k in environ
        if k.startswith("FINREC_") and k not in _OWN_VARIABLES and k[7:].lower().split("__")[0] not in known
    )
    if bad:
        raise ConfigError(
            f"unknown setting variable{'s' if len(bad) > 1 else ''} {', '.join(bad)}",
            hint=f"known top-level settings: {', '.join(sorted(known))} (nested keys joined by `__`)",
        )


def load_settings(config_file: Path | None = None, **overrides: Any) -> FinrecSettings:
    """Resolve settings from defaults, a TOML file, ``FINREC_*`` variables and overrides.

    Parameters
    ----------
    config_file
        TOML file; ``None`` falls back to ``$FINREC_CONFIG`` then ``./finrec.toml``.
    overrides
        Top-level keys set by the caller (e.g. CLI flags); highest precedence.

    Raises
    ------
    ConfigError
        The file is missing or not valid TOML, or a key or value is invalid.
    """
    path = resolve_config_file(config_file, os.environ)
    _check_env_names(os.environ)
    cls: type[FinrecSettings] = FinrecSettings
    if path is not None:
        if not path.is_file():
            raise ConfigError(
                f"config file {path} does not exist", hint="pass an existing TOML file or unset FINREC_CONFIG"
            )
        try:
            parsed = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        serve_table = parsed.get("serve")
        if isinstance(serve_table, dict) and "api_key" in serve_table:
            raise ConfigError(
                f"config file {path} holds an API key (serve.api_key): keys never belong in a settings file",
                hint="put the key's SHA-256 in an [[auth.keys]] table (`finrec keygen` prints both), or pass the key "
                "in the environment (FINREC_SERVE__API_KEY)",
            )
        cls = type(
            "FinrecSettingsFromFile",
            (FinrecSettings,),
            {"model_config": {**FinrecSettings.model_config, "toml_file": path}},
        )
    try:
        return cls(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}" for err in exc.errors()
        )
        source = f"file {path} or FINREC_* variables" if path else "FINREC_* variables or flags"
        raise ConfigError(
            f"invalid settings ({source}): {problems}",
            hint="`finrec config show` prints the resolved settings; nested keys in variables use `__`, "
            "e.g. FINREC_GENERATE__USERS=1000",
        ) from None


def dump_resolved_settings(settings: FinrecSettings, path: Path) -> None:
    """Write the resolved settings as JSON (mode 0600) for :func:`load_resolved_settings` in another process.

    ``finrec serve --workers N`` hands its workers the settings it resolved (file, variables and flags) this way;
    secrets (``serve.api_key``) are written in clear, so the file lives in a private temporary folder.
    """
    data = json.loads(settings.model_dump_json())
    key = settings.serve.api_key
    data["serve"]["api_key"] = None if key is None else key.get_secret_value()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f)


def load_resolved_settings(path: Path) -> FinrecSettings:
    """Settings written by :func:`dump_resolved_settings`, as they were: no file, variable or default is read again.

    Raises
    ------
    ConfigError
        The file is missing or does not hold valid settings.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return FinrecSettings.model_validate(data)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the resolved settings {path}: {exc}",
                          hint="start the service with `finrec serve`") from None  # fmt: skip
