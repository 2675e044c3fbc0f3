"""finrec: a recommendation engine for financial products."""

__version__ = "0.1.0"
