import logging
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from cdprune.errors import CheckpointError, ConfigError, DataError
from cdprune.importance.activations import ActivationStats, conv_layer_names
from cdprune.importance.scoring import tfidf, tfidf_scores
from cdprune.importance.stats import collect_stats

from ..helpers import SmallNet, make_loader


def manual_pooled(model, loader):
    """Pooled ReLU(conv output) per layer, the slow obvious way."""
    outs = {n: [] for n in conv_layer_names(model)}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: outs[n].append(o.relu().mean((2, 3))))
             for n, m in model.named_modules() if n in outs]
    with torch.no_grad():
        for x, _ in loader:
            model(x)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in outs.items()}


def test_sample_features_match_manual(small_net, loader):
    stats = collect_stats(small_net, loader, progress=False, keep_features=True)
    ref = manual_pooled(small_net, loader)
    assert stats.layers == ["conv1", "conv2", "conv3"]
    assert stats.num_samples == 48 and stats.features.shape == (48, 8 + 8 + 16)
    for name in stats.layers:
        assert torch.allclose(stats.matrix(name), ref[name].T, atol=1e-6)
    scores = tfidf_scores(stats)
    assert torch.allclose(scores["conv3"], tfidf(ref["conv3"].T), atol=1e-6)


def test_class_documents_are_class_means(small_net, loader):
    stats = collect_stats(small_net, loader, documents="class", num_classes=6, progress=False)
    ref = manual_pooled(small_net, loader)["conv2"]
    labels = torch.arange(48) % 4
    means = torch.stack([ref[labels == k].mean(0) for k in range(4)])
    assert stats.num_documents() == 4  # classes 4 and 5 never occur: not documents
    assert torch.allclose(stats.matrix("conv2"), means.T, atol=1e-6)
    assert stats.class_counts.tolist() == [12, 12, 12, 12, 0, 0]
    assert torch.allclose(tfidf_scores(stats, coe=1.0)["conv2"], tfidf(means.T, coe=1.0),
                          atol=1e-6)


def test_max_batches_and_short_loader(small_net, loader, caplog):
    stats = collect_stats(small_net, loader, max_batches=2, progress=False)
    assert stats.num_samples == 32
    with caplog.at_level(logging.WARNING, logger="cdprune.importance.stats"):
        stats = collect_stats(small_net, loader, max_batches=10, progress=False)
    assert stats.num_samples == 48
    assert "fewer than the 10 asked for" in caplog.text
    with pytest.raises(ConfigError, match="max_batches must be a positive integer"):
        collect_stats(small_net, loader, max_batches=0, progress=False)


def test_restores_mode_and_removes_hooks_even_on_error(small_net):
    small_net.train()

    def broken():
        yield torch.randn(4, 3, 8, 8), torch.zeros(4, dtype=torch.long)
        raise RuntimeError("disk went away")

    with pytest.raises(RuntimeError, match="disk went away"):
        collect_stats(small_net, broken(), progress=False)
    assert small_net.training
    assert all(not m._forward_hooks for m in small_net.modules())
    collect_stats(small_net, make_loader(), progress=False)
    assert small_net.training and all(not m._forward_hooks for m in small_net.modules())


def test_uses_eval_mode_batchnorm(small_net, loader):
    """Statistics must not update BN running stats (eval mode, inference mode)."""
    small_net.train()
    before = small_net.bn1.running_mean.clone()
    collect_stats(small_net, loader, progress=False)
    assert torch.equal(before, small_net.bn1.running_mean)


def test_float16_halves_memory(small_net, loader):
    s32 = collect_stats(small_net, loader, progress=False, keep_features=True)
    s16 = collect_stats(small_net, loader, dtype=torch.float16, progress=False,
                        keep_features=True)
    assert s16.features.dtype == torch.float16
    assert s16.features.nbytes * 2 == s32.features.nbytes
    for name in s32.layers:
        assert torch.allclose(s16.matrix(name), s32.matrix(name), rtol=2e-3, atol=1e-3)


def test_chunked_buffer_spans_chunks(small_net, monkeypatch):
    import cdprune.importance.stats as stats_mod

    monkeypatch.setattr(stats_mod, "_CHUNK_ROWS", 5)  # batches of 16 straddle chunks
    stats = collect_stats(small_net, make_loader(n=48), progress=False, keep_features=True)
    ref = manual_pooled(small_net, make_loader(n=48))
    assert torch.allclose(stats.matrix("conv1"), ref["conv1"].T, atol=1e-6)


def test_layers_selection_and_errors(small_net, loader):
    stats = collect_stats(small_net, loader, layers=["conv3", "conv1"], progress=False)
    assert stats.layers == ["conv1", "conv3"]
    with pytest.raises(ConfigError, match="did you mean conv2"):
        collect_stats(small_net, loader, layers=["conv22"], progress=False)
    with pytest.raises(ConfigError, match="not a Conv2d"):
        collect_stats(small_net, loader, layers=["bn1"], progress=False)
    with pytest.raises(ConfigError, match="no nn.Conv2d"):
        collect_stats(nn.Sequential(nn.Flatten(), nn.Linear(192, 2)), loader, progress=False)
    with pytest.raises(ConfigError, match="documents"):
        collect_stats(small_net, loader, documents="word", progress=False)


def test_class_mode_needs_labels_in_range(small_net):
    images = [torch.randn(4, 3, 8, 8)]
    with pytest.raises(DataError, match="needs labels"):
        collect_stats(small_net, images, documents="class", progress=False)
    with pytest.raises(DataError, match="out of range"):
        collect_stats(small_net, make_loader(), documents="class", num_classes=2, progress=False)


def test_nan_activations_name_the_layer(small_net, loader):
    small_net.conv2.weight.data[3] = float("nan")
    with pytest.raises(DataError, match="layer 'conv2'"):
        collect_stats(small_net, loader, progress=False)


def test_inf_activations_name_the_layer_and_large_finite_ones_pass(small_net, loader):
    from cdprune.importance.stats import _check_finite

    offsets = [("a", (0, 2)), ("b", (2, 4))]
    huge = torch.full((3, 4), 1e308, dtype=torch.float64)  # finite, but the sum overflows
    _check_finite(huge, offsets)
    huge[1, 3] = float("inf")
    with pytest.raises(DataError, match="layer 'b'"):
        _check_finite(huge, offsets)
    small_net.conv3.weight.data[0] = float("inf")
    with pytest.raises(DataError, match="layer 'conv3'"):
        collect_stats(small_net, loader, progress=False)


@pytest.mark.parametrize("documents", ["sample", "class"])
def test_save_load_round_trip(small_net, loader, tmp_path, documents):
    stats = collect_stats(small_net, loader, documents=documents, progress=False)
    path = stats.save(tmp_path / "stats.safetensors")
    back = ActivationStats.load(path, model=small_net)
    assert back.layers == stats.layers and back.channels == stats.channels
    for name, score in tfidf_scores(stats).items():
        assert torch.equal(score, tfidf_scores(back)[name])
    other = SmallNet(width=6)
    with pytest.raises(CheckpointError, match="different architecture"):
        ActivationStats.load(path, model=other)


def test_load_refuses_truncated_and_foreign_files(small_net, loader, tmp_path):
    path = collect_stats(small_net, loader, progress=False).save(tmp_path / "s.safetensors")
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        ActivationStats.load(cut)
    from safetensors.torch import save_file

    save_file({"x": torch.ones(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(CheckpointError, match="not a cdprune statistics file"):
        ActivationStats.load(tmp_path / "foreign.safetensors")
    with pytest.raises(FileNotFoundError, match="cdprune stats"):
        ActivationStats.load(tmp_path / "missing.safetensors")


DIST_SCRIPT = textwrap.dedent("""
    import os, sys
    import torch
    import torch.distributed as dist
    sys.path.insert(0, {tests!r})
    from helpers import SmallNet, make_loader
    from torch.utils.data import DataLoader, Subset
    from cdprune.importance.stats import collect_stats
    from cdprune.importance.scoring import tfidf_scores

    def model():
        torch.manual_seed(0)
        return SmallNet().eval()

    def shard_loader(rank, world):
        full = make_loader(n=60, batch_size=7).dataset
        return DataLoader(Subset(full, list(range(rank, 60, world))), batch_size=7)

    def worker(rank, world, port, out):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        torch.set_num_threads(1)
        result = {{}}
        for documents in ("sample", "class"):
            stats = collect_stats(model(), shard_loader(rank, world), documents=documents,
                                  progress=False)
            result[documents] = tfidf_scores(stats, coe=0.5)
        if rank == 0:
            torch.save(result, out)
        dist.destroy_process_group()

    if __name__ == "__main__":
        import socket
        s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
        torch.multiprocessing.spawn(worker, args=(2, port, sys.argv[1]), nprocs=2)
""")


@pytest.mark.slow
def test_distributed_statistics_equal_single_process(tmp_path):
    from pathlib import Path

    script = tmp_path / "dist_stats.py"
    script.write_text(DIST_SCRIPT.format(tests=str(Path(__file__).resolve().parents[1])))
    out = tmp_path / "scores.pt"
    proc = subprocess.run([sys.executable, str(script), str(out)], capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dist_scores = torch.load(out, weights_only=True)
    torch.manual_seed(0)
    model = SmallNet().eval()
    for documents in ("sample", "class"):
        single = tfidf_scores(collect_stats(model, make_loader(n=60, batch_size=7),
                                            documents=documents, progress=False), coe=0.5)
        for name, score in single.items():
            assert torch.allclose(dist_scores[documents][name], score, atol=1e-6, rtol=0), name


def test_act_tap_reads_the_batchnorm_output(small_net, loader):
    stats = collect_stats(small_net, loader, tap="act", progress=False, keep_features=True)
    outs = []
    h = small_net.bn2.register_forward_hook(lambda m, i, o: outs.append(o.relu().mean((2, 3))))
    with torch.no_grad():
        for x, _ in loader:
            small_net(x)
    h.remove()
    assert torch.allclose(stats.matrix("conv2"), torch.cat(outs).T, atol=1e-6)
    assert stats.meta["tap"] == "act"
    conv = collect_stats(small_net, loader, progress=False, keep_features=True)
    assert not torch.allclose(stats.matrix("conv2"), conv.matrix("conv2"))
    published = collect_stats(small_net, loader, variant="published", progress=False,
                              keep_features=True)
    assert published.documents == "sample" and published.meta["tap"] == "conv"
    with pytest.raises(ConfigError, match="tap='act', documents='class' was given too"):
        collect_stats(small_net, loader, tap="act", documents="class", variant="published",
                      progress=False)  # an explicit other option is never replaced
    assert torch.equal(published.matrix("conv2"), conv.matrix("conv2"))
    with pytest.raises(ConfigError, match="tap"):
        collect_stats(small_net, loader, tap="bn", progress=False)


def test_act_tap_without_batchnorm_falls_back_to_conv_output(loader):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.Flatten())
    act = collect_stats(net, loader, tap="act", progress=False, keep_features=True)
    conv = collect_stats(net, loader, progress=False, keep_features=True)
    assert torch.allclose(act.features, conv.features)


class AuxNet(nn.Module):
    """An auxiliary classifier that runs only in training, as in GoogLeNet/Inception v3."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.aux = nn.Conv2d(4, 2, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        out = self.fc(y.mean((2, 3)))
        return (out, self.aux(y).mean((1, 2, 3))) if self.training else out


def test_layer_that_does_not_run_in_eval_counts_as_inactive():
    torch.manual_seed(0)
    batches = [(torch.randn(4, 3, 6, 6), torch.tensor([0, 1, 2, 0]))] * 2
    stats = collect_stats(AuxNet(), batches, progress=False, keep_features=True)
    rows = stats.features
    assert stats.layers == ["conv", "aux"] and rows.shape == (8, 6)
    assert torch.count_nonzero(rows[:, 4:]) == 0 and torch.count_nonzero(rows[:, :4]) > 0


# ---------------------------------------------------------------- streamed sample counts
def _documents(kind: str, n: int = 3000) -> torch.Tensor:
    """``[n, 16]`` pooled-like values (three layers of 5, 7 and 4 channels) of one kind."""
    g = torch.Generator().manual_seed(3)
    rows = torch.rand(n, 16, generator=g) * (torch.rand(n, 16, generator=g) > 0.3)
    if kind == "ties":  # values 0, 1, 2 equally often: every mean is exactly 1
        rows = (torch.arange(n * 16) % 3).float().view(16, n).T.contiguous()
        rows = rows[torch.randperm(n, generator=g)]
        rows[:, 5] = 0.5  # a constant channel: every document ties with the mean
        rows[:, 6] = 0.0  # a dead channel
        rows[7] = 0.0  # a document with no activation at all
    if kind == "ordered":  # the mean keeps moving: streamed intervals cannot hold it
        rows = rows * torch.linspace(0.1, 3.0, n)[:, None]
    if kind == "sparse":  # channels that fire in a few images only, late more than early
        rare = torch.rand(n, 6, generator=g) < torch.linspace(0.001, 0.02, n)[:, None]
        rows[:, 10:16] = rare * torch.rand(n, 6, generator=g) * 50
    return rows


SPANS = [(0, 5), (5, 12), (12, 16)]


def _streamed(rows: torch.Tensor, batch: int = 64, warmup: int = 128):
    from cdprune.importance.documents import MeanCounts, SampleCounts

    counts = SampleCounts(SPANS, warmup=warmup)
    for start in range(0, len(rows), batch):
        counts.add(rows[start:start + batch])
    mean = counts.sums / len(rows)
    df, tf_sum, exact = counts.finish(mean)
    again = MeanCounts(SPANS, mean)
    for start in range(0, len(rows), batch):
        again.add(rows[start:start + batch])
    return (torch.where(exact, df, again.df), torch.where(exact, tf_sum, again.tf), exact,
            counts)


@pytest.mark.parametrize("kind", ["random", "ties", "sparse", "ordered"])
def test_streamed_counts_equal_the_full_matrix(kind):
    from cdprune.importance.scoring import _from_counts, document_counts

    rows = _documents(kind)
    df, tf_sum, exact, counts = _streamed(rows)
    for lo, hi in SPANS:
        ref_df, ref_tf = document_counts(rows[:, lo:hi].T)
        assert torch.equal(df[lo:hi], ref_df)  # counts are exact, ties included
        assert torch.allclose(tf_sum[lo:hi], ref_tf, rtol=1e-12, atol=0)
        assert torch.allclose(_from_counts(len(rows), df[lo:hi], tf_sum[lo:hi], 1.0),
                              tfidf(rows[:, lo:hi].T), rtol=1e-6, atol=0)
    assert exact.all() == (kind != "ordered")  # else a second reading settled them
    if kind == "random":  # only images near each running mean are kept, not all 48,000
        assert counts.kept < 0.25 * rows.numel()


def test_a_batch_keeps_the_values_inside_the_intervals_in_row_order():
    """The entries a batch keeps and counts are exactly those its values imply."""
    from cdprune.importance.documents import SampleCounts

    rows = _documents("random")
    counts = SampleCounts(SPANS, warmup=128)
    for start in range(0, 512, 64):
        counts.add(rows[start:start + 64])
    counts._next_compaction = (10**9, 10**9)  # keep this batch's entries apart
    low, high = counts.low32.clone(), counts.high32.clone()
    df, tf, pieces = counts.above_df.clone(), counts.above_tf.clone(), len(counts.value)
    batch = rows[512:576].T.contiguous().T  # column-major: read as if contiguous
    counts.add(batch)
    values = batch.double()
    totals = torch.cat([values[:, lo:hi].sum(1, keepdim=True).expand(-1, hi - lo)
                        for lo, hi in SPANS], 1)
    share = values / totals.masked_fill(totals == 0, float("inf"))
    inside = (batch >= low) & (batch < high)
    doc, col = inside.nonzero(as_tuple=True)
    assert len(counts.value) == pieces + 1 and doc.numel() > 0
    assert torch.equal(counts.channel[-1], col.to(torch.int32))
    assert torch.equal(counts.value[-1], batch[doc, col])
    assert torch.equal(counts.share[-1], share[doc, col])
    above = batch >= high
    assert torch.equal(counts.above_df - df, above.sum(0).double())
    assert torch.allclose(counts.above_tf - tf, (share * above).sum(0), rtol=1e-12, atol=0)


def test_default_statistics_do_not_grow_with_the_images(small_net, tmp_path):
    sizes = []
    for n in (48, 480):
        loader = make_loader(n=n)
        stats = collect_stats(small_net, loader, progress=False)
        full = collect_stats(small_net, loader, progress=False, keep_features=True)
        assert stats.features is None and full.features.shape == (n, 32)
        for name, score in tfidf_scores(full).items():
            assert torch.allclose(tfidf_scores(stats)[name], score, rtol=1e-6, atol=0), name
        path = stats.save(tmp_path / f"stats{n}.safetensors")
        sizes.append(path.stat().st_size)
        back = ActivationStats.load(path, model=small_net)
        assert all(torch.equal(tfidf_scores(back)[k], v) for k, v in tfidf_scores(stats).items())
        old = ActivationStats.load(full.save(tmp_path / f"full{n}.safetensors"), model=small_net)
        assert all(torch.equal(tfidf_scores(old)[k], v) for k, v in tfidf_scores(full).items())
    assert sizes[0] == sizes[1]  # 10x the images, the same file


def _ordered_loader(n: int = 640):
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, 8, 8, generator=g) * torch.linspace(0.2, 3.0, n)[:, None, None,
                                                                               None]
    return DataLoader(TensorDataset(images, torch.zeros(n, dtype=torch.long)), batch_size=32)


def test_images_in_a_strong_order_are_read_twice_and_stay_exact(small_net, monkeypatch,
                                                                 caplog):
    import cdprune.importance.documents as documents

    monkeypatch.setattr(documents, "WARMUP_IMAGES", 64)
    loader = _ordered_loader()
    with caplog.at_level(logging.INFO, logger="cdprune.importance.stats"):
        stats = collect_stats(small_net, loader, progress=False)
    assert "a second time" in caplog.text
    full = collect_stats(small_net, loader, progress=False, keep_features=True)
    for name, score in tfidf_scores(full).items():
        assert torch.allclose(tfidf_scores(stats)[name], score, rtol=1e-6, atol=0), name

    class Reshuffled:  # yields other images on the second reading
        def __init__(self):
            self.readings = 0

        def __iter__(self):
            self.readings += 1
            return iter(_ordered_loader() if self.readings == 1 else make_loader(n=640))

    with pytest.raises(DataError, match="other images when read a second time"):
        collect_stats(small_net, Reshuffled(), progress=False)


def test_one_shot_loader_keeps_every_vector_and_scores_the_same(small_net, loader):
    once = collect_stats(small_net, iter(list(loader)), progress=False)
    streamed = collect_stats(small_net, loader, progress=False)
    assert once.features is None and once.reduced is not None
    for name, score in tfidf_scores(streamed).items():
        assert torch.allclose(tfidf_scores(once)[name], score, rtol=1e-6, atol=0), name


@pytest.mark.parametrize("tap", ["conv", "act"])
def test_pooled_values_are_bit_identical_to_relu_then_mean(small_net, tap):
    """The hooks pool into reused buffers: the same bits as a fresh ReLU and mean."""
    loader = make_loader(n=44, batch_size=16)  # a short last batch reuses the buffer
    stats = collect_stats(small_net, loader, tap=tap, progress=False, keep_features=True)
    outs = {n: [] for n in stats.layers}
    taps = {"conv1": small_net.bn1, "conv2": small_net.bn2, "conv3": small_net.bn3} \
        if tap == "act" else {n: getattr(small_net, n) for n in stats.layers}
    hooks = [m.register_forward_hook(
        lambda m, i, o, n=n: outs[n].append(o.relu().mean((2, 3), dtype=torch.float32)))
        for n, m in taps.items()]
    with torch.inference_mode():
        for x, _ in loader:
            small_net(x)
    for h in hooks:
        h.remove()
    for name in stats.layers:
        assert torch.equal(stats.matrix(name), torch.cat(outs[name]).T), name
