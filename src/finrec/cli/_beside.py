"""What ``finrec demo`` runs beside its API: the two-stage model's training (then its promotion) and the offline
evaluation, each in a process of its own, so that the first answer does not wait for them.

Each waits until the API answers ``/health`` (the service loads faster with the cores to itself), writes its
output to a log file in the workspace and prints one line when it is done. :meth:`stop` (Ctrl-C of the demo)
ends what is still running.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from finrec.cli._common import err, out


def serve_stand_in(settings: Any, bundle: Path) -> str:
    """Register ``bundle`` in the workspace's registry and make it the champion (forced: it is a stand-in)."""
    from finrec.registry import ModelRegistry

    registry = ModelRegistry.from_settings(settings)
    version = registry.register(bundle, alias=None, by="demo", reason="popularity model, to answer at once")
    registry.promote(version, force=True, by="demo", reason="answers while the two-stage model trains")
    return version


def _finrec(config_file: Path | None, *args: str) -> list[str]:
    return [sys.executable, "-m", "finrec", *(["--config", str(config_file)] if config_file else []), *args]


class _Beside:
    def __init__(self, url: str) -> None:
        self.url = url
        self.proc: subprocess.Popen[bytes] | None = None
        self._stopped = threading.Event()
        threading.Thread(target=self._main, name=f"finrec-demo-{type(self).__name__}", daemon=True).start()

    def _wait_for_api(self) -> bool:
        import httpx

        while not self._stopped.wait(1.0):
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return True
            except httpx.HTTPError:
                continue
        return False

    def _run(self, cmd: list[str], log: Path, nice: int = 0) -> int | None:
        """Run ``cmd`` with its output in ``log``; its exit code, or None when stopped meanwhile."""
        if self._stopped.is_set():
            return None
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT,
                                         preexec_fn=(lambda: os.nice(nice)) if nice else None)  # fmt: skip
        code = self.proc.wait()
        return None if self._stopped.is_set() else code

    def _evaluate(self, config_file: Path | None, model_dir: Path, data: Path, report: Path) -> None:
        log = report.with_suffix(".log")
        out.print(f"offline evaluation started beside the API (log: {log})")
        code = self._run(_finrec(config_file, "evaluate", "--model-dir", str(model_dir), "--data", str(data),
                                 "--output", str(report)), log, nice=10)  # fmt: skip
        if code == 0:
            out.print(f"[green]offline evaluation done[/]: {report.with_suffix('.html')} and {report} "
                      f"(table in {log})")  # fmt: skip
        elif code is not None:
            err.print(f"[yellow]warning[/]: the offline evaluation failed (exit {code}); see {log}")

    def _main(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        self._stopped.set()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class EvaluateBeside(_Beside):
    """``finrec evaluate`` (nice 10) once the API answers."""

    def __init__(self, config_file: Path | None, model_dir: Path, data: Path, report: Path, url: str) -> None:
        self.args = (config_file, model_dir, data, report)
        super().__init__(url)

    def _main(self) -> None:
        if self._wait_for_api():
            self._evaluate(*self.args)


class TrainBeside(_Beside):
    """``finrec train`` once the API answers, then the bundle registered and promoted (the service follows the
    champion), then ``finrec evaluate`` (nice 10)."""

    def __init__(self, config_file: Path | None, settings: Any, data: Path, model_dir: Path, report: Path,
                 url: str) -> None:  # fmt: skip
        self.config_file, self.settings, self.data, self.model_dir, self.report = (config_file, settings, data,
                                                                                    model_dir, report)  # fmt: skip
        super().__init__(url)

    def _main(self) -> None:
        from finrec.registry import ModelRegistry

        if not self._wait_for_api():
            return
        log = self.model_dir.with_name("train.log")
        out.print(f"the two-stage model is training beside the API (a few minutes; log: {log})")
        code = self._run(_finrec(self.config_file, "train", "--data", str(self.data), "--model-dir",
                                 str(self.model_dir)), log)  # fmt: skip
        if code is None:
            return
        if code != 0:
            err.print(f"[yellow]warning[/]: training the two-stage model failed (exit {code}); the popularity model "
                      f"keeps serving; see {log}")  # fmt: skip
            return
        try:
            registry = ModelRegistry.from_settings(self.settings)
            version = registry.register(self.model_dir, alias=None, by="demo", reason="the demo's two-stage model")
            registry.promote(version, force=True, by="demo", reason="replaces the popularity stand-in")
        except Exception as exc:  # the stand-in keeps serving; say why, with the way out
            err.print(f"[yellow]warning[/]: could not promote the two-stage model: {exc}; serve it with: finrec serve "
                      f"--model-dir {self.model_dir} --data {self.data}")  # fmt: skip
            return
        out.print(f"[green]two-stage model trained[/] and promoted as {version}: the API serves it from now on "
                  "(no restart)")  # fmt: skip
        self._evaluate(self.config_file, self.model_dir, self.data, self.report)
