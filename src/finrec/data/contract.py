"""The data contract: the three tables finrec reads and what each column means.

This module is the single source of truth for column names, logical types and
allowed ranges. The validator checks data against it, the synthetic generator
writes data that satisfies it, and ``docs/data.md`` documents it for people.

A dataset is one directory holding ``users``, ``products`` and ``events``, each
as ``<name>.parquet``, ``<name>.csv`` or ``<name>.csv.gz``. Only the id columns,
``events.event_type`` and ``events.timestamp`` are required. Well-known optional
columns switch on rules and features when present; any other column is carried
along as a feature, numeric or categorical by its type.

Examples
--------
>>> from finrec.data.contract import TABLES, EVENT_TYPES
>>> [c.name for c in TABLES["events"].required]
['user_id', 'product_id', 'event_type', 'timestamp']
>>> "approve" in EVENT_TYPES
True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Kind(StrEnum):
    """Logical type of a column, independent of how the file stores it."""

    ID = "id"  # integer or string; compared as text
    INT = "int"
    FLOAT = "float"
    BOOL = "bool"
    STRING = "string"
    TIMESTAMP = "timestamp"
    DATE = "date"


@dataclass(frozen=True)
class Column:
    """One column of the contract.

    Parameters
    ----------
    name
        Column name as it appears in the file header.
    kind
        Logical type; values that cannot be read as this type are reported.
    required
        A table without this column is rejected.
    description
        What the column means; rendered into docs/data.md.
    min, max
        Inclusive bounds for numeric columns; values outside are errors.
    allowed
        For string columns with a closed vocabulary, the allowed values.
    missing_means
        What an empty value means when that is a normal state (e.g. "no rule"),
        so validation does not warn about it; ``None`` when it is a gap in the data.
    """

    name: str
    kind: Kind
    required: bool = False
    description: str = ""
    min: float | None = None
    max: float | None = None
    allowed: tuple[str, ...] | None = None
    missing_means: str | None = None


@dataclass(frozen=True)
class TableSpec:
    """The columns of one table and its primary key (if any)."""

    name: str
    columns: tuple[Column, ...]
    key: str | None = None
    description: str = ""
    by_name: dict[str, Column] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_name", {c.name: c for c in self.columns})

    @property
    def required(self) -> tuple[Column, ...]:
        return tuple(c for c in self.columns if c.required)

    @property
    def optional(self) -> tuple[Column, ...]:
        return tuple(c for c in self.columns if not c.required)


#: The funnel, in order, then ownership events. Relevance grades per type are
#: configuration (``FinrecSettings.events.grades``), not part of the contract.
EVENT_TYPES: tuple[str, ...] = (
    "impression",
    "view",
    "click",
    "apply",
    "approve",
    "decline",
    "hold",
    "close",
)

#: Categories the synthetic world uses and the rules engine knows by name.
#: Real datasets may use any category labels; these are not enforced.
KNOWN_CATEGORIES: tuple[str, ...] = (
    "current_account",
    "savings",
    "term_deposit",
    "credit_card",
    "personal_loan",
    "auto_loan",
    "mortgage",
    "insurance",
    "investment_fund",
    "pension",
)

EMPLOYMENT_STATUSES: tuple[str, ...] = (
    "employed",
    "self_employed",
    "unemployed",
    "student",
    "retired",
)

USERS = TableSpec(
    name="users",
    key="user_id",
    description="One row per customer.",
    columns=(
        Column("user_id", Kind.ID, required=True, description="Customer id, unique. Integer or string."),
        Column("age", Kind.INT, description="Age in years.", min=0, max=120),
        Column("income", Kind.FLOAT, description="Annual income in the dataset's currency.", min=0),
        Column(
            "credit_score",
            Kind.FLOAT,
            description="Credit score, higher is better. Any scale from 0 to 1000; "
            "`products.min_credit_score` must use the same scale.",
            min=0,
            max=1000,
        ),
        Column("risk_tolerance", Kind.INT, description="Investment risk tolerance, 1 (lowest) to 5.", min=1, max=5),
        Column("region", Kind.STRING, description="Region code, matched against `products.regions`."),
        Column(
            "employment_status",
            Kind.STRING,
            description="Free text; the well-known values are "
            + ", ".join(f"`{s}`" for s in EMPLOYMENT_STATUSES)
            + ".",
        ),
        Column(
            "marketing_consent",
            Kind.BOOL,
            description="Whether the customer accepts marketing (true/false, 1/0, yes/no).",
        ),
        Column("signup_date", Kind.DATE, description="Date the customer joined."),
    ),
)

PRODUCTS = TableSpec(
    name="products",
    key="product_id",
    description="One row per product or offer.",
    columns=(
        Column("product_id", Kind.ID, required=True, description="Product id, unique. Integer or string."),
        Column("name", Kind.STRING, description="Display name."),
        Column("category", Kind.STRING, description="Product category, e.g. `credit_card`."),
        Column("provider", Kind.STRING, description="Issuing institution."),
        Column(
            "risk_level", Kind.INT, description="Risk of the product to the customer, 1 (lowest) to 5.", min=1, max=5
        ),
        Column(
            "apr",
            Kind.FLOAT,
            description="Annual percentage rate charged, in percent (19.9 means 19.9%).",
            min=0,
            max=100,
            missing_means="not a credit product",
        ),
        Column(
            "apy",
            Kind.FLOAT,
            description="Annual percentage yield paid, in percent.",
            min=0,
            max=100,
            missing_means="pays no interest",
        ),
        Column("annual_fee", Kind.FLOAT, description="Yearly fee or premium in the dataset's currency.", min=0),
        Column(
            "min_credit_score",
            Kind.FLOAT,
            description="Lowest credit score accepted.",
            min=0,
            max=1000,
            missing_means="no rule",
        ),
        Column("min_income", Kind.FLOAT, description="Lowest annual income accepted.", min=0, missing_means="no rule"),
        Column(
            "min_age",
            Kind.INT,
            description="Youngest age accepted (inclusive).",
            min=0,
            max=120,
            missing_means="no rule",
        ),
        Column(
            "max_age", Kind.INT, description="Oldest age accepted (inclusive).", min=0, max=120, missing_means="no rule"
        ),
        Column(
            "regions",
            Kind.STRING,
            description="Where the product is offered: `*` for everywhere or a comma-separated list of region codes.",
            missing_means="offered everywhere",
        ),
        Column("launch_date", Kind.DATE, description="Date the product became available."),
    ),
)

EVENTS = TableSpec(
    name="events",
    key=None,  # event_id, when present, is an idempotency key; duplicates are reported
    description="One row per interaction between a customer and a product.",
    columns=(
        Column("user_id", Kind.ID, required=True, description="Must exist in `users.user_id`."),
        Column("product_id", Kind.ID, required=True, description="Must exist in `products.product_id`."),
        Column(
            "event_type",
            Kind.STRING,
            required=True,
            description="One of " + ", ".join(f"`{t}`" for t in EVENT_TYPES) + ".",
            allowed=EVENT_TYPES,
        ),
        Column(
            "timestamp",
            Kind.TIMESTAMP,
            required=True,
            description="When it happened: ISO 8601 text or a Parquet timestamp; naive values are read as UTC. "
            "Must not be in the future.",
        ),
        Column(
            "event_id", Kind.ID, description="Idempotency key: the same id twice is the same event delivered twice."
        ),
        Column(
            "request_id",
            Kind.ID,
            description="The recommendation request (slate) this event answers.",
            missing_means="not part of a recommendation (e.g. `hold`, `close`)",
        ),
        Column(
            "position",
            Kind.INT,
            description="1-based position of the product in the slate it was shown in.",
            min=1,
            missing_means="not shown in a slate",
        ),
        Column(
            "channel",
            Kind.STRING,
            description="Where it happened, e.g. `app`, `web`, `email`, `branch`.",
            missing_means="unknown channel",
        ),
    ),
)

TABLES: dict[str, TableSpec] = {t.name: t for t in (USERS, PRODUCTS, EVENTS)}

#: File suffixes a table may be stored with, in order of preference.
SUFFIXES: tuple[str, ...] = (".parquet", ".csv", ".csv.gz")
