#!/usr/bin/env bash
# The whole offline pipeline: data, features, training, evaluation. A thin wrapper over `finrec` commands.
#
#   bash scripts/run_full_pipeline.sh            # the default world (200,000 customers; a few minutes)
#   FINREC_GENERATE__USERS=20000 bash scripts/run_full_pipeline.sh   # a smaller, faster one
#
# Writes <workspace>/data (a synthetic world in the data contract), <workspace>/model (the trained bundle with
# its manifest) and <workspace>/report.json + report.html (the offline evaluation); the workspace is
# $FINREC_WORKSPACE, else finrec-workspace/ in the repo. Settings: finrec.toml and FINREC_* variables, as for
# every finrec command (`finrec config show`). Then serve the model: bash scripts/start_server.sh
source "$(dirname "${BASH_SOURCE[0]}")/_finrec.sh"

echo "== 1. data: a synthetic world with its ground truth, validated against the contract -> $DATA"
"$FINREC" generate --out "$DATA" --overwrite --no-validate
"$FINREC" validate --data "$DATA"
echo "== 2-3. features and training (point-in-time features, candidate sources, ranker) -> $MODEL"
"$FINREC" train --data "$DATA" --model-dir "$MODEL"
echo "== 4. offline evaluation against baselines and the oracle -> $WORKSPACE/report.html"
"$FINREC" evaluate --model-dir "$MODEL" --data "$DATA" --output "$WORKSPACE/report.json"
echo "done. Serve it: bash scripts/start_server.sh   (API on http://127.0.0.1:8000, Swagger UI at /docs)"
