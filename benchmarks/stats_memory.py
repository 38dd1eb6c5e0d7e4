"""Peak memory and file size of image-document statistics: every vector kept vs streamed.

Each measurement runs in a fresh subprocess, so its peak resident memory (ru_maxrss) is
its own: the statistics pass over synthetic images (a seeded, re-readable loader: the
memory of the statistics does not depend on the pixels), scoring, and writing
``stats.safetensors``; then, in another subprocess, loading that file and scoring it (what
``cdprune prune --stats`` does). ``kept`` is ``collect_stats(keep_features=True)``, the
form every release before the streamed one used (every image's vector, 4 bytes per image
per channel); ``streamed`` is the default. The scores of both are compared.

    python benchmarks/stats_memory.py --threads 1

The statistics hold one value per image per channel whatever the resolution (2,032
channels for ResNet-56, 26,560 for ResNet-50), so the smaller resolutions measure the same
statistics' memory and file at a fraction of the CPU time; only the one batch of
activations, the same for both forms, grows with the pixels (for ResNet-50 at 224x224 a
batch of 64 adds about 0.5 GB to both).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

CASES = {  # name: (model, input size, images, batch size)
    "resnet56-32px-50000": ("resnet56", 32, 50000, 128),
    "resnet56-16px-50000": ("resnet56", 16, 50000, 128),
    "resnet50-32px-25600": ("resnet50", 32, 25600, 64),
    "resnet50-16px-25600": ("resnet50", 16, 25600, 64),
}

COLLECT = """
import json, resource, sys, time, torch
from cdprune.models import create_model
from cdprune.importance.scoring import tfidf_scores
from cdprune.importance.stats import collect_stats
from safetensors.torch import save_file
model_name, size, images, batch, mode, out, threads = sys.argv[1:8]
torch.set_num_threads(int(threads))
size, images, batch = int(size), int(images), int(batch)

class Synthetic:
    '''Seeded random images, made batch by batch; every reading yields the same ones.'''
    def __len__(self):
        return -(-images // batch)
    def __iter__(self):
        for i in range(len(self)):
            g = torch.Generator().manual_seed(i)
            n = min(batch, images - i * batch)
            yield torch.randn(n, 3, size, size, generator=g)

torch.manual_seed(0)
model = create_model(model_name).eval()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
stats = collect_stats(model, Synthetic(), progress=False, keep_features=mode == "kept")
seconds = time.perf_counter() - start
scores = tfidf_scores(stats)
path = stats.save(out + "/stats.safetensors")
save_file({k: v.contiguous() for k, v in scores.items()}, out + "/scores.safetensors")
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "base_mb": base / 1024, "peak_mb": peak / 1024,
                  "file_mb": path.stat().st_size / 2**20}))
"""

LOAD = """
import json, resource, sys, torch
from cdprune.importance.activations import ActivationStats
from cdprune.models import create_model
from cdprune.importance.scoring import tfidf_scores
model = create_model(sys.argv[1]).eval()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tfidf_scores(ActivationStats.load(sys.argv[2], model=model))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"load_base_mb": base / 1024, "load_peak_mb": peak / 1024}))
"""


def child(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--modes", nargs="+", default=["kept", "streamed"])
    args = parser.parse_args()
    import torch
    from safetensors.torch import load_file

    print(f"# machine: {platform.machine()} {platform.processor()}, {args.threads} thread(s), "
          f"torch {torch.__version__}")
    print("case,mode,images,file_mb,stats_seconds,model_rss_mb,peak_rss_mb,"
          "load_peak_rss_mb,max_score_rel_diff", flush=True)
    for name in args.cases:
        model, size, images, batch = CASES[name]
        scores = {}
        for mode in args.modes:
            with tempfile.TemporaryDirectory() as tmp:
                row = child(COLLECT, model, str(size), str(images), str(batch), mode, tmp,
                            str(args.threads))
                row.update(child(LOAD, model, str(Path(tmp) / "stats.safetensors")))
                scores[mode] = load_file(str(Path(tmp) / "scores.safetensors"))
            diff = max(float(((scores[mode][k] - v).abs() / v.abs().clamp_min(1e-30)).max())
                       for k, v in scores[args.modes[0]].items())
            print(f"{name},{mode},{images},{row['file_mb']:.3f},{row['seconds']:.0f},"
                  f"{row['base_mb']:.0f},{row['peak_mb']:.0f},{row['load_peak_mb']:.0f},"
                  f"{diff:.2e}", flush=True)


if __name__ == "__main__":
    main()
