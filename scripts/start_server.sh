#!/usr/bin/env bash
# The API on http://127.0.0.1:8000 (Swagger UI at http://127.0.0.1:8000/docs) until Ctrl-C: a thin wrapper over
# `finrec serve`, serving the model of scripts/run_full_pipeline.sh (or of `make demo`).
#
#   bash scripts/start_server.sh                  # then: curl -H "X-API-Key: $(cat finrec-workspace/secrets/dev-api-key)" \
#                                                 #         'http://127.0.0.1:8000/recommend/1?k=5'
#   bash scripts/start_server.sh --port 8080      # any `finrec serve` option is passed on (see finrec serve --help)
#
# With no API key configured, a development key with every scope is made, kept in
# <workspace>/secrets/dev-api-key and printed (127.0.0.1 only; docs/security.md for real keys).
source "$(dirname "${BASH_SOURCE[0]}")/_finrec.sh"

if [ ! -f "$MODEL/manifest.json" ]; then
    echo "error: no trained model in $MODEL" >&2
    echo "hint: run bash scripts/run_full_pipeline.sh (or make demo) first, or set FINREC_WORKSPACE" >&2
    exit 2
fi
exec "$FINREC" serve --model-dir "$MODEL" --data "$DATA" --host 127.0.0.1 --port 8000 "$@"
