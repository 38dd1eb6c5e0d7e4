"""Which CNN families cdprune prunes exactly: torchvision's and timm's, plus our zoo.

Every model gets random weights with varied BatchNorm statistics, norm affines and
layer scales, CDP statistics on 16 random images, then ``prune(..., macs_reduction=0.3)``.
Per model it records: ok or the error, the MACs reduction reached, whether the pruned
model equals the original with the removed channels zeroed (``exact``; where LayerNorm or
weight-standardised convolutions mix channels, the reference also takes those norms'
statistics over the kept channels only: ``norm_aware_exact``), whether
save_pruned/load_pruned gives the same model back, and the seconds prune() took.
Torch-Pruning's own MetaPruner (L1 magnitude, 20% of every layer's channels, global
ranking off) runs on the same model beside it, as the reference of what the dependency
graph handles.

Each model runs in its own process (a hang or a crash costs one row, not the run) and its
row is appended to ``rows.jsonl`` as soon as it is done, so a long run can be resumed.

    PYTHONPATH=src python benchmarks/zoo_coverage.py --out benchmarks/results/zoo_coverage

It needs the real torchvision and timm (random weights only: nothing is downloaded).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# One representative per CNN family of timm 1.0.31 (its model modules; transformer,
# MLP and attention-hybrid modules are left out), the smallest registered model of each.
TIMM_FAMILIES = {
    "byobnet": "gernet_s", "convmixer": "convmixer_768_32", "convnext": "convnext_atto",
    "cspnet": "cspresnet50", "cspnext": "cspnext_tiny", "densenet": "densenet121",
    "dla": "dla34", "dpn": "dpn48b", "efficientnet": "efficientnet_b0",
    "fasternet": "fasternet_t0", "ghostnet": "ghostnet_100", "hardcorenas": "hardcorenas_a",
    "hgnet": "hgnetv2_b0", "hrnet": "hrnet_w18_small", "inception_next": "inception_next_atto",
    "inception_resnet_v2": "inception_resnet_v2", "inception_v3": "inception_v3",
    "inception_v4": "inception_v4", "lcnetv2": "lcnetv2_small", "mambaout": "mambaout_femto",
    "mobilenetv3": "mobilenetv3_large_100", "nasnet": "nasnetalarge",
    "nfnet": "nf_regnet_b0", "pnasnet": "pnasnet5large", "rdnet": "rdnet_tiny",
    "regnet": "regnety_008", "repghost": "repghostnet_050", "repvit": "repvit_m0_9",
    "res2net": "res2net50_26w_4s", "resnest": "resnest14d", "resnet": "resnet50",
    "resnetv2": "resnetv2_50", "rexnet": "rexnet_100", "selecsls": "selecsls42b",
    "senet": "legacy_seresnet18", "sknet": "skresnet18", "starnet": "starnet_s050",
    "tresnet": "tresnet_m", "vgg": "vgg11_bn", "vovnet": "ese_vovnet19b_dw",
    "xception": "legacy_xception", "xception_aligned": "xception41",
}
# One model per family of torchvision's classification models (the smallest of each).
TORCHVISION_FAMILIES = {
    "AlexNet": "alexnet", "ConvNeXt": "convnext_tiny", "DenseNet": "densenet121",
    "EfficientNet": "efficientnet_b0", "EfficientNetV2": "efficientnet_v2_s",
    "GoogLeNet": "googlenet", "Inception v3": "inception_v3", "MaxViT": "maxvit_t",
    "MNASNet": "mnasnet0_5", "MobileNetV2": "mobilenet_v2",
    "MobileNetV3 large": "mobilenet_v3_large", "MobileNetV3 small": "mobilenet_v3_small",
    "RegNetX": "regnet_x_400mf", "RegNetY": "regnet_y_400mf", "ResNet": "resnet18",
    "ResNet (bottleneck)": "resnet50", "ResNeXt": "resnext50_32x4d",
    "ShuffleNetV2": "shufflenet_v2_x0_5", "SqueezeNet": "squeezenet1_0",
    "SqueezeNet 1.1": "squeezenet1_1", "VGG": "vgg11_bn", "Wide ResNet": "wide_resnet50_2",
    "ViT": "vit_b_16", "Swin": "swin_t", "Swin V2": "swin_v2_t",
}
# Families users bring most often, beyond their module's representative.
TIMM_EXTRA = {"resnet (ResNeXt)": "resnext50_32x4d", "regnet (RegNetX)": "regnetx_002",
              "efficientnet (MixNet)": "mixnet_s"}
SIZE = 96
IMAGES = 16


def cases() -> list[tuple[str, str, str]]:
    """(source, family, model name) of every row."""
    from cdprune.models import list_models

    rows = [("torchvision", fam, name) for fam, name in TORCHVISION_FAMILIES.items()]
    rows += [("timm", fam, name) for fam, name in TIMM_FAMILIES.items()]
    rows += [("timm", fam, name) for fam, name in TIMM_EXTRA.items()]
    rows += [("cdprune", "cdprune zoo", name) for name in list_models()]
    return rows


# ---------------------------------------------------------------------- one model
def _build(source: str, name: str):
    import torch

    torch.manual_seed(0)
    if source == "timm":
        import timm

        model = timm.create_model(name, num_classes=10)
        shape = (3, SIZE, SIZE)
    elif source == "torchvision":
        import torchvision

        # ViT's position embedding is sized for one image size: build it for ours.
        extra = {"image_size": SIZE} if name.startswith("vit_") else {}
        model = torchvision.models.get_model(name, weights=None, num_classes=10, **extra)
        # MaxViT's window partition fits its design size only.
        shape = (3, 224, 224) if name.startswith("maxvit") else (3, SIZE, SIZE)
    else:
        from cdprune.models import create_model, model_spec

        model = create_model(name, num_classes=10)
        spec = model_spec(name).input_size
        shape = spec if spec[-1] < SIZE else (spec[0], SIZE, SIZE)
    vary(model)
    return model.eval(), shape


def vary(model, seed: int = 1):
    """Random norms and layer scales, in place: freshly built, BatchNorm is the identity
    and layer scales are near zero, which would hide any pruning error behind them."""
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            if m.weight is not None:
                m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.data.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            if m.bias is not None:
                m.bias.data.copy_(torch.rand(m.bias.shape, generator=g) * 0.4 - 0.2)
        for pname, param in m.named_parameters(recurse=False):
            # Layer scales start near zero (1e-6 in ConvNeXt, RDNet): a block then barely
            # reaches the output and any pruning error in it would go unseen.
            if "gamma" in pname or "layer_scale" in pname:
                param.data.copy_(torch.rand(param.shape, generator=g) + 0.5)
    return model


def _masked(model, plan):
    """The original with every removed channel zeroed at its conv (or BatchNorm)."""
    masked = copy.deepcopy(model)
    named = dict(masked.named_modules())
    for name, kept in plan["kept"].items():
        module = named[name]
        removed = sorted(set(range(module.weight.shape[0])) - set(kept))
        module.weight.data[removed] = 0
        if getattr(module, "bias", None) is not None:
            module.bias.data[removed] = 0
    return masked


def _positions(original, pruned):
    """Where each slice of ``pruned`` (along dim 0) sits in ``original``: matched by value,
    since random weights never repeat; read from the pruned model, not from the plan."""
    import torch

    index = {tuple(row.flatten()[:4].tolist()): i for i, row in enumerate(original)}
    return torch.tensor([index[tuple(row.flatten()[:4].tolist())] for row in pruned])


def _norm_aware(masked, pruned):
    """The masked original whose channel-mixing norms see only the kept channels.

    LayerNorm over channels and weight-standardised convolutions take statistics over all
    channels, so zeroing a channel is not removing it. Here each such layer normalises
    over the channels the pruned model kept there (found by matching its weights) and
    outputs zero on the others: the original network restricted to the kept channels,
    computed without cdprune's surgery.
    """
    import torch
    import torch.nn.functional as F

    def layer_norm(module, x):
        dim = 1 if type(module).__name__.endswith("2d") else -1
        keep = module.kept_channels
        xm = x.movedim(dim, -1)
        out = torch.zeros_like(xm)
        out[..., keep] = F.layer_norm(xm[..., keep], (len(keep),), module.weight[keep],
                                      module.bias[keep], module.eps)
        return out.movedim(-1, dim)

    def std_conv(module, x):
        w = module.weight[:, module.kept_inputs]
        flat = w.reshape(w.shape[0], -1)
        mean = flat.mean(1, keepdim=True)
        var = flat.var(1, unbiased=False, keepdim=True)
        gain = (module.gain * module.scale).reshape(-1, 1)
        weight = torch.zeros_like(module.weight)
        weight[:, module.kept_inputs] = ((flat - mean) / torch.sqrt(var + module.eps)
                                         * gain).reshape_as(w)
        return F.conv2d(x, weight, module.bias, module.stride, module.padding,
                        module.dilation, module.groups)

    small = dict(pruned.named_modules())
    for name, module in masked.named_modules():
        if (isinstance(module, torch.nn.LayerNorm) and len(module.normalized_shape) == 1
                and module.weight is not None and module.bias is not None):
            module.kept_channels = _positions(module.weight[:, None], small[name].weight[:, None])
            module.forward = layer_norm.__get__(module)
        elif type(module).__name__ == "ScaledStdConv2d" and module.groups == 1:
            # every weight value is unique: each of the pruned conv's input columns is
            # found by one of its values, whichever filters were kept
            column = {float(v): i for i, col in enumerate(module.weight.transpose(0, 1))
                      for v in col.flatten()}
            module.kept_inputs = torch.tensor(
                [column[float(col.flatten()[0])]
                 for col in small[name].weight.transpose(0, 1)])
            module.forward = std_conv.__get__(module)
    return masked


def _close(a, b) -> tuple[bool, float]:
    import torch

    err = float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
    return bool(torch.isfinite(a).all()) and err < 1e-3, err


def _cdprune_row(source: str, name: str, threads: int, target: float = 0.3) -> dict:
    import torch

    import cdprune

    torch.set_num_threads(threads)
    model, shape = _build(source, name)
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(2))
    images = torch.randn(IMAGES, *shape, generator=torch.Generator().manual_seed(3))
    stats = cdprune.collect_stats(model, [images[i:i + 8] for i in range(0, IMAGES, 8)],
                                  progress=False)
    scores = cdprune.tfidf_scores(stats)
    # Masking is exact only where no normalisation mixes channels: LayerNorm, GroupNorm,
    # and weight-standardised convolutions (each filter renormalised over its inputs).
    mixing = sorted({type(m).__name__ for m in model.modules()
                     if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm))
                     or "StdConv" in type(m).__name__})
    row: dict = {"channel_mixing_norms": mixing}
    start = time.perf_counter()
    try:
        result = cdprune.prune(model, scores, example_inputs=x, macs_reduction=target)
    except Exception as exc:  # the table reports every failure, whatever its type
        row.update(status="error", error=f"{type(exc).__name__}: {str(exc)[:300]}",
                   prune_s=round(time.perf_counter() - start, 2))
        return row
    row["prune_s"] = round(time.perf_counter() - start, 2)
    row.update(status="ok", macs_reduction=round(result.macs_reduction, 4),
               auto_ignored=result.extra.get("auto_ignored", []),
               target_missed=result.extra.get("macs_target_missed"))
    with torch.no_grad():
        got = result.model.eval()(x)
        ref = _masked(model, result.plan)(x)
        row["exact"], row["masked_err"] = _close(got, ref)
        if mixing:
            row["norm_aware_exact"], row["norm_aware_err"] = _close(
                got, _norm_aware(_masked(model, result.plan), result.model)(x))
        with tempfile.TemporaryDirectory() as tmp:
            cdprune.save_pruned(tmp, result, input_size=shape)
            fresh, _ = _build(source, name)
            loaded = cdprune.load_pruned(tmp, fresh).eval()
            row["roundtrip"] = bool(torch.equal(loaded(x), got))
    return row


class _TimeUp(BaseException):  # not caught by the "except Exception" of a run
    pass


def _torch_pruning_row(source: str, name: str, threads: int, limit: int = 180) -> dict:
    """Torch-Pruning's MetaPruner, stopped after ``limit`` seconds (its group listing runs
    for many minutes on some graphs, e.g. ReXNet)."""
    import signal

    def time_up(*_: object) -> None:
        raise _TimeUp()

    signal.signal(signal.SIGALRM, time_up)
    signal.alarm(limit)
    try:
        return _torch_pruning_run(source, name, threads)
    except _TimeUp:
        return {"tp_status": "error", "tp_error": f"still running after {limit} s",
                "tp_s": limit}
    finally:
        signal.alarm(0)


def _torch_pruning_run(source: str, name: str, threads: int) -> dict:
    import torch
    import torch_pruning as tp
    from torch import nn

    torch.set_num_threads(threads)
    model, shape = _build(source, name)
    x = torch.randn(1, *shape)
    macs_before, _ = tp.utils.count_ops_and_params(model, x)
    heads = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == 10]
    start = time.perf_counter()
    try:
        from cdprune.pruning import custom_pruners  # our option-A shortcut layer

        pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=1),
                                      pruning_ratio=0.2, ignored_layers=heads,
                                      customized_pruners=custom_pruners())
        pruner.step()
        with torch.no_grad():
            out = model(x)
        macs_after, _ = tp.utils.count_ops_and_params(model, x)
    except Exception as exc:
        return {"tp_status": "error", "tp_error": f"{type(exc).__name__}: {str(exc)[:200]}",
                "tp_s": round(time.perf_counter() - start, 2)}
    return {"tp_status": "ok" if bool(torch.isfinite(out).all()) else "non-finite",
            "tp_macs_reduction": round(1 - macs_after / macs_before, 4),
            "tp_s": round(time.perf_counter() - start, 2)}


def worker(spec: str, threads: int, target: float = 0.3, torch_pruning: bool = True) -> None:
    source, name = spec.split(":", 1)
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    row = {"source": source, "model": name}
    try:
        row.update(_cdprune_row(source, name, threads, target))
    except Exception as exc:  # building or statistics failed
        row.update(status="error", error=f"setup {type(exc).__name__}: {str(exc)[:300]}")
    try:
        if torch_pruning:
            row.update(_torch_pruning_row(source, name, threads))
    except Exception as exc:
        row.update(tp_status="error", tp_error=f"setup {type(exc).__name__}: {str(exc)[:200]}")
    print("ROW " + json.dumps(row), flush=True)


# ---------------------------------------------------------------------- the run
def _table(rows: list[dict], machine: str, target: float = 0.3) -> str:
    def plain(r: dict) -> bool:
        return r.get("status") == "ok" and bool(r.get("exact")) and bool(r.get("roundtrip"))

    def norm_aware(r: dict) -> bool:  # exact once the norms see only the kept channels
        return (r.get("status") == "ok" and not r.get("exact") and bool(r.get("roundtrip"))
                and bool(r.get("norm_aware_exact")))

    def exact(r: dict) -> bool:
        return plain(r) or norm_aware(r)

    def unverifiable(r: dict) -> bool:  # pruned and reloaded, but matches no reference
        return (r.get("status") == "ok" and not exact(r) and bool(r.get("roundtrip"))
                and bool(r.get("channel_mixing_norms")))

    def refused(r: dict) -> bool:  # a clean refusal saying why, not a crash
        return r.get("status") != "ok" and "ConfigError: nothing can be pruned" in r.get(
            "error", "")

    def summary(label: str, fams: list[dict]) -> str:
        tp_ok = [r for r in fams if r.get("tp_status") == "ok"]
        return (
            f"{label}: **{sum(map(exact, fams))} of {len(fams)} pruned exactly** (save/load "
            f"round trip included): {sum(map(plain, fams))} equal the original with the "
            f"removed channels zeroed, {sum(map(norm_aware, fams))} equal it once LayerNorm "
            f"or weight-standardised convolutions take their statistics over the kept "
            f"channels only (*norm-aware*); {sum(map(unverifiable, fams))} pruned but "
            f"matching neither reference, {sum(map(refused, fams))} refused with the reason, "
            f"{sum(r.get('status') != 'ok' and not refused(r) for r in fams)} errors. "
            + (f"Torch-Pruning's MetaPruner runs on {len(tp_ok)} of them; cdprune prunes "
               f"exactly {sum(map(exact, tp_ok))} of those." if any("tp_status" in r
                                                                   for r in fams)
               else "Torch-Pruning's MetaPruner was not run."))

    tv = [r for r in rows if r["source"] == "torchvision"]
    fams = [r for r in rows if r["source"] == "timm" and r["family"] in TIMM_FAMILIES]
    lines = [
        f"# Zoo coverage: prune to -{100 * target:g}% MACs (random weights, 96x96 inputs)", "",
        f"Machine: {machine}", ""]
    if tv:
        lines += [summary("torchvision classification families (one model each)", tv), ""]
    if fams:
        lines += [summary("timm CNN families (one model each)", fams), ""]
    lines += [
        f"All rows: {sum(map(exact, rows))} exact of {len(rows)}.", "",
        "| source | family | model | cdprune | MACs -% | exact (max rel. err) | save/load | "
        "prune s | warnings | auto-ignored | Torch-Pruning | TP MACs -% | TP s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        status = r.get("status", "?")
        if status != "ok":
            status = "error: " + r.get("error", "")[:120].replace("|", "/")
        tp_status = r.get("tp_status", "?")
        if tp_status != "ok":
            tp_status = "error: " + r.get("tp_error", "")[:80].replace("|", "/")
        macs = f"{100 * r['macs_reduction']:.1f}" if "macs_reduction" in r else ""
        tp_macs = f"{100 * r['tp_macs_reduction']:.1f}" if "tp_macs_reduction" in r else ""
        exact_s = (f"{'yes' if r['exact'] else 'NO'} ({r['masked_err']:.1e})"
                   if "exact" in r else "")
        if "exact" in r and not r["exact"] and "norm_aware_exact" in r:
            exact_s = (f"{'yes' if r['norm_aware_exact'] else 'NO'}, norm-aware: "
                       f"{', '.join(r['channel_mixing_norms'])} ({r['norm_aware_err']:.1e}; "
                       f"plain masking {r['masked_err']:.1e})")
        lines.append(
            f"| {r['source']} | {r['family']} | {r['model']} | {status} | {macs} | {exact_s} | "
            f"{'' if 'roundtrip' not in r else ('yes' if r['roundtrip'] else 'NO')} | "
            f"{r.get('prune_s', '')} | {len(r.get('warnings') or [])} | "
            f"{len(r.get('auto_ignored') or [])} | {tp_status} | "
            f"{tp_macs} | {r.get('tp_s', '')} |")
    return "\n".join(lines) + "\n"


def _machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines()
                     if line.startswith("Model name"))
    except (OSError, StopIteration):
        pass
    from importlib.metadata import PackageNotFoundError, version

    import torch

    versions = [f"torch {torch.__version__}"]
    for package in ("torchvision", "timm", "torch-pruning"):
        try:  # the installed distribution's version (torch_pruning.__version__ lags it)
            versions.append(f"{package} {version(package)}")
        except PackageNotFoundError:  # not installed: its rows are errors
            versions.append(f"{package} not importable")
    return (f"{time.strftime('%Y-%m-%d')} {model}, {os.cpu_count()} cores (shared), "
            f"{', '.join(versions)}, Python {platform.python_version()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/zoo_coverage")
    parser.add_argument("--only", nargs="*", help="model names to (re)run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per model")
    parser.add_argument("--table-only", action="store_true",
                        help="only rewrite the tables from rows.jsonl")
    parser.add_argument("--target", type=float, default=0.3,
                        help="the MACs reduction every model is pruned to")
    parser.add_argument("--no-torch-pruning", action="store_true",
                        help="leave out Torch-Pruning's MetaPruner beside each model")
    parser.add_argument("--sources", nargs="*", default=["torchvision", "timm", "cdprune"],
                        help="which rows to run: torchvision, timm and/or cdprune (the zoo)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.threads, args.target, not args.no_torch_pruning)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "rows.jsonl"
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            done[(row["source"], row["model"])] = row
    for source, family, name in ([] if args.table_only else cases()):
        if (args.only and name not in args.only) or source not in args.sources:
            continue
        if not args.only and (source, name) in done:
            continue
        start = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, __file__, "--worker", f"{source}:{name}",
                                   "--threads", str(args.threads), "--target", str(args.target)]
                                  + ["--no-torch-pruning"] * args.no_torch_pruning,
                                  capture_output=True,
                                  text=True, timeout=args.timeout, check=False)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")]
            row = json.loads(lines[-1][4:]) if lines else {
                "source": source, "model": name, "status": "error",
                "error": f"worker exited {proc.returncode}: {proc.stderr.strip()[-300:]}"}
            warnings = [ln for ln in proc.stderr.splitlines() if "WARNING" in ln]
            row["warnings"] = [w[:300] for w in warnings[:5]]
        except subprocess.TimeoutExpired:
            row = {"source": source, "model": name, "status": "error",
                   "error": f"timed out after {args.timeout} s"}
        row["family"] = family
        row["wall_s"] = round(time.perf_counter() - start, 1)
        done[(source, name)] = row
        print(json.dumps(row), flush=True)
        ordered = [done[(s, n)] for s, _, n in cases() if (s, n) in done]
        path.write_text("".join(json.dumps(r) + "\n" for r in ordered))
    ordered = [done[(s, n)] for s, _, n in cases() if (s, n) in done]
    machine = _machine()
    (out / "zoo_coverage.md").write_text(_table(ordered, machine, args.target))
    keys = ["source", "family", "model", "status", "macs_reduction", "exact", "masked_err",
            "norm_aware_exact", "norm_aware_err", "roundtrip", "prune_s", "tp_status", "tp_macs_reduction", "tp_s", "error",
            "tp_error"]
    with open(out / "zoo_coverage.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(keys)
        writer.writerows([r.get(k, "") for k in keys] for r in ordered)

if __name__ == "__main__":
    main()
