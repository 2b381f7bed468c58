#!/bin/sh
# Run each fuzz harness for a bounded time (not part of the test suite).
#
#   tests/fuzz/run.sh [SECONDS] [--keep] [--fallback]
#
# SECONDS per harness (default 60).  Each harness starts from its kept corpus
# (tests/fuzz/corpus/NAME) and works in a scratch directory, so the kept corpus
# only changes with --keep: then the kept inputs and the new ones are
# minimised together (libFuzzer -set_cover_merge, edges only) and the result
# replaces the kept non-seed inputs, which keeps it to a few dozen files.
# Without atheris (pip install atheris) or with --fallback, a plain random
# mutation loop runs instead (no coverage feedback, no --keep).
# Crashes are written as crash-<sha1> in the current directory; exit status 1.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
seconds=60
keep=0
fallback=""
for arg in "$@"; do
    case $arg in
        --keep) keep=1 ;;
        --fallback) fallback=--fallback ;;
        [0-9]*) seconds=$arg ;;
        *) echo "usage: $0 [SECONDS] [--keep] [--fallback]" >&2; exit 2 ;;
    esac
done
if [ -z "$fallback" ] && ! python3 -c "import atheris" 2>/dev/null; then
    echo "atheris is not installed: running the plain mutation loop" >&2
    fallback=--fallback
fi

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
status=0
for name in codec sxp; do
    kept="$here/corpus/$name"
    work="$scratch/$name"
    mkdir -p "$work"
    echo "== fuzz_$name for $seconds s"
    if [ -n "$fallback" ]; then
        python3 "$here/fuzz_$name.py" --fallback -max_total_time="$seconds" "$kept" || status=1
        continue
    fi
    python3 "$here/fuzz_$name.py" -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=65536 \
        -print_final_stats=1 "$work" "$kept" 2>"$scratch/$name.log" || status=1
    grep -E "^(stat::number_of_executed_units|stat::peak_rss_mb|#[0-9]+ *DONE)" "$scratch/$name.log" || true
    grep -A30 -E "==ERROR|Uncaught Python exception" "$scratch/$name.log" || true
    if [ "$keep" = 1 ] && [ "$status" = 0 ]; then
        merged="$scratch/$name.merged"
        mkdir -p "$merged"
        python3 "$here/fuzz_$name.py" -set_cover_merge=1 -use_counters=0 "$merged" "$kept" "$work" \
            2>"$scratch/$name.merge.log"
        for seed in "$kept"/seed-*; do
            sum=$(sha1sum < "$seed" | cut -d' ' -f1)
            rm -f "$merged/$sum"
        done
        find "$kept" -type f ! -name 'seed-*' -delete
        cp "$merged"/* "$kept"/ 2>/dev/null || true
        echo "kept corpus: $(ls "$kept" | wc -l) files"
    fi
done
exit $status
