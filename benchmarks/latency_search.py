"""A latency target's search timed the earlier way and the current way, side by side.

``prune(latency_reduction=0.4)`` times the whole pruned network against the original in
every round of its search and once more to confirm (random scores, a -40% target). *Earlier*: each round 5 pairs, each
network's time in a pair the median of 2 untimed and 7 timed passes; the confirmation 9
such pairs. *Current* (``compare_networks``): each round 15 pairs of one pass of each
after 2 untimed passes; the confirmation 27 pairs. Both read process CPU time and share
one cached latency table, so only the search differs. Every prune runs in a fresh
process, the two ways alternating; right after it, the same process times the pruned
network against the original for longer (41 pairs, median of 3 passes each): the
reference the prune's own figure (``measured``) and verdict (``hit``) are compared with.

    python benchmarks/latency_search.py --csv benchmarks/results/latency_search.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from cdprune import prune
from cdprune.measure.latency import LatencySettings, cpu_model, measure_network, time_calls
from cdprune.models import create_model
from cdprune.pruning import by_latency

CASES = {  # name: (model, input size, batch)
    "resnet56b-b64": ("resnet56b", 32, 64),
    "resnet50-b1": ("resnet50", 224, 1),
}


def earlier_compare(base, pruned, example, settings, rounds=5):
    """The earlier whole-network comparison: per pair, each network's median of
    ``settings.warmup`` untimed and ``settings.repeats`` timed passes."""
    tb, tp = [], []
    for _ in range(rounds):
        tb.append(measure_network(base, example, settings))
        tp.append(measure_network(pruned, example, settings))
    return (statistics.median(tb), statistics.median(tp),
            statistics.median(p / b for b, p in zip(tb, tp)))


def setup(name: str, threads: int, cache: str):
    model_name, size, batch = CASES[name]
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    model = create_model(model_name).eval()
    gen = torch.Generator().manual_seed(0)
    scores = {n: torch.rand(m.out_channels, generator=gen) for n, m in model.named_modules()
              if isinstance(m, torch.nn.Conv2d)}
    settings = LatencySettings(batch_size=batch, threads=threads, cache_dir=cache)
    return model, scores, torch.randn(1, 3, size, size), settings


def prune_one(name: str, which: str, threads: int, cache: str) -> None:
    """One latency-target prune in this (fresh) process, then the reference timing of
    its result; prints what it took and said, as JSON."""
    model, scores, example, settings = setup(name, threads, cache)
    if which == "earlier":
        settings.search_rounds, settings.confirm_rounds = 5, 9
        by_latency.compare_networks = earlier_compare
    start, cpu = time.perf_counter(), time.process_time()
    result = prune(model, scores, example_inputs=example, latency_reduction=0.4,
                   latency=settings)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    info = result.extra["latency"]
    ref = reference(model, result.model.eval(), example, settings.batch_size)
    print(json.dumps({"seconds": seconds, "cpu": cpu, "measured": info["measured"],
                      "hit": info["hit"], "rounds": len(info["rounds"]), "reference": ref}))


def reference(model, pruned, example, batch: int) -> float:
    """The pruned network's latency reduction timed at length: 41 alternating pairs,
    each network's time the median of 3 passes."""
    x = example.expand(batch, *example.shape[1:]).contiguous()
    ratios = []
    with torch.inference_mode():
        for _ in range(41):
            tb, tp = time_calls([lambda: model(x), lambda: pruned(x)], warmup=1, repeats=3,
                                clock="cpu")
            ratios.append(statistics.median(tp) / statistics.median(tb))
    return 1 - statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prunes", type=int, default=2, help="fresh-process prunes of each way")
    parser.add_argument("--csv", help="also write the rows to this CSV file")
    parser.add_argument("--one", nargs=3, metavar=("CASE", "WAY", "CACHE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return prune_one(*args.one[:2], args.threads, args.one[2])
    print(f"# {cpu_model()}, torch {torch.__version__}, {args.threads} threads; CPU time",
          flush=True)
    header = ["case", "way", "prune", "prune_s", "prune_cpu_s", "rounds", "measured", "hit",
              "reference", "reference_hit", "load_avg"]
    print(",".join(header), flush=True)
    fh = open(args.csv, "w", newline="") if args.csv else None
    writer = csv.writer(fh) if fh else None
    if writer:
        writer.writerow(header)
    for name in args.cases:
        with tempfile.TemporaryDirectory() as tmp:
            cache = os.path.join(tmp, "cache")
            model, scores, example, settings = setup(name, args.threads, cache)
            # The table and its width multiple, built once outside the timing and shared.
            timed = by_latency.LatencyModel(model, example, settings)
            timed.round_to(min(m.out_channels for n, m in model.named_modules() if n in scores))
            for k in range(args.prunes):
                for which in ("earlier", "current"):
                    out = subprocess.run(
                        [sys.executable, __file__, "--threads", str(args.threads), "--one",
                         name, which, cache], check=True, capture_output=True,
                        text=True).stdout
                    facts = json.loads(out.strip().splitlines()[-1])
                    ref = facts["reference"]
                    row = [name, which, k, f"{facts['seconds']:.1f}", f"{facts['cpu']:.1f}",
                           facts["rounds"], f"{facts['measured']:.3f}", facts["hit"],
                           f"{ref:.3f}", abs(ref - 0.4) <= 0.02,
                           " ".join(f"{a:.2f}" for a in os.getloadavg())]
                    print(",".join(str(v) for v in row), flush=True)
                    if writer:
                        writer.writerow(row)
                        fh.flush()
    if fh:
        fh.close()


if __name__ == "__main__":
    main()
