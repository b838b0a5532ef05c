#!/usr/bin/env bash
# Nightly incremental facebatch run (index, then people) on an existing Ray cluster, for users without Kubernetes
# (e.g. one started with `ray up infra/aws/cluster.yaml`). Run it from cron on a host that reaches the
# cluster's dashboard port (8265) and has the same Ray version as the cluster (2.60.0):
#
#   0 2 * * *  FACEBATCH_SOURCE=s3://photos/archive/ FACEBATCH_OUT=s3://index/facebatch/ RAY_ADDRESS=http://10.0.1.23:8265 /opt/facebatch/infra/cron/nightly-index.sh
#
# Settings (environment variables):
#   FACEBATCH_SOURCE   required: the archive (s3://bucket/prefix, or a manifest the cluster can read)
#   FACEBATCH_OUT      required: output root (s3://bucket/prefix)
#   RAY_ADDRESS        the cluster's job API (default http://127.0.0.1:8265)
#   FACEBATCH_ARGS     more options for jobs/index_archive.py (default "--device cuda --num-actors 1 --max-actors 4":
#                      the actor pool starts at --num-actors and grows to --max-actors = the cluster's
#                      max GPU workers, which the autoscaler adds while the pool's actors are pending)
#   FACEBATCH_REPO     facebatch checkout uploaded as the job's working directory (default: the checkout
#                      holding this script); its code runs on the cluster, on top of the image's packages
#   FACEBATCH_LOG_DIR  one log file per run (default ~/.local/state/facebatch), kept 60 days
#   FACEBATCH_LOCK     lock file that keeps two nights from overlapping (default FACEBATCH_LOG_DIR/nightly.lock)
#   FACEBATCH_PEOPLE   1 (default): after a successful index run, run jobs/cluster_people.py on OUT
#                      (new faces join their persons, the rest are clustered; 0 = index only)
#   FACEBATCH_PEOPLE_ARGS  more options for jobs/cluster_people.py (default none), e.g.
#                      "--labels s3://index/labels.csv"
#   RAY_BIN            the ray CLI (default: `ray` on PATH)
#   FACEBATCH_PYTHON   a Python with the ray package (default: the python next to RAY_BIN)
# Ray token authentication (Ray >= 2.52; Ray 2.61 turns it on for every cluster): export
# RAY_AUTH_MODE=token and give the cluster's token as ~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or
# RAY_AUTH_TOKEN; `ray job submit` and the status checks below send it.
#
# Exit status: 0 the run succeeded; 1 the Ray job failed, was stopped or could not be submitted;
# 2 bad settings; 75 skipped, because the previous night still holds the lock or still runs on the cluster.
# A failed night needs no clean-up: the next run finishes or discards what it staged and processes
# everything not yet indexed.
set -euo pipefail

die() { echo "nightly-index: $*" >&2; exit 2; }

[[ -n "${FACEBATCH_SOURCE:-}" ]] || die "set FACEBATCH_SOURCE (the archive to index, e.g. s3://bucket/prefix/)"
[[ -n "${FACEBATCH_OUT:-}" ]] || die "set FACEBATCH_OUT (the output root, e.g. s3://bucket/facebatch/)"

export RAY_ADDRESS="${RAY_ADDRESS:-http://127.0.0.1:8265}"
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="${FACEBATCH_REPO:-$(cd "$SCRIPT_DIR/../.." && pwd)}"
LOG_DIR="${FACEBATCH_LOG_DIR:-$HOME/.local/state/facebatch}"
LOCK_FILE="${FACEBATCH_LOCK:-$LOG_DIR/nightly.lock}"
RAY_BIN="${RAY_BIN:-ray}"
read -r -a EXTRA_ARGS <<< "${FACEBATCH_ARGS:---device cuda --num-actors 1 --max-actors 4}"
read -r -a PEOPLE_ARGS <<< "${FACEBATCH_PEOPLE_ARGS:-}"
RUN_PEOPLE="${FACEBATCH_PEOPLE:-1}"
[[ "$RUN_PEOPLE" == 0 || "$RUN_PEOPLE" == 1 ]] || die "FACEBATCH_PEOPLE must be 0 or 1, got $RUN_PEOPLE"

command -v "$RAY_BIN" > /dev/null || die "ray CLI not found ($RAY_BIN); install ray[default]==2.60.0 or set RAY_BIN"
PYTHON_BIN="${FACEBATCH_PYTHON:-$(dirname "$(command -v "$RAY_BIN")")/python}"
[[ -x "$PYTHON_BIN" ]] || PYTHON_BIN=python3
[[ -f "$REPO_DIR/jobs/index_archive.py" ]] || die "no facebatch checkout at $REPO_DIR (set FACEBATCH_REPO)"

mkdir -p "$LOG_DIR"
SUBMISSION_ID="facebatch-nightly-$(date -u +%Y%m%dT%H%M%SZ)"
LOG_FILE="$LOG_DIR/$SUBMISSION_ID.log"
# Everything below goes to the run's log file and to stdout (which cron mails, if configured).
# Started before the lock is taken, so that tee does not inherit (and hold) the lock's descriptor.
exec > >(tee -a "$LOG_FILE") 2>&1
find "$LOG_DIR" -maxdepth 1 -name 'facebatch-nightly-*.log' -mtime +60 -delete || true

log() { echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) nightly-index: $*"; }

# One lock for the whole run, held by fd 9 until this script exits (also on kill -9: the kernel
# releases flock locks with the file descriptor). Children get `9>&-` so none can keep it alive.
exec 9>> "$LOCK_FILE"
if ! flock --nonblock 9; then
    log "skipped: $LOCK_FILE is held by a previous run that is still going"
    exit 75
fi

# Talks to the job API with the Python SDK: stable statuses instead of parsing CLI output.
#   active PREFIX -> prints the submission IDs with PREFIX that are PENDING or RUNNING
#   wait ID       -> waits until job ID ends; prints its status; exit 0 SUCCEEDED, 1 otherwise, 3 no such job
# shellcheck disable=SC2016
STATUS_PY='
import os, sys, time
from ray.job_submission import JobStatus, JobSubmissionClient

client = JobSubmissionClient(os.environ["RAY_ADDRESS"])
command, arg = sys.argv[1], sys.argv[2]
if command == "active":
    for job in client.list_jobs():
        if (job.submission_id or "").startswith(arg) and not job.status.is_terminal():
            print(job.submission_id)
    sys.exit(0)
errors = 0
while True:
    try:
        info = client.get_job_info(arg)
    except RuntimeError as exc:
        if "does not exist" in str(exc) or "404" in str(exc):
            print("no such job:", exc)
            sys.exit(3)
        raise
    except Exception as exc:  # a restarting dashboard must not turn a good run into a failed night
        errors += 1
        if errors > 20:
            raise
        print("status check failed, retrying:", exc, flush=True)
        time.sleep(30)
        continue
    errors = 0
    if info.status.is_terminal():
        break
    time.sleep(30)
print(info.status.value, info.message or "")
sys.exit(0 if info.status == JobStatus.SUCCEEDED else 1)
'

log "run $SUBMISSION_ID: $FACEBATCH_SOURCE -> $FACEBATCH_OUT on $RAY_ADDRESS (log $LOG_FILE)"

# The lock covers this host only. A previous night whose script died (reboot) may still run on the
# cluster, and two runs on the same OUT would each discard the other's staged files as leftovers.
active="$("$PYTHON_BIN" -c "$STATUS_PY" active facebatch-nightly- 9>&-)" || { log "cannot reach the job API at $RAY_ADDRESS"; exit 1; }
if [[ -n "$active" ]]; then
    log "skipped: a previous run is still active on the cluster: $active"
    exit 75
fi

# `ray job submit` waits and streams the driver's log; it exits 1 when the job FAILED but 0 when it
# was STOPPED, and non-zero when the log stream breaks while the job goes on. So its exit status is
# only logged, and the job's final status, polled below, decides this script's.
# The working directory is uploaded (without .gitignore'd files and the excludes below) and put first
# on PYTHONPATH of the driver and the workers, so the checkout's facebatch code runs everywhere.
submit_rc=0
"$RAY_BIN" job submit \
    --address "$RAY_ADDRESS" \
    --submission-id "$SUBMISSION_ID" \
    --working-dir "$REPO_DIR" \
    --runtime-env-json '{"excludes": [".git", "tests", "bench", "infra", "data"]}' \
    -- python jobs/index_archive.py "$FACEBATCH_SOURCE" --out "$FACEBATCH_OUT" "${EXTRA_ARGS[@]}" \
    9>&- || submit_rc=$?
log "ray job submit exited with $submit_rc"

# final_status ID SUBMIT_RC: waits for the job's final status; returns 0 when it succeeded.
final_status() {
    local status_rc=0 final
    final="$("$PYTHON_BIN" -c "$STATUS_PY" wait "$1" 9>&-)" || status_rc=$?
    log "final status of $1: $final"
    case "$status_rc" in
        0) return 0 ;;
        3) log "the job was never created (ray job submit exited with $2)"; return 1 ;;
        *) log "failed; see the log above or: ray job logs $1. Rerunning is safe (incremental)."; return 1 ;;
    esac
}

final_status "$SUBMISSION_ID" "$submit_rc" || exit 1
log "index run succeeded; its run record is OUT/_runs/<run_id>.json"
[[ "$RUN_PEOPLE" == 1 ]] || exit 0

# People: the faces that are new tonight join their persons (or form new ones), and the search
# index is rebuilt. Same working directory, same lock, a submission of its own.
submit_rc=0
"$RAY_BIN" job submit \
    --address "$RAY_ADDRESS" \
    --submission-id "$SUBMISSION_ID-people" \
    --working-dir "$REPO_DIR" \
    --runtime-env-json '{"excludes": [".git", "tests", "bench", "infra", "data"]}' \
    -- python jobs/cluster_people.py "$FACEBATCH_OUT" "${PEOPLE_ARGS[@]}" \
    9>&- || submit_rc=$?
log "ray job submit (people) exited with $submit_rc"
final_status "$SUBMISSION_ID-people" "$submit_rc" || exit 1
log "people run succeeded; its run record is OUT/_runs/people-<run_id>.json"
exit 0
