"""Detectors, segmenters and YOLO pruned whole to -30% MACs: on target, exact, reloaded.

Every model is built with random weights (nothing downloaded) and varied BatchNorm and
GroupNorm affines, at a 64x64 input (the R-CNN, RetinaNet and FCOS transforms are set to
resize to 64; SSD's resize to its own 300 or 320). CDP statistics come from 4 random
unlabelled images, then ``prune(..., macs_reduction=0.3)``. Per model it records the MACs
before and after (counted at the fixed input; region heads of two-stage detectors count
one region, since their proposal count depends on the data), whether the task outputs
equal the original's with the removed channels zeroed (max relative error), whether
save_pruned/load_pruned gives the same outputs back, and the seconds prune() took.

    PYTHONPATH=src python benchmarks/detectors.py --out benchmarks/results/detectors

It needs the real torchvision (and ultralytics for the YOLO rows).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

try:
    from benchmarks import zoo_coverage as zoo
except ImportError:  # run as a script from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import zoo_coverage as zoo

TORCHVISION = [
    "ssdlite320_mobilenet_v3_large", "ssd300_vgg16", "fasterrcnn_mobilenet_v3_large_320_fpn",
    "fasterrcnn_resnet50_fpn", "retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2",
    "fcos_resnet50_fpn", "maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2",
    "deeplabv3_mobilenet_v3_large", "deeplabv3_resnet50", "lraspp_mobilenet_v3_large"]
YOLO = ["yolov8n.yaml", "yolo11n.yaml"]
RESIZING = ("rcnn", "retinanet", "fcos")  # transforms that take min_size/max_size
SIZE = 64


def build(name: str):
    """A fresh model for ``torchvision:NAME`` or ``yolo:CONFIG``, random weights, 3 classes."""
    import torch

    from cdprune.models import create_model

    torch.manual_seed(0)
    options = ({"min_size": SIZE, "max_size": SIZE}
               if name.startswith("torchvision:") and any(k in name for k in RESIZING) else {})
    return create_model(name, num_classes=3, **options)


def task_outputs(model, x) -> list:
    """The deterministic task outputs: segmentation logits; YOLO's decoded predictions and
    raw box and class outputs; a one-stage detector's dense head outputs (random weights
    give many tied scores, which NMS may order either way); a two-stage detector's RPN
    and region-head outputs on fixed regions."""
    from cdprune.models.detection import is_two_stage_detector, rcnn_fixed_forward

    if is_two_stage_detector(model):
        return list(rcnn_fixed_forward(model, x))
    if type(model).__name__ == "DetectionModel":  # ultralytics
        decoded, raw = model(x)
        return [decoded, raw["boxes"], raw["scores"]]  # (raw["feats"]: the neck, pruned)
    if not hasattr(model, "head"):
        return [model(x)["out"]]
    images, _ = model.transform(list(x))
    features = model.backbone(images.tensors)
    features = list(features.values()) if isinstance(features, dict) else [features]
    return list(model.head(features).values())


def row(name: str, target: float = 0.3) -> dict:
    """Prune one model and check it; every field of the result table."""
    import torch

    import cdprune

    model = zoo.vary(build(name)).eval()
    images = torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    scores = cdprune.tfidf_scores(cdprune.collect_stats(model, [images[:2], images[2:]],
                                                        progress=False))
    x = images[:1]
    start = time.perf_counter()
    result = cdprune.prune(model, scores, example_inputs=x, macs_reduction=target)
    elapsed = time.perf_counter() - start
    masked = zoo._masked(model, result.plan)
    with torch.no_grad():
        got, want, full = (task_outputs(m.eval(), x) for m in (result.model, masked, model))
        errors = [zoo._close(a, b) for a, b in zip(got, want)]
        with tempfile.TemporaryDirectory() as tmp:
            cdprune.save_pruned(tmp, result, input_size=(3, SIZE, SIZE))
            loaded = cdprune.load_pruned(tmp, zoo.vary(build(name)).eval()).eval()
            again = task_outputs(loaded, x)
        result.model(x)  # the model's own forward (NMS, post-processing) still runs
    return {
        "model": name, "target": target, "macs_before": result.macs_before,
        "macs_after": result.macs_after, "macs_reduction": round(result.macs_reduction, 4),
        "outputs_whole": [tuple(t.shape) for t in got] == [tuple(t.shape) for t in full],
        "exact": all(ok for ok, _ in errors), "max_rel_err": max(e for _, e in errors),
        "reload_exact": all(torch.equal(a, b) for a, b in zip(again, got)),
        "prune_s": round(elapsed, 2), "auto_ignored": result.extra.get("auto_ignored", []),
    }


def _table(rows: list[dict], machine: str) -> str:
    lines = [f"# Detectors, segmenters and YOLO: prune to -30% MACs ({SIZE}x{SIZE} input)", "",
             f"Machine: {machine}", "",
             "MACs at the fixed input size; two-stage detectors' region heads count one "
             "region (their proposal count depends on the data; proposal selection, NMS and "
             "post-processing have no MACs). Exact: the task outputs equal the original's "
             "with the removed channels zeroed (max relative error).", "",
             "| model | MACs before | MACs after | -% (target 30) | outputs whole | exact "
             "(max rel. err) | reload exact | prune s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | error: {r['error'][:150]} | | | | | | |")
            continue
        lines.append(
            f"| {r['model']} | {r['macs_before'] / 1e6:.1f}M | {r['macs_after'] / 1e6:.1f}M | "
            f"{100 * r['macs_reduction']:.2f} | {'yes' if r['outputs_whole'] else 'NO'} | "
            f"{'yes' if r['exact'] else 'NO'} ({r['max_rel_err']:.1e}) | "
            f"{'yes' if r['reload_exact'] else 'NO'} | {r['prune_s']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/detectors"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    names = [f"torchvision:{n}" for n in TORCHVISION]
    try:
        import ultralytics  # noqa: F401  (only whether it imports)

        names += [f"yolo:{n}" for n in YOLO]
    except ImportError:
        print("ultralytics is not installed: no YOLO rows", file=sys.stderr)
    rows = []
    for name in names:
        try:
            r = row(name)
        except Exception as exc:  # the table reports every failure
            r = {"model": name, "error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(r), flush=True)
        rows.append(r)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    machine = zoo._machine()
    if any(n.startswith("yolo:") for n in names):
        from importlib.metadata import version

        machine = machine.replace(", Python", f", ultralytics {version('ultralytics')}, Python")
    (args.out / "detectors.md").write_text(_table(rows, machine))
    print(_table(rows, machine))


if __name__ == "__main__":
    main()
