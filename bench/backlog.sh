#!/usr/bin/env bash
# Memory under a slow consumer: one process runs the metadata node, the
# bookie and the broker (as standalone does), a shared subscription's
# consumer reads about 1,000 messages/s, and one million 1 KiB messages are
# published past it. Prints the process's resident memory (the target is
# under 512 MiB) and the publish rate.
#   bench/backlog.sh [extra perf args, e.g. --messages 2000000 --batch 1]
set -euo pipefail
extra=("$@")
source "$(dirname "$0")/common.sh"
"$perf" backlog --data-dir "$dir/data" ${extra[@]+"${extra[@]}"} 2>"$dir/perf.log"
