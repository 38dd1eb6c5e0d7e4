"""The forward hooks of a statistics pass: each scored layer's output, ReLU'd and pooled.

:class:`Collector` pools every scored layer of a batch into one ``[B, channels]`` row
block. The pass should cost little more than plain inference, and on a CPU its extra cost
is memory traffic: the ReLU written out and read back by the mean. This keeps that
traffic down without changing a single bit of the pooled values:

* Nothing is allocated per batch: the ReLU goes into one reused scratch, the pooled
  values straight into a reused row buffer (fresh large tensors cost page faults).
* Where a conv output is read by one BatchNorm and by nothing else (most CNNs), the ReLU
  is taken in place on that output once the BatchNorm has read it: the data is still in
  cache and no scratch line is written. Which outputs qualify is not guessed from the
  module tree: :class:`ReaderProbe` watches every torch call of the first batch and
  records who reads each output. The later batches are trusted to take the same path
  (a model in eval mode whose forward read a conv output elsewhere for some inputs only
  would defeat this; the CNNs and transformers tried do not).
* An in-place output larger than the caches (ResNet-50's first stages at 224 px) is
  ReLU'd and averaged a few images at a time, so the mean reads each chunk's ReLU from
  the cache, not from memory.
* Every hook makes its module's call slower. Where a layer and its BatchNorm each ran
  once, the BatchNorm's hook alone pools the layer (its input is the layer's output), so
  in a plain CNN there is one hook per scored layer.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from ..errors import ConfigError
from .activations import layer_width

__all__ = ["Collector", "ReaderProbe"]

_BATCHNORM = nn.modules.batchnorm._BatchNorm
# A CPU conv output pooled in place is ReLU'd and averaged in chunks of whole images of
# about this size (bytes), so the mean reads the ReLU back from the caches, not memory.
# 8 MiB measured best on a 2-core EPYC (32 MiB L3) for ResNet-50's 51 MB outputs;
# outputs of this size or less (ResNet-56's at batch 128) are pooled whole.
CHUNK_BYTES = 8 << 20


class ReaderProbe(TorchFunctionMode):
    """Who reads each watched tensor during one forward pass.

    A conv output may be clamped in place after its BatchNorm only if that BatchNorm
    call is the one and only reader: read once by exactly one BatchNorm, never read
    outside that call (not by a residual addition, a concatenation, a view taken for
    later, a second BatchNorm), and not aliased by the BatchNorm's output. Every torch
    function and tensor method called from Python passes through this mode, so an
    unseen reader would have to bypass Python altogether (a scripted model), in which
    case no BatchNorm call is seen either and the output keeps the scratch path.
    """

    def __init__(self) -> None:
        super().__init__()
        self.watched: dict[int, tuple[weakref.ref, int]] = {}  # id -> (tensor, layer)
        self.inside: list[int] = []  # ids of the inputs of the BatchNorm calls running
        self.norm_reads: dict[int, int] = {}  # layer -> BatchNorm calls that read it
        self.reader: dict[int, nn.Module] = {}  # layer -> the BatchNorm that read it
        self.stray_reads: set[int] = set()  # layers read outside their BatchNorm call
        self.aliased: set[int] = set()  # layers whose BatchNorm returned a view of them
        self.outputs: dict[int, int] = {}  # layer -> outputs it produced (calls)
        self.norm_calls: dict[nn.Module, int] = {}  # BatchNorm -> times it ran
        self.paused = False

    def watch(self, index: int, tensor: torch.Tensor) -> None:
        self.watched[id(tensor)] = (weakref.ref(tensor), index)
        self.outputs[index] = self.outputs.get(index, 0) + 1

    def layer_of(self, tensor: Any) -> int | None:
        entry = self.watched.get(id(tensor))
        if entry is None or entry[0]() is not tensor:  # an id reused after a free
            return None
        return entry[1]

    def norm_started(self, norm: nn.Module, x: torch.Tensor) -> None:
        self.norm_calls[norm] = self.norm_calls.get(norm, 0) + 1
        index = self.layer_of(x)
        if index is not None:
            self.norm_reads[index] = self.norm_reads.get(index, 0) + 1
            self.reader[index] = norm
        self.inside.append(id(x))

    def norm_ended(self, x: torch.Tensor, output: Any) -> None:
        if self.inside:
            self.inside.pop()
        index = self.layer_of(x)
        if index is None:
            return
        self.paused = True  # reading the storages is not the model's doing
        try:
            if not isinstance(output, torch.Tensor) or (
                    output.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()):
                self.aliased.add(index)
        finally:
            self.paused = False

    def in_place_layers(self) -> dict[int, nn.Module]:
        """Layers whose output only one BatchNorm call read, with that BatchNorm."""
        return {i: self.reader[i] for i, reads in self.norm_reads.items()
                if reads == 1 and i not in self.stray_reads and i not in self.aliased}

    def sole_inputs(self) -> dict[int, nn.Module]:
        """In-place layers that ran once and whose BatchNorm ran once, on their output:
        that BatchNorm's input *is* the layer's output, so its hook alone can pool it."""
        return {i: norm for i, norm in self.in_place_layers().items()
                if self.outputs.get(i) == 1 and self.norm_calls.get(norm) == 1}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.paused and self.watched:
            for leaf in tree_leaves((args, kwargs)):
                if isinstance(leaf, torch.Tensor):
                    index = self.layer_of(leaf)
                    if index is not None and id(leaf) not in self.inside:
                        self.stray_reads.add(index)
        return func(*args, **kwargs)


class Collector:
    """Forward hooks that pool each scored layer's output into one row block per batch.

    With ``tap="act"`` the value pooled is the output of the BatchNorm that reads the conv
    output (found by tensor identity while the model runs); a conv without one falls back
    to its own output. With ``tap="conv"`` it is the conv output itself, taken in place
    after its BatchNorm where :class:`ReaderProbe` found that safe on the first batch.
    Either way the pooled values are bit-identical to ``output.relu().mean((2, 3))`` of a
    contiguous output. An in-place output larger than :data:`CHUNK_BYTES` is pooled a
    few images at a time; smaller ones whole (for those, on a 2-core CPU, the calls of
    chunking cost more than the cache misses they save).

    Call :meth:`forward` for each batch, then :meth:`take` for its rows.
    """

    def __init__(self, modules: Sequence[nn.Module], model: nn.Module, tap: str = "conv"):
        self.spans: list[tuple[int, int]] = []
        start = 0
        for m in modules:
            self.spans.append((start, start + layer_width(m)))
            start += layer_width(m)
        self.total = start
        self.linear = [isinstance(m, nn.Linear) for m in modules]
        self.rows = torch.empty(0, start)
        self.targets: dict[tuple[int, int], torch.Tensor] = {}  # views of rows, reused
        self.written = [False] * len(modules)
        self.batch = 0
        self.scratch = torch.empty(0)
        self.tap = tap
        self.in_place: set[int] = set()  # layers whose ReLU is taken on their output
        self.late: set[int] = set()  # of those, layers that hand their output over by id
        self.pending: dict[int, tuple[int, torch.Tensor]] = {}
        self.probe: ReaderProbe | None = None
        # act pools every BatchNorm'd layer late anyway; a torch.compile'd model would
        # trace the probe's bookkeeping, so it keeps the scratch path.
        self.probed = tap != "conv" or hasattr(model, "_orig_mod")
        norms = [m for m in model.modules() if isinstance(m, _BATCHNORM)]
        self.layer_handles = {i: m.register_forward_hook(self._conv_hook(i))
                              for i, m in enumerate(modules)}
        self.handles: list[Any] = []
        if tap == "act":  # with conv, only the BatchNorms the probe picks get one
            self.handles += [m.register_forward_hook(self._norm_hook) for m in norms]
        self.probe_handles = [] if self.probed else [
            h for m in norms for h in (m.register_forward_pre_hook(self._probe_norm_start),
                                       m.register_forward_hook(self._probe_norm_end))]

    # ------------------------------------------------------------------ hooks
    def _conv_hook(self, index: int):
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            if self.tap == "act" or index in self.late:
                self.pending[id(output)] = (index, output)
                return
            if self.probe is not None:
                self.probe.paused = True  # our own reads are not the model's
            self._pool(index, output)
            if self.probe is not None:
                self.probe.paused = False
                if not self.linear[index]:
                    self.probe.watch(index, output)
        return hook

    def _norm_hook(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if not self.pending or not inputs:
            return
        entry = self.pending.get(id(inputs[0]))
        if entry is None or entry[1] is not inputs[0]:
            return
        del self.pending[id(inputs[0])]
        index, conv_output = entry
        if self.tap == "act":
            self._pool(index, output)
        else:  # only this BatchNorm read the conv output, and it is done with it
            self._pool(index, conv_output, in_place=conv_output.is_contiguous())

    def _sole_input_hook(self, index: int):
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            x = inputs[0]  # the layer's output, which only this call read
            self._pool(index, x, in_place=x.is_contiguous())
        return hook

    def _probe_norm_start(self, module: nn.Module, inputs: Any) -> None:
        if self.probe is not None and inputs:
            self.probe.norm_started(module, inputs[0])

    def _probe_norm_end(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if self.probe is not None and inputs:
            self.probe.norm_ended(inputs[0], output)

    # ------------------------------------------------------------------ pooling
    def _pool(self, index: int, output: torch.Tensor, in_place: bool = False) -> None:
        """ReLU then spatial mean of one layer's output into its block of the row buffer;
        float32 even under autocast so the sums stay accurate."""
        n = output.shape[0]
        target = self.targets.get((index, n))
        if target is None:
            if self.rows.shape[0] < n or self.rows.device != output.device:
                self.rows = torch.empty(n, self.total, device=output.device)
                self.targets.clear()
            lo, hi = self.spans[index]
            target = self.targets[(index, n)] = self.rows[:n, lo:hi]
        self.batch = n
        if in_place and self._pool_in_chunks(output, target):
            self.written[index] = True
            return
        if in_place:
            relu = output.clamp_min_(0)
        else:
            relu = torch.clamp_min(output, 0, out=self._scratch(output))
        if self.linear[index]:  # a transformer's MLP hidden layer: [B, tokens..., C]
            torch.mean(relu.flatten(1, -2), dim=1, dtype=torch.float32, out=target)
        else:  # a convolution: [B, C, H, W]
            torch.mean(relu, dim=(2, 3), dtype=torch.float32, out=target)
        self.written[index] = True

    @staticmethod
    def _pool_in_chunks(output: torch.Tensor, target: torch.Tensor) -> bool:
        """ReLU and mean a large CPU conv output a few images at a time, in place.

        Whole, the ReLU of a conv output larger than the caches is written back to memory
        and read from there again by the mean; a chunk's is still cached when the mean
        reads it. Each (image, channel) mean is one reduction of its own plane whichever
        images share the call, so the values stay bit-identical, except for a chunk with a
        single plane, which torch would split across threads: a one-channel output is
        never chunked. Returns False (nothing done) where chunks would not help.
        """
        n = output.shape[0]
        if output.device.type != "cpu" or output.dim() != 4 or output.shape[1] < 2:
            return False
        step = max(1, CHUNK_BYTES // max(1, output.numel() // n * output.element_size()))
        if step >= n:
            return False
        for i in range(0, n, step):
            torch.mean(output[i:i + step].clamp_min_(0), dim=(2, 3), dtype=torch.float32,
                       out=target[i:i + step])
        return True

    def _scratch(self, output: torch.Tensor) -> torch.Tensor:
        # Hooks run one after another, so one scratch buffer serves them all. Writing the
        # ReLU into reused memory instead of a fresh tensor avoids the page faults of a
        # large allocation per layer, which cost more than the ReLU itself on a CPU.
        size = output.numel()
        if (self.scratch.numel() < size or self.scratch.dtype != output.dtype
                or self.scratch.device != output.device):
            self.scratch = torch.empty(size, dtype=output.dtype, device=output.device)
        return self.scratch[:size].view(output.shape)

    # ------------------------------------------------------------------ per batch
    def forward(self, model: nn.Module, images: torch.Tensor) -> None:
        """Run one batch through ``model`` with the hooks on (the first one watched by
        :class:`ReaderProbe`)."""
        if self.probed:
            model(images)
            return
        self.probe = ReaderProbe()
        try:
            with self.probe:
                model(images)
        finally:
            probe, self.probe = self.probe, None
            for h in self.probe_handles:
                h.remove()
            self.probe_handles = []
            self.probed = True
        readers = probe.in_place_layers()
        # Every hook makes its module's call slower, so where the BatchNorm's input is known
        # to be the layer's output its hook alone pools it, and the layer keeps none; the
        # other in-place layers hand their output over by tensor identity.
        sole = probe.sole_inputs()
        for index, norm in sole.items():
            self.layer_handles.pop(index).remove()
            self.handles.append(norm.register_forward_hook(self._sole_input_hook(index)))
        self.in_place = set(readers)
        self.late = self.in_place - set(sole)
        self.handles += [m.register_forward_hook(self._norm_hook) for m in
                         {id(m): m for i, m in readers.items() if i not in sole}.values()]

    def take(self) -> torch.Tensor:
        """The ``[images, channels]`` pooled rows of the batch just run (a view of the
        reused buffer: consume it before the next batch)."""
        for index, output in self.pending.values():  # convs no BatchNorm read
            self._pool(index, output)
        self.pending.clear()
        if not any(self.written):
            raise ConfigError("none of the scored layers ran in the model's forward pass")
        for (lo, hi), written in zip(self.spans, self.written):
            # A layer that does not run in eval mode (GoogLeNet's and Inception v3's
            # auxiliary classifiers) is never active: zeros. It is outside the traced
            # graph, so it is never pruned.
            if not written:
                self.rows[:self.batch, lo:hi] = 0
        self.written = [False] * len(self.written)
        return self.rows[:self.batch]

    def remove(self) -> None:
        for h in [*self.layer_handles.values(), *self.handles, *self.probe_handles]:
            h.remove()
        self.layer_handles, self.handles, self.probe_handles = {}, [], []
        self.scratch = torch.empty(0)
        self.rows = torch.empty(0, self.total)
        self.targets.clear()
        self.pending.clear()
