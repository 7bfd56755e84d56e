#!/usr/bin/env bash
# The main job (`legend-hf annotate`, no arguments) of two checkouts side by side: interleaved rounds, the
# datasets cache emptied before each run, wall time per run. Usage (from the repository root):
#   git worktree add /tmp/base 783f0b2        # 0.2
#   bash bench/main_job.sh /tmp/base . 2      # old checkout, new checkout, rounds
set -euo pipefail
old=$(realpath "$1") new=$(realpath "$2") rounds=${3:-2}
python=${PYTHON:-$(command -v python)}
out=$(mktemp -d)
for round in $(seq "$rounds"); do
  for which in old new; do
    checkout=$old; [ "$which" = new ] && checkout=$new
    rm -rf ~/.cache/huggingface/datasets "$out/$which" && mkdir -p "$out/$which"
    start=$(date +%s.%N)
    (cd "$out/$which" && PYTHONPATH=$checkout HF_HUB_OFFLINE=1 "$python" -m legend_hf.cli annotate > ../$which-$round.log 2>&1)
    end=$(date +%s.%N)
    echo "$which round $round: $(echo "$end - $start" | bc) s wall, load $(cut -d' ' -f1 /proc/loadavg), $(grep -om1 'in [0-9]\+ s' "$out/$which-$round.log") to annotate"
  done
done
echo "logs: $out"
