"""Scheduled jobs: the drift check, retraining and the monitoring roll-up, run on their own.

``finrec scheduler`` runs them on the ``[schedule]`` settings; ``finrec scheduler run JOB`` runs one from cron,
a Kubernetes CronJob or Airflow. :mod:`~finrec.jobs.locks` keeps one runner per job,
:mod:`~finrec.jobs.history` records every run, :mod:`~finrec.jobs.tasks` says what each job does and
:mod:`~finrec.jobs.scheduler` when it is due. See docs/operations.md.
"""
