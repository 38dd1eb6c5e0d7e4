#!/usr/bin/env bash
# Runs the benchmark suite and writes its outputs under benchmarks/results/.
# Usage: bash benchmarks/run_all.sh [SHARED_DIR]   (default ../shared)
# Each script measures the things it compares side by side in one run; run this on an
# otherwise idle machine, since the timings share its cores.
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${1:-../shared}
out=benchmarks/results
mkdir -p "$out"
threads=${THREADS:-2}
{ echo "# $(date -u +%Y-%m-%d) $(uname -m), $(nproc) cores, $(python3 -c 'import importlib.metadata as m; print("torch", m.version("torch"), "torch-pruning", m.version("torch-pruning"))')"; } > "$out/machine.txt"
python3 benchmarks/stats_overhead.py --threads 1 2 | tee "$out/stats_overhead.csv"
python3 benchmarks/stats_memory.py --threads 1 | tee "$out/stats_memory.csv"
python3 benchmarks/prune_time.py --threads "$threads" | tee "$out/prune_time.csv"
python3 benchmarks/latency_table.py --threads "$threads" --csv "$out/latency_table.csv"
python3 benchmarks/stats_scaling.py --threads "$threads" | tee "$out/stats_scaling.csv"
if [ -d "$shared/weights/cifar10" ] && [ -d "$shared/data/cifar-10-batches-py" ]; then
  python3 benchmarks/speedup.py --threads "$threads" --weights-dir "$shared/weights/cifar10" \
      --data-root "$shared/data" --csv "$out/speedup.csv"
  python3 benchmarks/check_pretrained.py --weights-dir "$shared/weights/cifar10" \
      --data-root "$shared/data"
  python3 benchmarks/train_speed.py --threads "$threads" --data-root "$shared/data" \
      --csv "$out/train_speed.csv"
else
  echo "skipping speedup.py and check_pretrained.py: no $shared/weights or $shared/data"
fi
