#!/usr/bin/env bash
# A single-node Ray cluster on this machine, to try `ray job submit` before a real cluster.
#
#   cluster/local-head.sh            start a head (ray start --head) and print the submit command
#   cluster/local-head.sh --print    only print the submit command
#   cluster/local-head.sh --stop     stop it: `ray stop --force` (stops EVERY Ray on this machine)
#
# While it runs, `ray.init()` without an address on this machine (local jobs, tests) attaches
# to this head instead of starting its own Ray.
#
# Settings (environment): NUM_CPUS (default: all cores), RAY_PORT (6379),
# DASHBOARD_PORT (8265), RAY_AUTH_MODE (token | disabled; default token).
#
# Token auth (RAY_NOTES.md, "Ray Jobs"): once ~/.ray/auth_token exists (any local `ray.init()`
# writes it), `ray start --head` turns token auth on and a client without RAY_AUTH_MODE=token is
# refused ("Missing authentication token"). So this script sets RAY_AUTH_MODE explicitly for
# `ray start` and prints it in the submit command: with `token` (default) the head and the client
# use ~/.ray/auth_token (created here if missing); with `disabled` neither does.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The project's virtualenv first on PATH: `ray`, and the `python` of job entrypoints (which
# inherit the head's environment), are then the ones with this package installed.
if [[ -x "$REPO/.venv/bin/ray" ]]; then
    export PATH="$REPO/.venv/bin:$PATH"
fi

NUM_CPUS="${NUM_CPUS:-$(nproc)}"
RAY_PORT="${RAY_PORT:-6379}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
case "$RAY_AUTH_MODE" in
    token | disabled) ;;
    *) echo "RAY_AUTH_MODE must be token or disabled, got '$RAY_AUTH_MODE'" >&2; exit 2 ;;
esac

usage() { sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

print_submit() {
    # Absolute --corpus/--output: the job runs in an uploaded copy of the working dir, which
    # leaves out .cache/ and out/ (cluster/runtime_env.yaml). Build the demo corpus first
    # with `make demo` or `.venv/bin/python -m pipeline.demo_corpus --output .cache/demo-corpus`.
    cat <<EOF
Submit the demo pipeline from $REPO:
  cd $REPO && RAY_AUTH_MODE=$RAY_AUTH_MODE ray job submit --address http://127.0.0.1:$DASHBOARD_PORT --runtime-env cluster/runtime_env.yaml -- python -m jobs.run --config jobs/configs/demo.yaml --corpus $REPO/.cache/demo-corpus --output $REPO/out/local-head
Dashboard: http://127.0.0.1:$DASHBOARD_PORT    Stop: cluster/local-head.sh --stop
EOF
}

case "${1:-}" in
    "")
        if [[ "$RAY_AUTH_MODE" == token ]]; then
            # `ray start` does not create a token; make one if there is none (never printed).
            ray get-auth-token --generate >/dev/null
        fi
        ray start --head --port="$RAY_PORT" --num-cpus="$NUM_CPUS" \
            --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" --disable-usage-stats
        print_submit
        ;;
    --print) print_submit ;;
    --stop) ray stop --force ;;
    -h | --help) usage ;;
    *) usage >&2; exit 2 ;;
esac
