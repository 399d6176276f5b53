#!/usr/bin/env bash
# Run a command against a local S3-compatible endpoint (moto server on 127.0.0.1).
#
#   cluster/local-s3.sh COMMAND...     start the endpoint, create the bucket, run COMMAND with
#                                      AWS_ENDPOINT_URL and test credentials set, copy the bucket
#                                      to $COPY_TO, stop the endpoint
#
# `make demo` uses it so that the demo writes every output and checkpoint to s3:// through the
# same code path as AWS S3. The endpoint keeps objects in memory only, so the bucket is copied
# to a local directory before it stops (also when COMMAND fails, to keep what it wrote).
#
# Settings (environment): BUCKET (bertram-demo), S3_PORT (a free port), COPY_TO (out/demo-s3;
# empty: no copy).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$REPO/.venv/bin/python}"
BUCKET="${BUCKET:-bertram-demo}"
COPY_TO="${COPY_TO-out/demo-s3}"
S3_PORT="${S3_PORT:-$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"

if [[ $# -eq 0 ]]; then sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 2; fi

"$(dirname "$PY")/moto_server" -H 127.0.0.1 -p "$S3_PORT" >/dev/null 2>&1 &
MOTO=$!
export AWS_ENDPOINT_URL="http://127.0.0.1:$S3_PORT" AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing \
    AWS_REGION=us-east-1
# Where the bucket will be copied: jobs.run's summary names local paths a user can load.
if [[ -n "$COPY_TO" ]]; then export BERTRAM_LOCAL_COPY="s3://$BUCKET=$COPY_TO"; fi

finish() {
    status=$?
    if [[ -n "$COPY_TO" ]]; then
        "$PY" - "s3://$BUCKET" "$COPY_TO" <<'PYEOF' || true
import sys
from pipeline import storage
src, dst = sys.argv[1], sys.argv[2]
print(f"local-s3: copied {storage.copy_tree(src, dst)} objects of {src} to {dst}", file=sys.stderr)
PYEOF
    fi
    kill "$MOTO" 2>/dev/null || true
    wait "$MOTO" 2>/dev/null || true
    echo "local-s3: endpoint $AWS_ENDPOINT_URL stopped" >&2
    exit "$status"
}
trap finish EXIT

for _ in $(seq 100); do
    "$PY" -c "import socket; socket.create_connection(('127.0.0.1', $S3_PORT), timeout=1)" 2>/dev/null && break
    sleep 0.2
done
"$PY" -c "import boto3; boto3.client('s3').create_bucket(Bucket='$BUCKET')"
echo "local-s3: endpoint $AWS_ENDPOINT_URL, bucket s3://$BUCKET" >&2
cd "$REPO"
"$@"
