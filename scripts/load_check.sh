#!/usr/bin/env bash
# Run CI (or the demo) on a busy machine: four CPU-bound processes spin beside it for
# the whole run, as other work or other CI jobs would on a shared 2-core machine.
#   bash scripts/load_check.sh          # bash .ci/run under load
#   bash scripts/load_check.sh demo     # bash scripts/demo.sh under load (fresh output)
#   LOAD_PROCS=8 bash scripts/load_check.sh
# Exits with the command's status; the load processes are stopped however it ends.
set -euo pipefail
cd "$(dirname "$0")/.."
procs=${LOAD_PROCS:-4}
pids=()
stop_load() { kill "${pids[@]}" 2>/dev/null || true; wait "${pids[@]}" 2>/dev/null || true; }
trap stop_load EXIT
for _ in $(seq "$procs"); do
  python3 -c "while True: pass" &
  pids+=($!)
done
echo "load check: $procs CPU-bound processes on $(nproc) cores (pids ${pids[*]})"
start=$(date +%s)
case "${1:-ci}" in
  ci) cmd=(bash .ci/run) ;;
  demo) rm -rf out/example; cmd=(bash scripts/demo.sh) ;;
  *) echo "usage: $0 [ci|demo]" >&2; exit 2 ;;
esac
status=0
"${cmd[@]}" || status=$?
echo "load check: '${cmd[*]}' exited $status after $(( $(date +%s) - start )) s under $procs load processes"
exit "$status"
