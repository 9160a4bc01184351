#!/usr/bin/env bash
# Milestone-1 engine figures: start-up, plan and deploy at scale, parallelism.
#
#   bash bench/engine.sh            # builds release, prints a table
#
# Targets (issue #2) and the Unfurl 1.2.0 figures they beat are printed
# beside each measurement. Every job is a local `true`/`sleep`; nothing
# listens on the network.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet -p commons-cli
B="$PWD/target/release/commons"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export COMMONS_HOME="$work/home"
# The bench starts `commons serve` itself, where and when it measures it.
export COMMONS_DAEMON=off
# Unsandboxed, as the README's figures (as root the default is the sandbox).
export COMMONS_SANDBOX=${COMMONS_SANDBOX:-0}

gen() { # gen KIND N NAME -> a blueprint directory
  local kind=$1 n=$2 name=$3 dir="$work/$3"
  mkdir -p "$dir"
  python3 - "$kind" "$n" "$name" "$dir/commons.yaml" <<'PY'
import sys
kind, n, name, path = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
with open(path, "w") as f:
    f.write(f"name: {name}\ncomponents:\n")
    for i in range(n):
        if kind == "chain" and i > 0:
            f.write(f"  c{i}: {{ job: \"true\", after: [c{i-1}] }}\n")
        elif kind == "sleep":
            f.write(f"  c{i}: {{ job: \"sleep 1\" }}\n")
        else:
            f.write(f"  c{i}: {{ job: \"true\" }}\n")
PY
  echo "$dir"
}

# secs CMD... : wall-clock seconds of one run (stdout/stderr discarded).
secs() {
  local t0 t1
  t0=$(date +%s%N)
  "$@" >/dev/null 2>&1 || { echo "command failed: $*" >&2; exit 1; }
  t1=$(date +%s%N)
  python3 -c "print(f'{($t1 - $t0) / 1e9:.3f}')"
}

# median of N runs of CMD...
median() {
  local n=$1; shift
  local all=()
  for _ in $(seq "$n"); do all+=("$(secs "$@")"); done
  printf '%s\n' "${all[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'
}

row() { printf '%-48s %9s s   target %-7s  unfurl 1.2.0: %s\n' "$1" "$2" "$3" "$4"; }

ind10k=$(gen ind 10000 ind10k)
ind50k=$(gen ind 50000 ind50k)
chain10k=$(gen chain 10000 chain10k)
ind1k=$(gen ind 1000 ind1k)
sleep5=$(gen sleep 5 sleep5)

echo "commons $("$B" --version | cut -d' ' -f2), $(nproc) cores"
row "commons --version (median of 21)" "$(median 21 "$B" --version)" "0.020" "1.4 s"
row "plan 10,000 independent jobs (median of 5)" "$(median 5 "$B" plan "$ind10k")" "1.0" "15 s for 1,000"
row "plan 50,000 independent jobs (median of 3)" "$(median 3 "$B" plan "$ind50k")" "2.0" "-"
row "plan 10,000-deep after: chain (median of 5)" "$(median 5 "$B" plan "$chain10k")" "1.0" "crashes at 200"
row "deploy 1,000 independent jobs" "$(secs "$B" deploy "$ind1k")" "5.0" "39 s"
row "no-op redeploy of the 1,000 (median of 5)" "$(median 5 "$B" deploy "$ind1k")" "1.0" "-"
row "deploy 5 independent 'sleep 1' jobs" "$(secs "$B" deploy "$sleep5")" "1.5" "5 s (serial)"
row "deploy 10,000-deep chain of 'true'" "$(secs "$B" deploy "$chain10k")" "-" "crashes"
"$B" destroy ind1k >/dev/null 2>&1
"$B" destroy sleep5 >/dev/null 2>&1
"$B" destroy chain10k >/dev/null 2>&1
