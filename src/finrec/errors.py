"""The few errors finrec raises on purpose.

Each carries a message that says what is wrong and a hint that says how to fix
it. The CLI and the API turn them into clean output (no traceback); anything
else that escapes is a bug.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from finrec.data.validate import ValidationReport


class FinrecError(Exception):
    """Base class: a problem the user can fix, with a hint on how."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class ConfigError(FinrecError):
    """The configuration file or a FINREC_* variable is invalid."""


class DataError(FinrecError):
    """A dataset cannot be found or read at all (before validation can start)."""


class DataValidationError(FinrecError):
    """A dataset was read but breaks the data contract; ``report`` lists every problem."""

    exit_code = 1

    def __init__(self, report: ValidationReport) -> None:
        n = len(report.errors)
        super().__init__(
            f"dataset {report.path} breaks the data contract: {n} error{'s' if n != 1 else ''}",
            hint="run `finrec validate --data DIR` for the full report; docs/data.md describes the contract",
        )
        self.report = report


class ArtifactError(FinrecError):
    """An artifact folder is missing, incomplete or from an incompatible version."""
