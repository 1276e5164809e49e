#!/usr/bin/env bash
# ferry's group fan-out as a ratio of this host's bare-socket fan-out floor.
#
# Runs `ferry-bench group` (a spawned server) and `ferry-bench floor` (bare
# sockets, the same member count and message count) alternately ROUNDS times,
# so that both see the same machine conditions, and prints each pair and the
# ratio of the medians of their per-message p100 (time until the last member
# has the message). Needs python3 for the JSON.
#
#   bench/group-vs-floor.sh [MEMBERS] [MESSAGES] [ROUNDS]     (defaults 10000 20 3)
#
# FERRY_BENCH overrides the ferry-bench binary (default: the release build in
# $CARGO_TARGET_DIR or ./target).
set -euo pipefail
members=${1:-10000}
messages=${2:-20}
rounds=${3:-3}
bench=${FERRY_BENCH:-${CARGO_TARGET_DIR:-target}/release/ferry-bench}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

for round in $(seq "$rounds"); do
  "$bench" group --spawn --members "$members" --messages "$messages" --interval-ms 500 \
    --per-process 10000 --json "$out/group-$round.json" >"$out/group-$round.txt"
  "$bench" floor --n 2000 --users 2000 --duration 3 --members "$members" --messages "$messages" \
    --json "$out/floor-$round.json" >"$out/floor-$round.txt"
done

python3 - "$out" "$rounds" <<'EOF'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def first(path):
    return json.load(open(path))["results"][0]
groups, floors = [], []
print(f"{'round':>5} {'ferry p100 median':>18} {'floor p100 median':>18} {'ratio':>6}")
for r in range(1, rounds + 1):
    g = first(f"{out}/group-{r}.json")["p100_median_us"] / 1000
    f = first(f"{out}/floor-{r}.json")["fanout"]["p100_median_us"] / 1000
    groups.append(g)
    floors.append(f)
    print(f"{r:>5} {g:>16.1f}ms {f:>16.1f}ms {g / f:>6.2f}")
g, f = statistics.median(groups), statistics.median(floors)
print(f"median {g:>15.1f}ms {f:>16.1f}ms {g / f:>6.2f}")
EOF
