"""A Spark session for finrec's stages: the cluster's when there is one, else one started from the settings.

Under ``spark-submit`` or in a Databricks job a session already exists, and finrec uses it as it is (the
cluster's settings win). Otherwise :func:`spark_session` starts one from ``[engine]``: ``local[2]`` on this
machine, or the master URL of a cluster. Two settings are finrec's own whatever the session: UTC as the SQL
time zone (event times are UTC seconds) and Arrow transfers on; the shuffle partitions come from the settings in
a session finrec starts, and from the cluster's configuration in one it finds, and are raised when the event
log needs more (``[engine] spark_events_per_partition``, :func:`finrec.features.spark.log_partitions`).

Python workers must import finrec and its dependencies: ``PYSPARK_PYTHON`` defaults to this interpreter (the
virtual environment's), so that local mode works from a checkout; on a cluster, install ``finrec[spark]`` on
every node (docs/scale.md).
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import TYPE_CHECKING, Any

from finrec.errors import FinrecError

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import SparkSession

    from finrec.config import EngineSettings

#: Where a session carries ``[engine] spark_events_per_partition`` to :class:`~finrec.features.spark.SparkEventTables`.
EVENTS_PER_PARTITION_KEY = "spark.finrec.eventsPerPartition"
DEFAULT_EVENTS_PER_PARTITION = 500_000

INSTALL_HINT = "pip install 'finrec[spark]' (PySpark and sqlglot), and Java 17 (Debian: openjdk-17-jre-headless)"


def require_pyspark() -> Any:
    """The ``pyspark`` module, or a FinrecError that says how to install it."""
    try:
        import pyspark
    except ImportError:
        raise FinrecError("the Spark engine needs PySpark, which is not installed", hint=INSTALL_HINT) from None
    return pyspark


def java_available() -> bool:
    """Whether a Java runtime is on this machine (``JAVA_HOME`` or ``java`` on the PATH)."""
    home = os.environ.get("JAVA_HOME")
    if home and os.path.isfile(os.path.join(home, "bin", "java")):
        return True
    return shutil.which("java") is not None


def spark_session(engine: EngineSettings, app_name: str = "finrec") -> SparkSession:
    """The active Spark session, else a new one configured from ``engine``.

    Raises
    ------
    FinrecError
        PySpark or Java is missing, or the session cannot start (the message says which).
    """
    require_pyspark()
    import warnings

    from pyspark.sql import SparkSession

    # PySpark 4.3 warns on every pandas conversion under pandas 3; it works (the parity tests hold it), and a
    # warning per table would bury the command's own output.
    warnings.filterwarnings("ignore", message="PySpark does not yet fully support pandas", category=FutureWarning)

    active = SparkSession.getActiveSession()
    if active is not None:
        _finrec_conf(active)
        active.conf.set(EVENTS_PER_PARTITION_KEY, str(engine.spark_events_per_partition))
        return active
    if not java_available():
        raise FinrecError("the Spark engine needs Java, which is not on this machine", hint=INSTALL_HINT)
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = (
        SparkSession.builder.appName(app_name)
        .master(engine.spark_master)
        .config("spark.driver.memory", engine.spark_driver_memory)
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.sql.shuffle.partitions", str(engine.spark_partitions))
    )
    for key, value in engine.spark_conf.items():
        builder = builder.config(key, value)
    try:
        session = builder.getOrCreate()
    except Exception as exc:  # the JVM's own errors (no memory, a bad master URL) come in many types
        raise FinrecError(
            f"cannot start Spark (master {engine.spark_master}): {exc}",
            hint="check [engine] spark_master and that Java 17 runs (`java -version`)",
        ) from None
    session.sparkContext.setLogLevel("ERROR")
    _finrec_conf(session)
    session.conf.set(EVENTS_PER_PARTITION_KEY, str(engine.spark_events_per_partition))
    return session


def _finrec_conf(session: SparkSession) -> None:
    """What finrec needs of any session, its own or the cluster's (whose other settings win, partitions included)."""
    session.conf.set("spark.sql.session.timeZone", "UTC")
    session.conf.set("spark.sql.execution.arrow.pyspark.enabled", "true")


#: What to change when Spark fails mid-job: its own log lines above the error say which task failed and why.
FAILURE_HINT = (
    "the lines Spark logged above say why. 'OutOfMemoryError: Java heap space': raise [engine] spark_driver_memory "
    "(local mode: the one JVM's heap) or spark.executor.memory in [engine] spark_conf on a cluster, or lower "
    "[engine] spark_events_per_partition (or raise spark_partitions) so that each task holds less of the data"
)


def spark_failure(exc: BaseException) -> FinrecError | None:
    """A failed Spark job (an error from the JVM or from PySpark) as a FinrecError; None for anything else.

    Imports nothing: only a process that ran Spark has PySpark's modules loaded.
    """
    kinds = tuple(
        getattr(sys.modules[module], name)
        for module, name in (("py4j.protocol", "Py4JError"), ("pyspark.errors", "PySparkException"))
        if module in sys.modules and hasattr(sys.modules[module], name)
    )
    if not kinds or not isinstance(exc, kinds):
        return None
    text = str(exc).strip()
    causes = [line.strip().lstrip(": ") for line in text.splitlines() if "Error:" in line or "Exception:" in line]
    first = (causes[0] if causes else text.splitlines()[0] if text else type(exc).__name__)[:500]
    return FinrecError(f"Spark failed: {first}", hint=FAILURE_HINT)
