#!/usr/bin/env bash
# Entry point of the lightcycle serving image: `mlflow models serve` on one model.
#
# Environment (all optional):
#   MODEL_URI              what to serve, default $LIGHTCYCLE_DEFAULT_MODEL_URI, which each image
#                            sets to its deployable (models:/lightcycle-fashion-scripted@champion
#                            for the torch image, models:/lightcycle-fashion-onnx@champion for
#                            the onnx one), else the scripted one. Either
#                            models:/<name>@<alias> or models:/<name>/<version> (needs
#                            MLFLOW_TRACKING_URI, plus MLFLOW_TRACKING_TOKEN or _USERNAME/_PASSWORD
#                            if the server wants them), or a local model directory holding an
#                            MLmodel file, e.g. one mounted with -v /path/to/model:/models/x:ro.
#   MLFLOW_TRACKING_URI    the tracking server that holds the registry (http://host:5000).
#   PORT                   default 8080.      HOST   default 0.0.0.0.
#   MLFLOW_MODELS_WORKERS  uvicorn workers, default 1 (measure before raising it); with more,
#                            each gets cores / workers torch (or ONNX Runtime) threads unless
#                            LIGHTCYCLE_TORCH_THREADS or OMP_NUM_THREADS is set.
#   FOLLOW=1               follow the alias MODEL_URI names (models:/<name>@<alias>): each
#                            version it moves to is started beside the serving one, checked and
#                            only then given the traffic (docs/serving.md, "Following the
#                            champion"); the same as `mlflow run . -e serve -P follow=true`.
#                            With it: POLL_SECONDS (10), WEBHOOK_PORT (5002, 0 to only poll) and
#                            WEBHOOK_URL (where the tracking server reaches WEBHOOK_PORT, e.g.
#                            http://serving-host:5002/; default http://<hostname>:WEBHOOK_PORT/).
# Extra arguments are passed on to `mlflow models serve` (e.g. -t 30 for the request timeout).
#
# Loading a model runs its code, so only the registry or a directory you name are accepted
# (the same rule as `mlflow run . -e serve`). Without FOLLOW=1 an alias is read once, at start:
# restart the container to pick up a new champion.
set -euo pipefail

default_model_uri=${LIGHTCYCLE_DEFAULT_MODEL_URI:-models:/lightcycle-fashion-scripted@champion}
model_uri=${MODEL_URI:-$default_model_uri}
port=${PORT:-8080}
host=${HOST:-0.0.0.0}
workers=${MLFLOW_MODELS_WORKERS:-1}

fail() {
    echo "lightcycle-serve: $*" >&2
    exit 2
}

case "$model_uri" in
    models:/*)
        [ -n "${MLFLOW_TRACKING_URI:-}" ] || fail "MODEL_URI=$model_uri is a registry URI but" \
            "MLFLOW_TRACKING_URI is not set. Pass the tracking server, e.g." \
            "-e MLFLOW_TRACKING_URI=http://tracking.example:5000, or mount a model directory" \
            "and set MODEL_URI to its path."
        ;;
    file://*|/*|./*|../*)
        model_dir=${model_uri#file://}
        [ -d "$model_dir" ] || fail "MODEL_URI=$model_uri: no such directory. Mount the model" \
            "directory into the container (-v /path/to/model:/models/champion:ro) and set" \
            "MODEL_URI=/models/champion."
        [ -f "$model_dir/MLmodel" ] || fail "MODEL_URI=$model_uri: $model_dir holds no MLmodel" \
            "file. Point MODEL_URI at the model directory itself (the one with MLmodel in it)."
        [ -r "$model_dir/MLmodel" ] || fail "MODEL_URI=$model_uri: $model_dir/MLmodel is not" \
            "readable by uid $(id -u). Make the mounted files world-readable."
        model_uri=$(cd "$model_dir" && pwd -P)
        ;;
    *)
        fail "Refusing to serve MODEL_URI=$model_uri: give a registry URI" \
            "(models:/<name>@<alias> or models:/<name>/<version>) or the path of a local model" \
            "directory. Loading a model runs its code, so only the registry or a path you name" \
            "are accepted."
        ;;
esac
case "$port" in ''|*[!0-9]*) fail "PORT=$port is not a port number." ;; esac
case "$workers" in ''|*[!0-9]*|0) fail "MLFLOW_MODELS_WORKERS=$workers is not a positive integer." ;; esac

# Several workers share the cores (as `mlflow run . -e serve` does): torch would start one
# thread per core in each, and oversubscribed OpenMP threads spin.
if [ "$workers" -gt 1 ] && [ -z "${LIGHTCYCLE_TORCH_THREADS:-}" ] && [ -z "${OMP_NUM_THREADS:-}" ]; then
    share=$(( $(nproc) / workers ))
    export LIGHTCYCLE_TORCH_THREADS=$(( share > 0 ? share : 1 ))
fi

if [ "${FOLLOW:-0}" = 1 ]; then
    case "$model_uri" in
        models:/*@*) ;;
        *) fail "FOLLOW=1 follows an alias, and MODEL_URI=$model_uri names none: set" \
               "MODEL_URI=models:/<name>@<alias>, or unset FOLLOW to serve a fixed model." ;;
    esac
    [ "$#" = 0 ] || fail "FOLLOW=1 serves with lightcycle's follower, not \`mlflow models serve\`:" \
        "it takes no extra arguments ($*)."
    poll=${POLL_SECONDS:-10}
    webhook_port=${WEBHOOK_PORT:-5002}
    case "$poll" in ''|*[!0-9]*|0) fail "POLL_SECONDS=$poll is not a positive integer." ;; esac
    case "$webhook_port" in ''|*[!0-9]*) fail "WEBHOOK_PORT=$webhook_port is not a port number." ;; esac
    # The follower handles SIGTERM itself (drains, deletes its webhook, exits 0): PID 1 is safe.
    exec python -m lightcycle.serving.follow --model_uri "$model_uri" --host "$host" \
        --port "$port" --workers "$workers" --poll_seconds "$poll" \
        --webhook_port "$webhook_port" --webhook_url "${WEBHOOK_URL:-auto}"
elif [ -n "${FOLLOW:-}" ] && [ "$FOLLOW" != 0 ]; then
    fail "FOLLOW=$FOLLOW: set FOLLOW=1 to follow the alias, or leave it unset."
fi

echo "lightcycle-serve: serving $model_uri on http://$host:$port (/ping, /invocations)," \
    "$workers worker(s)" >&2

# Not `exec`: as PID 1 in a container, the mlflow CLI (python, no SIGTERM handler) would ignore
# `docker stop` and be killed after the grace period. The CLI runs uvicorn as its child, so
# SIGTERM/SIGINT go to uvicorn, which finishes the requests in flight and exits; the CLI then
# follows (it reports uvicorn's re-raised signal with a traceback: expected). While the model is
# still downloading there is no uvicorn yet: the CLI itself is stopped. A stop asked for this
# way exits 0.
mlflow models serve -m "$model_uri" --env-manager local -h "$host" -p "$port" -w "$workers" "$@" &
server=$!

stopping=0
forward() {
    local children
    stopping=1
    children=$(cat /proc/"$server"/task/*/children 2>/dev/null || true)
    # shellcheck disable=SC2086  # a list of process ids
    kill -TERM ${children:-$server} 2>/dev/null || true
}
trap forward TERM INT

# `wait` returns early when a trapped signal arrives: wait again until the server has exited.
while kill -0 "$server" 2>/dev/null; do
    wait "$server" || true
done
# bash remembers the status of a background job it has reaped.
status=0
wait "$server" || status=$?
if [ "$stopping" = 1 ]; then
    echo "lightcycle-serve: stopped on request (server status $status)" >&2
    exit 0
fi
exit "$status"
