"""Offline evaluation: ranking metrics, bootstrap confidence intervals and the HTML report.

:mod:`finrec.evaluation.metrics` scores top-k rankings per user from plain arrays,
:mod:`finrec.evaluation.bootstrap` turns per-user scores into means with confidence
intervals, and :mod:`finrec.evaluation.html` renders a self-contained report.
"""
