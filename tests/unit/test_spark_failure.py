"""A job that dies inside Spark reaches the user as one line and a hint, not a Java stack trace."""

from __future__ import annotations

import pytest

from finrec.engine.spark import FAILURE_HINT, spark_failure
from finrec.errors import FinrecError

errors = pytest.importorskip("pyspark.errors", reason="PySpark is not installed (pip install 'finrec[spark]')")


def test_a_spark_error_becomes_its_first_cause_with_what_to_change() -> None:
    exc = errors.PySparkException(
        "An error occurred while calling o256.parquet.\n"
        ": org.apache.spark.SparkException: Job aborted due to stage failure: Task 3 in stage 30.0 failed\n"
        "\tat org.apache.spark.scheduler.DAGScheduler.failJobAndIndependentStages(DAGScheduler.scala:2898)\n"
        "Caused by: java.lang.OutOfMemoryError: Java heap space\n"
    )
    failure = spark_failure(exc)
    assert isinstance(failure, FinrecError)
    assert failure.message == ("Spark failed: org.apache.spark.SparkException: Job aborted due to stage failure: "
                               "Task 3 in stage 30.0 failed")  # fmt: skip
    assert failure.hint == FAILURE_HINT and "spark_driver_memory" in FAILURE_HINT and "spark_partitions" in FAILURE_HINT
    assert "\tat " not in failure.message  # no stack frames


def test_other_errors_are_not_spark_failures() -> None:
    assert spark_failure(ValueError("Exception: not from Spark")) is None
    assert spark_failure(KeyError("x")) is None
