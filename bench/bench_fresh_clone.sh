#!/usr/bin/env bash
# Fresh-clone install (and optionally test) time, issue 33: clones this repository's HEAD into a temporary folder and
# runs the README's set-up there with empty caches (its own XDG_CACHE_HOME and pip cache: nothing of ~/.cache is
# reused; the network registry and the machine's own wheel folders are), printing each install step's time and the
# total. With --tests it then runs the README's test command in the clone and prints its time too.
#
#     bash bench/bench_fresh_clone.sh [--tests] [--keep]
#
# Prints figures; asserts nothing. Targets (issue 33): install <= 5 min, tests <= 15 min on the 2-core machine.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
tests=0 keep=0
for a in "$@"; do
  case "$a" in --tests) tests=1 ;; --keep) keep=1 ;; *) echo "usage: $0 [--tests] [--keep]" >&2; exit 2 ;; esac
done
work="$(mktemp -d /tmp/dxagent-fresh.XXXXXX)"
[ "$keep" -eq 1 ] || trap 'rm -rf "$work"' EXIT
git clone -q "$root" "$work/repo"
[ -e "$root/../shared" ] && [ ! -e "$work/shared" ] && ln -s "$(cd "$root/../shared" && pwd)" "$work/shared"
cd "$work/repo"
export XDG_CACHE_HOME="$work/cache" PIP_CACHE_DIR="$work/cache/pip"
t0=$SECONDS
rc=0
bash scripts/install.sh > "$work/install.log" 2>&1 || rc=$?
install_s=$((SECONDS - t0))
grep '^\[install\]' "$work/install.log" | grep -v 'still working' || true
if [ "$rc" -ne 0 ]; then tail -n 20 "$work/install.log"; echo "install failed (exit $rc)"; exit "$rc"; fi
echo "fresh-clone install: ${install_s} s ($(awk "BEGIN{printf \"%.1f\", $install_s/60}") min) from empty caches"
if [ "$tests" -eq 1 ]; then
  t1=$SECONDS
  bash scripts/test.sh -q -p no:cacheprovider 2>&1 | tail -n 3
  echo "test command (install already done, so this is ruff + lint-imports + pytest): $((SECONDS - t1)) s"
fi
[ "$keep" -eq 1 ] && echo "kept: $work"
