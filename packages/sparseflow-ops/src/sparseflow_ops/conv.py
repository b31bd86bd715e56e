"""``SparseConv2d``: a drop-in ``nn.Conv2d`` that runs SparseFlow's kernels in inference.

One module covers three jobs, chosen by what :meth:`SparseConv2d.from_dense` is given:

* a convolution alone: :func:`sparse_conv2d` (prescan or the producer's occupancy, then the sparse conv);
* a convolution with the BatchNorm it feeds folded in (``bn=``): the BatchNorm becomes the kernel's
  per-channel ``scale``/``shift`` epilogue and the BatchNorm module itself is bypassed (:mod:`.bypass`);
* a whole spiking layer (``bn=`` and ``neuron=``): :func:`spiking_conv2d`, conv + BatchNorm + neuron over
  all T steps in one kernel; the neuron module is bypassed but keeps its state (``v``), which this module
  reads before and writes after each call, so ``reset_net`` and repeated calls behave as before.

New weights (``load_state_dict``, ``.to``) are picked up automatically: the packed weights and the folded
BatchNorm are cached under the tensors' version counters.

:meth:`SparseConv2d._route` picks one of the forward's five paths per call (``torch``, ``faithful``, ``traced``,
``spiking``, ``conv``); within the last two, each call picks its kernel per input shape and dtype by measurement
(``sparseflow_kernels.dispatch``): sparse or dense fused kernels, the time-in-M variant for small deep layers, or
cuDNN + one fused BatchNorm/neuron kernel; ``mode`` forces one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparseflow_kernels import ConvConfig, sparse_conv2d, tiling
from sparseflow_kernels import dispatch as kdispatch
from sparseflow_kernels.conv import pack_conv_weight, tma_supported
from sparseflow_kernels.library import compiling, neuron_args
from sparseflow_kernels.neuron_pool import pool_args, pool_uncovered
from sparseflow_kernels.sparse_conv import conv_output_size
from sparseflow_kernels.spiking import pool_steps, repeated_over_steps, spiking_conv2d

from ._common import attach_occupancy, attach_shift, find_occupancy, passes_repeated, residual_as, version_key

# (fold_bn, bn_affine and bn_key stay importable from this module: sparseflow_bench imports them here)
from .base import SparseModule, bn_affine, bn_key, check_foldable_bn, check_mode, fold_bn
from .neuron import neuron_kernel
from .neurons import find_adapter, neuron_support
from .sum_spikes import fused_sum_and_spikes, sum_and_spikes, sum_neuron_of, takes_fused_sum


def bias_added_separately(x: torch.Tensor) -> bool:
    """Whether torch adds a convolution's bias to the rounded output in a kernel of its own for inputs like ``x``:
    on the GPU, where cuDNN takes no bias (so a layer writing a sum leaves it to the sum's kernel, which adds it
    rounded the same); the CPU's convolutions add it before rounding, so there it stays with the convolution."""
    return x.is_cuda


class SparseConv2d(SparseModule, nn.Conv2d):
    """Drop-in ``nn.Conv2d`` (same parameters, ``state_dict`` keys and ``isinstance``) running SparseFlow's
    kernels in eval mode; see the module docstring. Inputs ``[N, C, H, W]`` or multi-step
    ``[T, N, C, H, W]`` (SpikingJelly ``step_mode='m'``)."""

    _caches = ("_wcache", "_acache", "_bcache", "_scache", "_tcache")
    write_occupancy = False  # the fused layer writes its spikes' occupancy for a sparse consumer
    defer_shift = False  # cuDNN paths: the bias left to the max pool that alone consumes the output
    # no neuron: a static input's frame convolved once, the output handed on repeated by stride 0 (set by optimize
    # where no reader of the output writes into it)
    static_passthrough = False
    # True when the layer runs fused only with its residual (neuron(bn(conv(x)) + identity), optimize's fx pass):
    # called without one, it is the convolution alone and the BatchNorm and neuron run themselves
    residual_chain = False

    def __init__(self, *args, block_size=None, mode: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.write_occupancy = False
        self.defer_shift = False
        self.static_passthrough = False
        self.residual_chain = False
        self._init_dropin(block_size, mode)

    # -------------------------------------------------------------------------------------- building
    @classmethod
    def from_dense(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None, neuron: nn.Module | None = None,
                   *, block_size=None, mode: str = "auto", time_steps: int | None = None,
                   pool: nn.MaxPool2d | None = None) -> SparseConv2d:
        """Wrap ``conv`` (sharing its parameters). With ``bn`` (eval-mode BatchNorm fed by ``conv``) it is
        folded; with ``neuron`` (fed by ``bn``, or by ``conv``) the whole spiking layer runs fused; with ``pool`` (the
        max pool that alone reads the neuron's spikes) the layer returns the pooled spikes where its kernels run
        (the neuron and the pool in one kernel after cuDNN's convolution, or the fused kernel then the pool), and
        the pool runs itself elsewhere. The caller puts the new module where ``conv`` was; ``bn``, ``neuron`` and
        ``pool`` stay where they are and are bypassed."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_dense expects an nn.Conv2d, got {type(conv).__name__}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding_mode={conv.padding_mode!r} is not supported (only 'zeros')")
        if conv.groups != 1:
            raise ValueError(f"groups={conv.groups} is not supported yet")
        if isinstance(conv.padding, str):
            raise ValueError(f"padding={conv.padding!r} strings are not supported by the fused path")
        check_mode(mode)
        if neuron is not None:
            adapter, why = neuron_support(neuron)
            if adapter is None:
                raise ValueError(f"neuron {type(neuron).__name__} cannot be fused: {why}")
            if conv.dilation != (1, 1):
                raise ValueError("the fused spiking layer supports dilation 1 only")
        check_foldable_bn(bn, conv.out_channels, owner="conv")
        if pool is not None:
            why = "there is no neuron whose spikes it pools" if neuron is None else pool_problem(pool)
            if why:
                raise ValueError(f"pool cannot be fused: {why}")
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                  conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                  device="meta", block_size=block_size, mode=mode)
        new.time_steps = time_steps
        return new._adopt(conv, bn, neuron, pool)

    def to_dense(self) -> nn.Conv2d:
        """The plain convolution back (same parameters), and the bypassed modules restored."""
        return self._dense_copy(nn.Conv2d)

    def kind(self) -> str:
        if self._neuron is not None:
            return ("conv+bn+neuron" if self._bn is not None else "conv+neuron") + \
                ("+pool" if self.fused_pool is not None else "")
        return "conv+bn" if self._bn is not None else "conv"

    # -------------------------------------------------------------------------------------- running
    def _use_kernels(self, x: torch.Tensor) -> bool:
        return super()._use_kernels(x) and (self.block_size != "dense" or self._neuron is not None
                                            or self._bn is not None)

    def _route(self, x: torch.Tensor, residual) -> str:
        """The forward's path for this call, decided here only:

        * ``torch``: the dense modules, called as modules (training mode, hooks, autograd, tensors the kernels
          cannot take; a residual chain called without its residual is the convolution alone);
        * ``faithful``: numerics="faithful", the dense convolution and BatchNorm, the neuron on its kernel;
        * ``traced``: under ``torch.compile``, the registered operators on the path the eager dispatch chose;
        * ``spiking``: the fused spiking layer (:func:`spiking_conv2d`, kernel chosen by measurement);
        * ``conv``: the convolution with its folded BatchNorm (:func:`sparse_conv2d` or cuDNN, by measurement)."""
        if (residual is None and self.residual_chain) or not self._use_kernels(x):
            return "torch"
        if self.faithful:
            return "faithful"
        if compiling():
            return "traced"
        return "spiking" if self._neuron is not None else "conv"

    def _dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 5:
            T, N = x.shape[:2]
            y = F.conv2d(x.flatten(0, 1), self.weight, self.bias, self.stride, self.padding, self.dilation,
                         self.groups)
            return y.view(T, N, *y.shape[1:])
        return self._conv_forward(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                residual_after: bool = False) -> torch.Tensor:
        """``residual`` (only for a fused spiking layer, shaped like the output) is added after the
        BatchNorm and before the neuron, as in ``sn(bn(conv(x)) + identity)`` of a ResNet block; with
        ``residual_after`` it is added to the neuron's spikes instead and the sum returned, as in
        ``sn(bn(conv(x))) + identity`` of a SEW-ResNet block (cnf ADD). A layer writing a sum
        (:func:`~.sum_spikes.link_sum_neuron`, no fused neuron) returns ``bn(conv(x)) + residual``, the spikes of
        the neuron reading it computed in the same kernel."""
        if x.dim() not in (4, 5):
            raise ValueError(f"SparseConv2d expects [N, C, H, W] or [T, N, C, H, W], got {tuple(x.shape)}")
        # as the multi-step SpikingJelly layer says (a layer made with time_steps takes the [T*N, ...] view)
        if getattr(self, "step_mode", None) == "m" and x.dim() != 5 and self.time_steps is None:
            raise ValueError(f"SparseConv2d (step_mode='m'): expected x with shape [T, N, C, H, W], got "
                             f"{tuple(x.shape)}")
        if residual is not None and self._neuron is None:
            if sum_neuron_of(self) is None:
                raise ValueError("SparseConv2d: residual is only accepted by a fused spiking layer or a layer "
                                 "writing a sum (link_sum_neuron)")
            return self._sum_forward(x, residual)
        self._pending = self._pool_pending = False
        route = self._route(x, residual)
        if route == "torch":
            self.last_path = "torch"
            if residual is None:
                return self._dense_forward(x)
            return self._dense_residual_forward(x, residual, residual_after)
        run = {"faithful": self._faithful_forward, "traced": self._compiled_forward,
               "spiking": self._spiking_forward, "conv": self._conv_forward_kernels}[route]
        if residual is not None and residual_after and residual.dtype != x.dtype:
            out = residual + run(x)  # the dense add's type promotion
        else:
            out = run(x, residual, residual_after)
        self._pending = (self._bn is not None or self._neuron is not None) and residual is None
        return out

    def _sum_forward(self, x, residual):
        """``bn(conv(x)) + residual`` for a layer writing a sum (``sum_spikes``), with the spikes of the neuron
        reading the sum, on the path measured fastest: the convolution (on its own measured path), then the add and
        the neuron in one kernel (``pair``); or one fused kernel that writes the sum and the spikes
        (``sum_<tiling>``, :func:`spiking_conv2d` with ``return_sum``), where the neuron takes spikes from this
        layer for this call. Through the modules where the kernels do not run."""
        if self._route(x, None) == "torch":
            self.last_path = "torch"
            y = self._dense_forward(x)
            return (self._bn(y) if self._bn is not None else y) + residual
        self._pending = False  # (the BatchNorm is not called: the add took its place)
        cands = self._fused_sum_candidates(x, residual)
        if not cands:
            return self._pair_sum(x, residual)
        cands["pair"] = lambda: self._pair_sum(x, residual)
        key = ("sum", tuple(x.shape), x.stride(), x.dtype, self.out_channels, self.kernel_size, self.stride,
               self.padding, residual.stride(), residual.dtype)
        if kdispatch.cached(key) is None and kdispatch.forced(key, cands) is None:
            cands["pair"]()  # (the convolution's own choice is measured now, not inside this one's measurement)
        return self._dispatch(key, cands, x, fallback="pair", default="pair")

    def _pair_sum(self, x, residual):
        """The convolution on its own measured path, then ``sum_and_spikes``: the add, the spikes of the neuron
        reading the sum (and a bias the convolution left out) in one kernel."""
        # where torch adds a convolution's bias in a kernel of its own, the sum's kernel does that add instead
        defer, self.defer_shift = self.defer_shift, self.defer_shift or bias_added_separately(x)
        try:
            y = self.forward(x)
        finally:
            self.defer_shift = defer
        self._pending = False
        return sum_and_spikes(self, y, residual)

    def _fused_sum_candidates(self, x, residual) -> dict:
        """{``sum_<tiling>``: the fused kernel writing ``bn(conv(x)) + residual`` and the sum neuron's spikes} for a
        measured choice (``mode="auto"``) of a multi-step call whose sum neuron takes spikes from this layer
        (``takes_fused_sum``) and whose input is not repeated over the steps (the pair convolves that once); else
        empty."""
        if self.mode != "auto" or x.dim() != 5 or self.dilation != (1, 1) or repeated_over_steps(x):
            return {}
        T, N, C, H, W = x.shape
        # (the residual shaped, typed and placed as the layer's output stands for it in the offer's conditions)
        out_shape = (T, N, self.out_channels, *self._output_hw(H, W))
        if (tuple(residual.shape) != out_shape or residual.dtype != x.dtype or residual.device != x.device
                or not takes_fused_sum(self, residual)):
            return {}
        scale, shift = self._affine_with_bias()

        def fused(c):
            def run(spec, v0):
                return spiking_conv2d(x, self.weight, None, self.stride, self.padding, scale=scale, shift=shift,
                                      neuron=spec, v=v0, return_v=True, v_dtype=x.dtype, residual=residual,
                                      return_sum=True, config=c, packed_weight=self._packed(c, x.dtype))
            return lambda: fused_sum_and_spikes(self, residual, run)

        tma = tma_supported(x.flatten(0, 1), self.kernel_size, self.stride, self.padding, self.dilation)
        return {f"sum_{name}": fused(c) for name, c in spiking_configs(C, self.out_channels, T, tma, N=N).items()}

    def _dense_residual_forward(self, x, residual, after=False):
        """conv -> bn -> (+ residual) -> neuron (-> + residual) with the original modules, called as modules (their
        hooks run; training, CPU, autograd)."""
        y = self._dense_forward(x)
        bn, neuron = self._bn, self._neuron
        if bn is not None:
            y = bn(y)
        if after:
            return residual + neuron(y)
        y = y + residual
        return neuron(y)

    def _faithful_forward(self, x, residual=None, residual_after=False):
        """The dense convolution and BatchNorm modules' own computation, then the neuron (and the residual add)
        on the multi-step kernel with the spikes in the layout the dense neuron writes."""
        self.last_path = "faithful"
        y = self._dense_forward(x)
        bn, neuron = self._bn, self._neuron
        if bn is not None:
            y = type(bn).forward(bn, y)
        if neuron is None:
            return y
        adapter, spec = self._neuron_spec()
        y5 = self._steps(y, adapter)
        res5 = residual_as("SparseConv2d", residual, y5.shape)
        spikes = neuron_kernel(neuron, y5, spec=spec, residual=res5, residual_after=residual_after,
                               preserve_layout=True)
        if y.dim() == 5:
            return spikes
        return spikes.flatten(0, 1) if adapter.is_multistep(neuron) else spikes[0]

    def _config(self, C, CO):
        return tiling.conv_config(C, CO, self.block_size)

    def _packed(self, cfg: ConvConfig, dtype):
        key = (*version_key(self.weight), cfg.block_k, cfg.block_n, cfg.im2col, dtype)
        return self._wcache.get(key, lambda: pack_conv_weight(self.weight, cfg, dtype))

    def _torch_weights(self, fold: bool, pad_to: int | None = None):
        """(weight, bias) for the cuDNN paths, which run channels_last: the weight channels_last too (with an NCHW
        weight cuDNN converts the activations on every call), the BatchNorm folded in when ``fold`` (no separate
        BatchNorm pass). ``pad_to``: input channels zero-padded to that many (see ``_conv_forward_kernels``)."""
        bn = self._bn if fold else None
        key = (*version_key(self.weight, self.bias), bn_key(bn), pad_to)

        def compute():
            w, b = fold_bn(self.weight.detach(), None if self.bias is None else self.bias.detach(), bn)
            if pad_to is not None and pad_to > w.shape[1]:
                w = F.pad(w, (0, 0, 0, 0, 0, pad_to - w.shape[1]))
            return w.contiguous(memory_format=torch.channels_last), b

        return self._tcache.get(key, compute)

    def _bias_out(self, y, b, defer: bool):
        """cuDNN's output without its bias: left to the max pool that consumes it (``defer_shift``, attached to
        ``y``), else added here."""
        if b is not None and defer and not attach_shift(y, b):
            y.add_(b.view(1, -1, 1, 1).to(y.dtype))
        return y

    # -- conv (+ folded BN)
    def _conv_forward_kernels(self, x, residual=None, residual_after=False):
        """The convolution (+ folded BatchNorm; never a residual) on the path measured fastest: the sparse or dense
        kernel, cuDNN channels_last, or cuDNN on the image's channels zero-padded to 8. With ``static_passthrough``,
        an input repeated over the steps by stride 0 (a static image, or such a layer's output) is convolved once per
        sample and handed on repeated by stride 0 (path ``<path>_static``): ``conv(x[t]) = conv(x[0])``; a bias left
        to the max pool (``defer_shift``) stays attached to the repeated output, which that pool then pools once.
        Not while ``torch.export`` traces the call: the program must hold for any input of the example's shape."""
        five = x.dim() == 5
        if five and self.static_passthrough and passes_repeated(x):
            y = self._conv_forward_kernels(x[0])
            self.last_path = f"{self.last_path}_static"
            return y.unsqueeze(0).expand(x.shape[0], *y.shape)
        flat = x.flatten(0, 1) if five else x
        C = flat.shape[1]
        cfg = self._config(C, self.out_channels)
        scale, _ = self._affine()
        occ = find_occupancy(x, flat)

        def run_kernel(dense, c=cfg):
            sc, sh = self._affine_with_bias()
            return sparse_conv2d(flat, self.weight, None, self.stride, self.padding, self.dilation,
                                 config=c, packed_weight=self._packed(c, x.dtype), scale=sc,
                                 shift=sh, occupancy=occ, dense=dense)

        defer = self.defer_shift

        def run_torch():  # cuDNN in channels_last (its NCHW fp16 kernels were 2x slower on the H100)
            w, b = self._torch_weights(fold=True)
            y = F.conv2d(flat.contiguous(memory_format=torch.channels_last), w, None if defer else b, self.stride,
                         self.padding, self.dilation)
            return self._bias_out(y, b, defer)

        def run_torch_pad8():
            # an image (3 channels) zero-padded to 8, for cuDNN's kernels for aligned channels; the zero channels
            # add exact zeros. A candidate only: on Spikformer's stem ([32, 3, 224, 224] fp16, H100) it measured
            # 0.143 ms against 0.115 ms for the unpadded channels_last conv once the bias went to the max pool
            w, b = self._torch_weights(fold=True, pad_to=8)
            B, _, H, W = flat.shape
            xp = torch.empty((B, 8, H, W), dtype=flat.dtype, device=flat.device, memory_format=torch.channels_last)
            xp[:, C:].zero_()
            xp[:, :C].copy_(flat)
            y = F.conv2d(xp, w, None if defer else b, self.stride, self.padding, self.dilation)
            return self._bias_out(y, b, defer)

        cands = {"dense": lambda: run_kernel(True), "torch": run_torch}
        if C < 8 and self.dilation == (1, 1):
            cands["torch_pad8"] = run_torch_pad8
        if C < 16:  # few channels (an image): the reduction over (tap, channel) pairs in blocks of 32
            cands["im2col"] = lambda: run_kernel(True, tiling.im2col_conv_config(self.out_channels))
        if self.block_size != "dense" and triton_groups_ok(C, cfg):
            cands["sparse"] = lambda: run_kernel(False)
        key = ("conv", tuple(flat.shape), flat.stride(), x.dtype, self.out_channels, self.kernel_size,
               self.stride, self.padding, self.dilation, occ is not None, scale is not None,
               self.block_size, defer)
        y = self._dispatch(key, cands, x)
        return y.view(*x.shape[:2], *y.shape[1:]) if five else y

    # -- under torch.compile: the registered ops (torch.ops.sparseflow.*), with the path the eager dispatch chose
    def _compiled_forward(self, x, residual=None, residual_after=False):
        """The forward as Dynamo traces it: no timing, no version caches, no occupancy hand-over. The path is the
        one the eager dispatch measured for this shape (run the model once eagerly before compiling), else the
        dense fused kernel; BatchNorm folding and weight packing are part of the graph unless already cached."""
        bn = self._bn
        scale, shift = bn_affine(bn) if bn is not None else (None, None)
        if self._neuron is None:
            flat = x.flatten(0, 1) if x.dim() == 5 else x
            path = (self.last_path or "torch").removesuffix("_static")
            if path not in ("sparse", "dense", "im2col"):
                # the eager cuDNN candidates' arithmetic, rounding for rounding: the BatchNorm folded into the
                # weights, channels_last, the bias added to the rounded conv output (as cuDNN's separate bias pass,
                # and as the max pool that takes a deferred bias); a scale applied after an fp16 conv rounds
                # differently, and the network amplifies any spike that flips
                w, b = fold_bn(self.weight, self.bias, bn)
                if path == "torch_pad8":  # the image's channels zero-padded to 8, as the eager candidate
                    pad = (0, 0, 0, 0, 0, 8 - flat.shape[1])
                    flat, w = F.pad(flat, pad), F.pad(w, pad)
                y = F.conv2d(flat.contiguous(memory_format=torch.channels_last),
                             w.contiguous(memory_format=torch.channels_last), None, self.stride, self.padding,
                             self.dilation)
                if b is not None:
                    y = y + b.view(1, -1, 1, 1)
            else:  # eager's configuration and packed weight (a constant of the weights: folded by export)
                cfg = tiling.im2col_conv_config(self.out_channels) if path == "im2col" else \
                    self._config(flat.shape[1], self.out_channels)
                packed = pack_conv_weight(self.weight, cfg, x.dtype)
                y = torch.ops.sparseflow.conv2d(flat, self.weight, self.bias, list(self.stride), list(self.padding),
                                                list(self.dilation), scale, shift, packed, list(cfg.key()),
                                                path in ("dense", "im2col"))
            return y.view(*x.shape[:2], *y.shape[1:]) if x.dim() == 5 else y
        neuron = self._neuron
        adapter = find_adapter(neuron)
        spec = adapter.spec(neuron)
        if x.dim() == 5:
            x5 = x
        elif adapter.is_multistep(neuron):
            T = self.time_steps
            x5 = x.view(T, x.shape[0] // T, *x.shape[1:])
        else:
            x5 = x.unsqueeze(0)
        T, N, C, H, W = x5.shape
        OH, OW = self._output_hw(H, W)
        v0 = adapter.get_v(neuron, (N, self.out_channels, OH, OW), x.device)
        res5 = residual.reshape(T, N, self.out_channels, OH, OW) if residual is not None else None
        # (the operator convolves a static input once itself; a max pool after the neuron runs as its own module here)
        path = (self.last_path or "fused_dense").removesuffix("_then_pool").removesuffix("_static")
        path = "cudnn" if path == "im2col_pair" else path  # (the operator's pair convolves on cuDNN)
        cfgs = spiking_configs(C, self.out_channels, T, tma=path.startswith("tma"))
        cfg = cfgs.get(path) or (self._config(C, self.out_channels) if path == "fused_sparse" else None)
        packed = None if cfg is None or path == "cudnn" else pack_conv_weight(self.weight, cfg,
                                                                         x.dtype)
        # the cuDNN path's weight channels_last, as eager's (cuDNN's algorithm, hence its rounding, follows layouts)
        weight = self.weight.contiguous(memory_format=torch.channels_last) if path == "cudnn" else self.weight
        spikes, v = torch.ops.sparseflow.spiking_conv2d(
            x5, weight, self.bias, list(self.stride), list(self.padding), scale, shift, res5, v0, packed,
            *neuron_args(spec), list(cfg.key()) if cfg is not None else [], path == "cudnn", path == "fused_sparse",
            x.dtype, residual is not None and residual_after)
        adapter.set_v(neuron, v, x.dtype)
        if x.dim() == 5:
            return spikes
        return spikes.flatten(0, 1) if adapter.is_multistep(neuron) else spikes[0]

    # -- spiking layer
    def _output_hw(self, H: int, W: int) -> tuple[int, int]:
        """The output's height and width for an ``H x W`` input (the fused layers' dilation is 1)."""
        return tuple(conv_output_size(n, k, s, p, 1) for n, k, s, p in zip((H, W), self.kernel_size, self.stride,
                                                                             self.padding))

    def _neuron_spec(self):
        """(adapter, NeuronSpec) of the fused neuron, the spec cached under the neuron's parameters."""
        neuron = self._neuron
        adapter = find_adapter(neuron)
        spec_key = adapter.spec_key(neuron)
        spec = adapter.spec(neuron) if spec_key is None else self._scache.get(spec_key, lambda: adapter.spec(neuron))
        return adapter, spec

    def _steps(self, x, adapter):
        """``x`` as ``[T, N, ...]``: as given (5-D), a ``[T*N, ...]`` batch split by the T seen by ``optimize``
        (multi-step neuron), or one time step (single-step mode, snnTorch)."""
        if x.dim() == 5:
            return x
        if adapter.is_multistep(self._neuron):
            T = self.time_steps
            if not T:
                raise ValueError(f"SparseConv2d: expected x with shape [T, N, C, H, W] (the shape the model was "
                                 f"optimized with), got {tuple(x.shape)}")
            if x.shape[0] % T:
                raise RuntimeError(
                    f"SparseConv2d: a [T*N, ...] input of batch {x.shape[0]} does not match the T={T} seen "
                    "when the model was optimized; run sparseflow.optimize again for the new T"
                )
            return x.view(T, x.shape[0] // T, *x.shape[1:])
        return x.unsqueeze(0)

    def _spiking_forward(self, x, residual=None, residual_after=False):
        neuron = self._neuron
        adapter, spec = self._neuron_spec()
        x5 = self._steps(x, adapter)
        T, N, C, H, W = x5.shape
        scale, shift = self._affine_with_bias()  # (the kernels take the convolution's bias folded in)
        cfg = self._config(C, self.out_channels)
        OH, OW = self._output_hw(H, W)
        v0 = adapter.get_v(neuron, (N, self.out_channels, OH, OW), x.device)
        # a static input (repeated over the steps by stride 0): the cuDNN path and the fused steps-looped tiles
        # convolve each sample's frame once (spiking_conv2d), named "<path>_static"
        static = repeated_over_steps(x5)
        flat = x5[0] if static else x5.flatten(0, 1)  # (the frames the convolution reads; no copy of a static one)
        occ = find_occupancy(x, flat) if x5 is x and not static else None
        res5 = residual_as("SparseConv2d", residual, (T, N, self.out_channels, OH, OW))
        after = res5 is not None and residual_after
        common = dict(scale=scale, shift=shift, neuron=spec, v=v0, return_v=True, residual=res5, residual_after=after)
        write_occ = self.write_occupancy and not after  # (the output is not spikes then)
        pool = self._pool_args(OH, OW) if res5 is None and not write_occ else None
        if pool is not None:
            common["pool"] = pool
        weight = self.weight

        def fused(c, sparse):
            return spiking_conv2d(x5, weight, None, self.stride, self.padding, config=c, v_dtype=x.dtype,
                                  packed_weight=self._packed(c, x.dtype), occupancy=occ if sparse else None,
                                  sparse=sparse and occ is None, write_occupancy=write_occ, **common)

        def cudnn(pool_in_neuron=True):
            w, _ = self._torch_weights(fold=False)
            if pool_in_neuron or pool is None:
                return spiking_conv2d(x5, w, None, self.stride, self.padding, path="cudnn", v_dtype=x.dtype, **common)
            kw = {k: v for k, v in common.items() if k != "pool"}
            spikes, v = spiking_conv2d(x5, w, None, self.stride, self.padding, path="cudnn", v_dtype=x.dtype, **kw)
            return pool_steps(spikes, pool), v

        cands = {}
        tma = not write_occ and tma_supported(flat, self.kernel_size, self.stride, self.padding, self.dilation)
        cands_cfgs = spiking_configs(C, self.out_channels, T, tma, N=N)
        for cname, c in cands_cfgs.items():
            cands[f"{cname}_static" if static and not c.t_in_m else cname] = \
                (lambda c=c: fused(c, False))
        if self.block_size != "dense" and triton_groups_ok(C, cfg):
            cands["fused_sparse"] = lambda: fused(cfg, True)
        if not write_occ:
            cands["cudnn_static" if static else "cudnn"] = cudnn
            if pool is not None:  # (the neuron kernel, then the max pool kernel: measured against the one pass)
                cands["cudnn_static_then_pool" if static else "cudnn_then_pool"] = lambda: cudnn(False)
            if any(c.im2col for c in cands_cfgs.values()):  # an image stem of few channels: the same pair with the
                # convolution on the (tap, channel) im2col kernel, where cuDNN pads the channels
                pc = tiling.im2col_conv_config(self.out_channels)
                cands["im2col_pair_static" if static else "im2col_pair"] = lambda: spiking_conv2d(
                    x5, weight, None, self.stride, self.padding, path="triton_conv", config=pc,
                    packed_weight=self._packed(pc, x.dtype), v_dtype=x.dtype, **common)
        key = ("spiking", tuple(x5.shape), x.dtype, self.out_channels, self.kernel_size, self.stride,
               self.padding, occ is not None, write_occ, spec.kind, residual is not None, after, static, pool)
        dense = "fused_dense_static" if "fused_dense_static" in cands else "fused_dense"
        res = self._dispatch(key, cands, x, fallback=dense, default=dense,
                             forced={"sparse": "fused_sparse", "dense": dense,
                                     "torch": "cudnn_static" if static else "cudnn"})
        spikes, v = res[0], res[1]
        if write_occ and len(res) == 3:
            attach_occupancy(spikes, spikes.flatten(0, 1), res[2])
        adapter.set_v(neuron, v, x.dtype)
        self._pool_pending = pool is not None  # (the pool module hands the pooled spikes through)
        if x.dim() == 5:
            return spikes
        return spikes.flatten(0, 1) if adapter.is_multistep(neuron) else spikes[0]

    def _pool_args(self, OH: int, OW: int):
        """``(kernel, stride, padding)`` of the fused max pool where this layer pools an ``OH x OW`` map of spikes in
        this call (every pixel in a window: the neuron's membrane is computed there), else None."""
        pool = self.fused_pool
        if pool is None:
            return None
        args = pool_args(pool.kernel_size, pool.stride, pool.padding, "SparseConv2d")
        return None if pool_uncovered(OH, OW, *args) else args


def pool_problem(pool: nn.Module, hw: tuple[int, int] | None = None) -> str:
    """Why the max pool ``pool`` cannot be run by the spiking layer before it (:meth:`SparseConv2d.from_dense`'s
    ``pool``), on spike maps of ``hw`` (height, width) where given, or ''."""
    if not isinstance(pool, nn.MaxPool2d):
        return f"{type(pool).__name__} is not an nn.MaxPool2d"
    if pool.return_indices:
        return "it returns indices"
    if pool.ceil_mode:
        return "ceil_mode=True"
    if pool.dilation not in (1, (1, 1)):
        return f"dilation={pool.dilation}"
    try:
        args = pool_args(pool.kernel_size, pool.stride, pool.padding, "max pool")
    except ValueError as e:
        return str(e)
    return pool_uncovered(*hw, *args) if hw is not None else ""


def spiking_configs(C: int, CO: int, T: int, tma: bool = False, N: int | None = None) -> dict[str, ConvConfig]:
    """The dense fused-kernel configurations a spiking layer measures (``sparseflow_kernels.tiling``)."""
    return tiling.spiking_configs(C, CO, T, tma, N=N)


def triton_groups_ok(C: int, cfg: ConvConfig) -> bool:
    return tiling.conv_groups_fit(C, cfg)
