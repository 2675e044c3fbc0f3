"""Benchmark: a newcomer's time to the first answer, from a fresh clone, install included.

What a newcomer does, timed: ``git clone``, ``make demo`` (a fresh ``.venv``, ``pip install -e .``, the default
world of 200,000 customers, validation, a popularity model, the API, the two-stage model beside it), and the first
``GET /recommend/1?k=5`` with the development key the demo prints. Milestones are read from what appears on
disk (the install stamp, the world's manifest, each model's manifest, the evaluation report) and from the API's
first answer. Milestones are measured from the start of the clone.

Usage::

    .venv/bin/python benchmarks/bench_first_answer.py                 # clones this repo's HEAD
    .venv/bin/python benchmarks/bench_first_answer.py --ref main      # another branch or commit

Run it on a quiet machine: the time is wall-clock. Package files come from wherever pip is configured to take
them (on the benchmark machine a local wheel folder and index: no download time is included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", default="HEAD", help="What to clone (a branch, tag or commit of this repo).")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--keep", action="store_true", help="Keep the clone (printed) instead of deleting it.")
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="finrec-newcomer-"))
    clone = folder / "finrec"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FINREC_", "VIRTUAL_ENV"))}
    env |= {"FINREC_SERVE__PORT": str(port), "COLUMNS": "120"}
    marks: dict[str, float] = {}
    t0 = time.monotonic()
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
    if args.ref != "HEAD":
        subprocess.run(["git", "-C", str(clone), "checkout", "--quiet", args.ref], check=True)
    marks["clone"] = time.monotonic() - t0
    log = open(folder / "demo.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(["make", "demo"], cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    ws = clone / "finrec-workspace"
    watch = {"install": clone / ".venv" / ".installed-demo", "world": ws / "data" / "manifest.json",
             "popularity_trained": ws / "popularity-model" / "manifest.json",
             "two_stage_trained": ws / "model" / "manifest.json", "evaluated": ws / "report.html"}  # fmt: skip
    try:
        while "first_answer" not in marks:
            if proc.poll() is not None:
                raise SystemExit(f"make demo exited ({proc.returncode}); see {folder / 'demo.log'}")
            if time.monotonic() - t0 > args.timeout:
                raise SystemExit(f"no answer within {args.timeout} s; see {folder / 'demo.log'}")
            for name, path in watch.items():
                if name not in marks and path.exists():
                    marks[name] = time.monotonic() - t0
            key = ws / "secrets" / "dev-api-key"
            if key.is_file():
                req = urllib.request.Request(f"http://127.0.0.1:{port}/recommend/1?k=5",
                                             headers={"X-API-Key": key.read_text().strip()})  # fmt: skip
                try:
                    with urllib.request.urlopen(req, timeout=5) as r:
                        body = json.loads(r.read())
                        marks["first_answer"] = time.monotonic() - t0
                except (urllib.error.URLError, OSError):
                    pass
            time.sleep(0.5)
        deadline = time.monotonic() + 600  # the evaluation beside the API: when its report appears
        while "evaluated" not in marks and time.monotonic() < deadline and proc.poll() is None:
            if watch["evaluated"].exists():
                marks["evaluated"] = time.monotonic() - t0
            time.sleep(1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    commit = subprocess.run(["git", "-C", str(clone), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()  # fmt: skip
    result = {"commit": commit, "first_answer_body_items": len(body.get("items", [])),
              "seconds": {k: round(v, 1) for k, v in sorted(marks.items(), key=lambda kv: kv[1])},
              "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version()},
              "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}  # fmt: skip
    print(json.dumps(result, indent=1))
    if args.keep:
        print(f"kept {folder}")
    else:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
