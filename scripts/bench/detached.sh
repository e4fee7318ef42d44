#!/usr/bin/env bash
# Runs a benchmark longer than one device call (10 min) on the GPU machine: the first call starts it
# in its own process session (it outlives the call while the machine stays held, i.e. while the next
# call follows within the machine's idle time); every call, the first included, then waits up to
# WAIT seconds, prints the log's tail and packs what the run wrote so far into $OUT/detached.tar.gz.
#   scripts/bench/detached.sh start 'OUT=$DETACHED_OUT MODEL=30b-a3b scripts/bench_gpu.sh 32'
#   scripts/bench/detached.sh wait          (the next calls)
# The run writes its results under $DETACHED_OUT (/tmp/qsens-detached/out); its exit status lands in
# /tmp/qsens-detached/rc.
set -uo pipefail
cd "$(dirname "$0")/../.."
D=/tmp/qsens-detached
export DETACHED_OUT=$D/out
WAIT=${WAIT:-560}
case "${1:-}" in
  start)
    [ -e $D/pid ] && { echo "a detached run is already there: $D"; exit 2; }
    mkdir -p $DETACHED_OUT
    setsid bash -c "$2; echo \$? > $D/rc" > $D/log 2>&1 < /dev/null &
    echo $! > $D/pid
    echo "started: $2 (pid $(cat $D/pid))" ;;
  wait) [ -e $D/pid ] || { echo "no detached run on this machine (a fresh one?)"; exit 2; } ;;
  *) echo "usage: detached.sh start CMD | wait"; exit 2 ;;
esac
t0=$(date +%s)
while [ ! -e $D/rc ] && [ $(( $(date +%s) - t0 )) -lt "$WAIT" ]; do sleep 5; done
tail -60 $D/log
tar -C $D -czf "${OUT:-/tmp}/detached.tar.gz" log out $( [ -e $D/rc ] && echo rc )
if [ -e $D/rc ]; then echo "detached run finished, rc=$(cat $D/rc)"; exit "$(cat $D/rc)"; fi
echo "detached run still going after ${WAIT}s: call 'scripts/bench/detached.sh wait' again now"
exit 3
