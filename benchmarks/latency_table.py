"""Latency tables built the earlier way and the current way, side by side in one run.

*Earlier* (rebuilt here as it was): 4 x 4 widths per layer shape (25, 50, 75, 100%),
every cell a randomly initialised layer timed alone on its own random input (2 untimed
and 7 timed calls, median), and the width-multiple probe (every width within 16 of half
the heaviest layer's) timed the same way. *Current* (``LatencyTable.measure`` and
``fastest_multiple``): 3 x 3 widths (25, 50, 100%) timed interleaved per shape (1 untimed
call each, then 3 rounds over all cells, medians), layers filled with a constant rather
than initialised, one input per input width, the probe interleaved over the even widths
and the odd ones 1 mod 8. Both read process CPU time, as ``prune()`` does on the CPU. Every build runs in a
fresh process (cold kernels and caches, as a first prune on a machine), the two ways
alternating; the build's wall and CPU seconds are medians over ``--builds``.

Besides the build time, each table predicts the latency reduction of several pruned
networks (random scores, global MACs targets 30/50/70%), as ``prune()`` predicts it
(relative to the larger of the measured network and the layers' sum); the networks are
then timed whole against the original (interleaved pairs, CPU time). The mean absolute
error (``mae``) and mean signed error (``bias``, predicted minus measured) of the
predicted reduction say whether the faster table predicts as well.

    python benchmarks/latency_table.py --threads 2 --csv benchmarks/results/latency_table.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from cdprune import prune
from cdprune.measure.latency import (
    LatencySettings,
    LatencyTable,
    LayerShape,
    cpu_clock,
    cpu_model,
    fastest_multiple,
    layer_shapes,
    multiple_from_timings,
    time_calls,
)
from cdprune.models import create_model

CASES = {  # name: (model, input size, batch)
    "resnet56b-b64": ("resnet56b", 32, 64),
    "resnet56b-b1": ("resnet56b", 32, 1),
    "resnet50-b1": ("resnet50", 224, 1),
}
EARLIER_FRACTIONS = (0.25, 0.5, 0.75, 1.0)


def earlier_layer(shape: LayerShape, c_in: int, c_out: int) -> torch.nn.Module:
    """The layer as the earlier tables built it: randomly initialised."""
    if shape.kind == "linear":
        return torch.nn.Linear(c_in, c_out)
    groups = c_in if shape.kind == "dw" else shape.groups
    return torch.nn.Sequential(
        torch.nn.Conv2d(c_in, c_out, shape.kernel, shape.stride, shape.padding, shape.dilation,
                        groups=groups, bias=False), torch.nn.BatchNorm2d(c_out), torch.nn.ReLU())


def earlier_timing(shape: LayerShape, c_in: int, c_out: int, batch: int) -> float:
    """One width timed alone, as before: its own random input, 2 untimed and 7 timed
    calls, the median of process CPU time."""
    size = (*shape.spatial, c_in) if shape.kind == "linear" else (c_in, *shape.spatial)
    return cpu_clock(2, 7)(earlier_layer(shape, c_in, c_out).eval(), torch.randn(batch, *size))


def build_earlier(shapes, batch: int) -> tuple[LatencyTable, int]:
    """The earlier table: 4 x 4 widths per shape, every cell timed alone; the earlier
    probe: every output width within 16 of half the heaviest layer's, each timed alone."""
    tables = {}
    for shape in sorted(set(shapes.values()), key=LayerShape.key):
        step = shape.groups if shape.kind == "conv" else 1
        ins, outs = (sorted({max(step, round(f * full / step) * step)
                             for f in EARLIER_FRACTIONS}) for full in (shape.in_ch, shape.out_ch))
        if shape.kind == "dw":
            ins = outs
        grid = [[earlier_timing(shape, i, o, batch) if shape.kind != "dw" or i == o else None
                 for o in outs] for i in ins]
        tables[shape.key()] = {"in": ins, "out": outs, "s": grid}
    table = LatencyTable(tables, {})
    table.measured = sum(v is not None for t in tables.values() for row in t["s"] for v in row)
    heaviest = max(shapes.values(), key=lambda s: table.predict(s, s.in_ch, s.out_ch)
                   if s.kind != "linear" else -1.0)
    full = heaviest.out_ch
    seconds = {w: earlier_timing(heaviest, w if heaviest.kind == "dw" else heaviest.in_ch, w,
                                 batch)
               for w in range(max(1, full // 2 - 15), min(full, full // 2 + 16) + 1)}
    return table, multiple_from_timings(seconds)


def build(shapes, which: str, settings: LatencySettings
          ) -> tuple[LatencyTable, int, float, float]:
    """The earlier or the current table and the timed width multiple of the heaviest
    layer; returns (table, multiple, wall seconds, process CPU seconds)."""
    start, cpu = time.perf_counter(), time.process_time()
    if which == "earlier":
        table, multiple = build_earlier(shapes, settings.batch_size)
    else:
        table = LatencyTable.measure(shapes.values(), settings)
        heaviest = max(shapes.values(), key=lambda s: table.predict(s, s.in_ch, s.out_ch)
                       if s.kind != "linear" else -1.0)
        multiple = fastest_multiple(heaviest, settings)
    return table, multiple, time.perf_counter() - start, time.process_time() - cpu


def predicted_reduction(table: LatencyTable, shapes, pruned_shapes, base_s: float) -> float:
    """As ``prune()`` predicts it: the layers' predicted saving relative to the larger of
    the whole network's measured time and the layers' sum."""
    full = table.network(shapes, {})
    widths = {n: (s.in_ch, s.out_ch) for n, s in pruned_shapes.items()}
    return (full - table.network(shapes, widths)) / max(base_s, full)


def measured_reduction(base, pruned, x, repeats: int) -> float:
    with torch.inference_mode():
        tb, tp = time_calls([lambda: base(x), lambda: pruned(x)], warmup=2, repeats=repeats,
                            clock="cpu")
    return 1 - statistics.median(p / b for b, p in zip(tb, tp))


def build_one(name: str, which: str, threads: int) -> None:
    """One build in this (fresh) process; prints its seconds and multiple as JSON."""
    model_name, size, batch = CASES[name]
    torch.manual_seed(0)
    shapes = layer_shapes(create_model(model_name).eval(), torch.randn(1, 3, size, size))
    settings = LatencySettings(batch_size=batch, threads=threads, cache_dir=None)
    _, multiple, seconds, cpu = build(shapes, which, settings)
    print(json.dumps({"seconds": seconds, "cpu": cpu, "multiple": multiple}))


def run_case(name: str, threads: int, variants: int, repeats: int, builds: int) -> dict:
    model_name, size, batch = CASES[name]
    torch.manual_seed(0)
    model = create_model(model_name).eval()
    example = torch.randn(1, 3, size, size)
    shapes = layer_shapes(model, example)
    settings = LatencySettings(batch_size=batch, threads=threads, cache_dir=None)
    torch.set_num_threads(threads)
    # Every build runs in a fresh process, as the first prune on a machine does (kernels
    # and their caches cold); the two ways alternate, so that drift hits both alike.
    seconds = {"earlier": [], "current": []}
    cpu = {"earlier": [], "current": []}
    multiples = {"earlier": [], "current": []}
    for _ in range(builds):
        for which in ("earlier", "current"):
            out = subprocess.run([sys.executable, __file__, "--build-one", which, "--cases", name,
                                  "--threads", str(threads)], check=True, capture_output=True,
                                 text=True).stdout
            facts = json.loads(out.strip().splitlines()[-1])
            seconds[which].append(facts["seconds"])
            cpu[which].append(facts["cpu"])
            multiples[which].append(str(facts["multiple"]))
    tables = {which: build(shapes, which, settings)[0] for which in ("earlier", "current")}
    errors = {k: [] for k in tables}
    x = torch.randn(batch, 3, size, size)
    with torch.inference_mode():
        (base_times,) = time_calls([lambda: model(x)], warmup=2, repeats=7, clock="cpu")
    base_s = statistics.median(base_times)
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    for v in range(variants):
        gen = torch.Generator().manual_seed(v)
        scores = {n: torch.rand(model.get_submodule(n).out_channels, generator=gen)
                  for n in convs}
        target = (0.3, 0.5, 0.7)[v % 3]
        pruned = prune(model, scores, example_inputs=example, macs_reduction=target).model.eval()
        measured = measured_reduction(model, pruned, x, repeats)
        pruned_shapes = layer_shapes(pruned, example)
        for k, table in tables.items():
            errors[k].append(predicted_reduction(table, shapes, pruned_shapes, base_s) - measured)
    row = {"case": name, "threads": threads, "shapes": len(set(shapes.values()))}
    for k in ("earlier", "current"):
        row[f"{k}_cells"] = tables[k].measured
        row[f"{k}_build_s"] = statistics.median(seconds[k])
        row[f"{k}_build_cpu_s"] = statistics.median(cpu[k])
        row[f"{k}_multiple"] = "/".join(multiples[k])
        row[f"{k}_mae"] = statistics.fmean(abs(e) for e in errors[k])
        row[f"{k}_bias"] = statistics.fmean(errors[k])
    row["build_speedup"] = row["earlier_build_s"] / row["current_build_s"]
    row["build_speedup_cpu"] = row["earlier_build_cpu_s"] / row["current_build_cpu_s"]
    row["variants"] = variants
    row["load_avg"] = " ".join(f"{a:.2f}" for a in os.getloadavg())
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", type=int, default=6,
                        help="pruned networks each table predicts")
    parser.add_argument("--repeats", type=int, default=7,
                        help="interleaved pairs timing each pruned network")
    parser.add_argument("--builds", type=int, default=3,
                        help="fresh-process builds of each table (median)")
    parser.add_argument("--csv", help="also write the rows to this CSV file")
    parser.add_argument("--build-one", choices=("earlier", "current"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_one:
        torch.set_num_threads(args.threads)
        return build_one(args.cases[0], args.build_one, args.threads)
    print(f"# {cpu_model()} ({platform.machine()}), torch {torch.__version__}, "
          f"{args.threads} threads; CPU time", flush=True)
    writer = None
    fh = open(args.csv, "w", newline="") if args.csv else None
    for name in args.cases:
        row = run_case(name, args.threads, args.variants, args.repeats, args.builds)
        if writer is None:
            print(",".join(row), flush=True)
            if fh:
                writer = csv.DictWriter(fh, fieldnames=list(row))
                writer.writeheader()
        print(",".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()),
              flush=True)
        if writer:
            writer.writerow({k: f"{v:.4f}" if isinstance(v, float) else v
                             for k, v in row.items()})
            fh.flush()
    if fh:
        fh.close()


if __name__ == "__main__":
    main()
