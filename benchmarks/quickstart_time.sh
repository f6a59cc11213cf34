#!/usr/bin/env bash
# Wall time of the README's quickstart as a new user meets it: a clean clone of this repository's HEAD, the README's
# install, an empty cache (so the toy target is built), then `specdistill run experiment=quickstart`, timed apart.
#
#     benchmarks/quickstart_time.sh [work folder]      # prints the install time, the quickstart time and its report
#
# Reuses nothing from this checkout but the committed tree; the pip cache makes the install itself faster than a
# first-ever install (the install is not part of the quickstart's time).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$(mktemp -d /tmp/quickstart.XXXXXX)}"
mkdir -p "$work"
git clone --quiet "$repo" "$work/specdistill"
cd "$work/specdistill"
git log -1 --format='commit %h %s'
start=$(date +%s)
python3 -m venv .venv && . .venv/bin/activate
pip install --quiet torch==2.13.0 2>&1 | grep -v '^WARNING' || true
pip install --quiet -e ".[dev,deepspeed]" 2>&1 | grep -v '^WARNING' || true
echo "install: $(( $(date +%s) - start )) s"

export SPECDISTILL_CACHE="$work/cache" WANDB_MODE=offline HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
start=$(date +%s.%N)
specdistill run experiment=quickstart out_dir="$work/run" 2>&1 | tee "$work/quickstart.log" | grep -v '%|' || true
end=$(date +%s.%N)
python3 -c "import sys; s = float(sys.argv[2]) - float(sys.argv[1]); print(f'quickstart (toy build included): {s:.0f} s = {int(s // 60)} min {s % 60:02.0f} s')" "$start" "$end"
echo "machine: $(nproc) cores, $(free -g | awk '/Mem/ {print $2}') GiB; $(date -u +%F)"
