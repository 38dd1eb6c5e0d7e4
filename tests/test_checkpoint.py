import os
import pickle

import pytest
import torch
from torch import nn

from cdprune.checkpoint import load_weights, read_state_dict, save_weights
from cdprune.errors import CheckpointError
from cdprune.fileio import atomic_torch_save, atomic_write_text
from cdprune.models import create_model, list_models, model_spec

IMAGENET = {"resnet18", "resnet34", "resnet50", "mobilenet_v2"}
SMALL_ZOO = [n for n in list_models() if n not in IMAGENET]
SUFFIXES = [".pth", ".pth.tar", ".th", ".pt", ".safetensors"]


def randomized(name: str, seed: int) -> nn.Module:
    """A zoo model whose every tensor (BN statistics and counters included) is seed-specific."""
    torch.manual_seed(seed)
    model = create_model(name)
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if key.endswith("num_batches_tracked"):
                tensor.fill_(seed + 7)
            elif key.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
            else:
                tensor.normal_()
    return model


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


class Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("name", SMALL_ZOO)
@pytest.mark.slow
def test_round_trip_every_format(name, suffix, tmp_path):
    source = randomized(name, 1)
    path = save_weights(source, tmp_path / f"weights{suffix}")
    assert path.name == f"weights{suffix}"
    target = load_weights(randomized(name, 2), path)
    assert_same_state(source, target)


@pytest.mark.parametrize("name", sorted(IMAGENET))
@pytest.mark.slow
def test_round_trip_imagenet(name, tmp_path):
    source = randomized(name, 1)
    target = randomized(name, 2)
    load_weights(target, save_weights(source, tmp_path / "w.safetensors"))
    assert_same_state(source, target)


@pytest.mark.parametrize("layout", ["state_dict", "model", "net", "model_state_dict"])
@pytest.mark.parametrize("prefixed", [False, True])
@pytest.mark.parametrize("name", [  # the layouts do not depend on the model: one is fast
    "tiny_cnn", pytest.param("resnet20", marks=pytest.mark.slow),
    pytest.param("resnet20b", marks=pytest.mark.slow)])
def test_nested_and_dataparallel_layouts(name, layout, prefixed, tmp_path):
    source = randomized(name, 1)
    state = source.state_dict()
    if prefixed:
        state = {f"module.{k}": v for k, v in state.items()}
    path = atomic_torch_save({layout: state, "epoch": 3, "best_prec1": 91.5,
                              "optimizer": {"lr": 0.1}}, tmp_path / "ckpt.pth.tar")
    target = load_weights(randomized(name, 2), path)
    assert_same_state(source, target)
    assert list(read_state_dict(path)) == list(source.state_dict())


def test_legacy_checkpoint_without_batch_counters(tmp_path):
    # Like the public option-A CIFAR files: old (non-zip) serialisation, "module." prefix,
    # nested under state_dict, no BN num_batches_tracked.
    source = randomized("resnet20", 1)
    state = {f"module.{k}": v for k, v in source.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    path = tmp_path / "resnet20.th"
    torch.save({"state_dict": state, "best_prec1": 91.7}, path,
               _use_new_zipfile_serialization=False)
    target = randomized("resnet20", 2)
    load_weights(target, path)
    for key, value in source.state_dict().items():
        if key.endswith("num_batches_tracked"):
            assert target.state_dict()[key].item() == 9  # the model keeps its own counter
        else:
            assert torch.equal(target.state_dict()[key], value), key


@pytest.mark.parametrize("how", ["pickle_protocol2", "pickle_default", "torch_save",
                                 "torch_save_nested"])
def test_code_payload_is_refused_unrun(how, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = Payload(marker)
    if how == "pickle_protocol2":
        path.write_bytes(pickle.dumps({"state_dict": payload}, protocol=2))
    elif how == "pickle_default":
        path.write_bytes(pickle.dumps({"state_dict": payload}))
    elif how == "torch_save":
        torch.save(payload, path)
    else:
        torch.save({"state_dict": create_model("tiny_cnn").state_dict(), "x": payload}, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError) as info:
        load_weights(create_model("tiny_cnn"), path)
    assert not marker.exists()
    message = str(info.value)
    assert str(path) in message and "\n" not in message and "nothing in it was run" in message
    assert "weights_only` set to `False`" not in message  # never advise turning safety off
    if how != "pickle_default":  # the default protocol stops even earlier, at its framing
        assert "could run code" in message and "posix.system" in message


def test_payload_really_runs_under_plain_pickle(tmp_path):
    # guards the test above: the payload is live, so its refusal means something
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


def test_key_mismatch_names_every_key(tmp_path):
    path = save_weights(create_model("resnet20"), tmp_path / "a.pth")
    with pytest.raises(CheckpointError) as info:
        load_weights(create_model("resnet20b"), path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    # 2 projections x (conv + 4 BN tensors; BN batch counters may be absent) + fc x 2
    assert "missing keys (12)" in message
    assert "layer2.0.downsample.0.weight" in message and "fc.weight" in message
    assert "unexpected keys (2): linear.weight, linear.bias" in message

    with pytest.raises(CheckpointError) as info:
        load_weights(create_model("resnet20", num_classes=100), path)
    message = str(info.value)
    assert "shape mismatches (2)" in message
    assert "linear.weight: file (10, 64) vs model (100, 64)" in message
    assert "linear.bias: file (10,) vs model (100,)" in message
    assert "missing" not in message and "unexpected" not in message


def test_non_strict_skips_names_but_never_shapes(tmp_path):
    source = randomized("resnet20", 1)
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("linear")}
    state["extra.weight"] = torch.ones(3)
    path = save_weights(state, tmp_path / "partial.safetensors")
    target = randomized("resnet20", 2)
    head = target.linear.weight.clone()
    load_weights(target, path, strict=False)
    assert torch.equal(target.conv1.weight, source.conv1.weight)
    assert torch.equal(target.linear.weight, head)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_weights(create_model("resnet32"), save_weights(
            create_model("resnet20", num_classes=5), tmp_path / "five.pth"), strict=False)


@pytest.mark.parametrize("suffix, legacy", [(".pth", False), (".th", True),
                                            (".safetensors", False)])
def test_truncated_file(suffix, legacy, tmp_path):
    full = tmp_path / f"full{suffix}"
    model = create_model("resnet20")
    if legacy:
        torch.save(model.state_dict(), full, _use_new_zipfile_serialization=False)
    else:
        save_weights(model, full)
    data = full.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        load_weights(create_model("resnet20"), cut)
    message = str(info.value)
    assert str(cut) in message and "\n" not in message
    assert "truncated" in message or "corrupt" in message


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".safetensors"])
@pytest.mark.parametrize("content", [b"\x00\xff" * 500, b"hello, not weights\n" * 40,
                                     bytes(range(256)) * 4])
def test_garbage_bytes(suffix, content, tmp_path):
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    assert "could run code" not in message  # garbage is reported as garbage


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_empty_and_missing_files(suffix, tmp_path):
    empty = tmp_path / f"empty{suffix}"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty|truncated|corrupt") as info:
        read_state_dict(empty)
    assert str(empty) in str(info.value)
    missing = tmp_path / f"nope{suffix}"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_weights(create_model("tiny_cnn"), missing)


def test_unsupported_suffix_and_no_tensors(tmp_path):
    other = tmp_path / "weights.npz"
    other.write_bytes(b"PK")
    with pytest.raises(CheckpointError, match=r"\.safetensors"):
        read_state_dict(other)
    path = atomic_torch_save({"epoch": 3, "state_dict": {}}, tmp_path / "meta.pth")
    with pytest.raises(CheckpointError, match="holds no state dict"):
        read_state_dict(path)


def test_atomic_writes_leave_old_file_on_failure(tmp_path):
    path = atomic_write_text(tmp_path / "out.txt", "old")
    with pytest.raises(Exception):  # noqa: B017  (pickling a lambda: the type varies)
        atomic_torch_save({"fn": lambda: 1}, path)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
    target = tmp_path / "sub" / "w.safetensors"
    save_weights(create_model("tiny_cnn"), target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["w.safetensors"]


def test_atomic_writes_get_the_permissions_open_would_give(tmp_path):
    # the temp file behind an atomic write is private (0600); the result must not be
    old = os.umask(0o022)
    try:
        text = atomic_write_text(tmp_path / "report.md", "x")
        weights = save_weights(create_model("tiny_cnn"), tmp_path / "w.safetensors")
    finally:
        os.umask(old)
    for path in (text, weights):
        assert path.stat().st_mode & 0o777 == 0o644


def test_spec_input_runs_after_loading(tmp_path):
    # a loaded model is immediately usable at its declared input size
    source = randomized("digits_cnn", 3).eval()
    target = load_weights(create_model("digits_cnn"), save_weights(source, tmp_path / "d.pt"))
    x = torch.randn(2, *model_spec("digits_cnn").input_size)
    with torch.no_grad():
        assert torch.equal(target.eval()(x), source(x))


def test_weights_of_another_dtype_convert_only_when_exact(caplog):
    """bool and int8 'weights' are refused; float16, exact float64 and integral counters
    are converted with a warning; float64 values float32 cannot hold are refused."""
    from cdprune.checkpoint import apply_weights

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    good = model.state_dict()
    for dtype in (torch.bool, torch.int8):
        bad = {**good, "0.weight": good["0.weight"].to(dtype)}
        with pytest.raises(CheckpointError, match=f"'0.weight' as {dtype} but the model's "
                                                  "tensor is torch.float32"):
            apply_weights(model, bad)
    inexact = {**good, "0.weight": good["0.weight"].double() + 1e-12}
    with pytest.raises(CheckpointError, match="cannot hold its values exactly"):
        apply_weights(model, inexact)
    half = {k: (v.half() if v.is_floating_point() else v.float()) for k, v in good.items()}
    with caplog.at_level("WARNING"):
        apply_weights(model, half)
    assert "converted exactly" in caplog.text
    assert torch.equal(model.state_dict()["0.weight"], good["0.weight"].half().float())
    assert model.state_dict()["1.num_batches_tracked"].dtype == torch.int64
