#!/usr/bin/env bash
# Fill one leaderboard directory with N one-thread `erasekit bench` processes side by side (default: one per core).
#
#   scripts/bench_shards.sh [-n N] -- ERASEKIT_BENCH_ARGS...      (without --shard and --threads)
#
# Needs the venv of scripts/setup.sh. Each process runs its shard (--shard K/N --threads 1) again until the bench reports no missing cell. A shard
# that finishes its half of the dev sweep before the other can only run its paper rows: it waits and retries, and
# runs the tuned rows once the other half is in. A shard ends when a pass left cells missing, and no cell was
# added anywhere since that pass began while no other shard is busy (so a cell that keeps failing is not retried
# forever). Then the page is written once more from everything finished (--table-only).
# Logs: OUT.logs/shard-K.log (beside OUT: the bench refuses a directory holding anything but its own files).
set -uo pipefail
bench="$(dirname "$0")/../.venv/bin/erasekit"
n=$(nproc)
if [[ "${1:-}" == "-n" ]]; then n=$2; shift 2; fi
if [[ "${1:-}" != "--" ]]; then
    echo "usage: scripts/bench_shards.sh [-n N] -- ERASEKIT_BENCH_ARGS..." >&2
    exit 2
fi
shift
out=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[i]}" in
        --out) out=${args[i + 1]:-} ;;
        --out=*) out=${args[i]#--out=} ;;
        --shard* | --threads* | --table-only)
            echo "bench_shards.sh sets --shard and --threads itself; drop ${args[i]}" >&2
            exit 2
            ;;
        --overwrite)
            echo "bench_shards.sh retries each shard, and a retry with --overwrite would delete the other shards' cells: delete --out first instead" >&2
            exit 2
            ;;
    esac
done
if [[ -z "$out" ]]; then
    echo "bench_shards.sh: the bench arguments need --out DIR" >&2
    exit 2
fi
logs="${out%/}.logs"
mkdir -p "$logs"
rm -f "$logs"/.running-*

cells() { find "$out/cells" "$out/attacks" -name '*.json' 2>/dev/null | wc -l; }

shard() {
    local k=$1 before
    shift
    while true; do
        before=$(cells)
        touch "$logs/.running-$k"
        "$bench" bench "$@" --shard "$k/$n" --threads 1 >>"$logs/shard-$k.log" 2>&1
        local rc=$?
        rm -f "$logs/.running-$k"
        ((rc == 0)) && return 0
        ((rc == 1)) || return "$rc" # 1: cells missing; anything else is an error the bench printed one line for
        sleep 30
        # no cell added anywhere since this pass began, and no other shard busy: nothing more will come
        if (($(cells) == before)) && ! compgen -G "$logs/.running-*" >/dev/null; then
            echo "shard $k/$n: cells still missing and nothing left to wait for (see $logs/shard-$k.log)" >&2
            return 1
        fi
    done
}

for ((k = 1; k <= n; k++)); do
    shard "$k" "${args[@]}" &
done
status=0
for job in $(jobs -p); do wait "$job" || status=1; done
"$bench" bench "${args[@]}" --table-only
exit $status
