"""``SparseConv2d``: a drop-in ``nn.Conv2d`` that runs SparseFlow's kernels in inference.

One module covers three jobs, chosen by what :meth:`SparseConv2d.from_dense` is given:

* a convolution alone: :func:`sparse_conv2d` (prescan or the producer's occupancy, then the sparse conv);
* a convolution with the BatchNorm it feeds folded in (``bn=``): the BatchNorm becomes the kernel's
  per-channel ``scale``/``shift`` epilogue and the BatchNorm module itself is bypassed;
* a whole spiking layer (``bn=`` and ``neuron=``): :func:`spiking_conv2d`, conv + BatchNorm + neuron over
  all T steps in one kernel; the neuron module is bypassed but keeps its state (``v``), which this module
  reads before and writes after each call, so ``reset_net`` and repeated calls behave as before.

Bypassed modules stay in the model (``state_dict`` keys, parameters, buffers and ``reset()`` unchanged);
only their instance ``forward`` is replaced by :class:`Bypass`, which hands the input through when the
fused module upstream did their work in this call, and runs their own ``forward`` otherwise (training
mode, CPU without Triton). New weights (``load_state_dict``, ``.to``) are picked up automatically: the
packed weights and the folded BatchNorm are cached under the tensors' version counters.

Each call picks its path per input shape and dtype by measurement (``sparseflow_kernels.dispatch``):
sparse or dense fused kernels, the time-in-M variant for small deep layers, or cuDNN + one fused
BatchNorm/neuron kernel; ``mode`` forces one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparseflow_kernels import ConvConfig, sparse_conv2d, tiling
from sparseflow_kernels import dispatch as kdispatch
from sparseflow_kernels.conv import pack_weight
from sparseflow_kernels.library import compiling, neuron_args
from sparseflow_kernels.sparse_conv import conv_output_size
from sparseflow_kernels.spiking import spiking_conv2d

from ._common import (
    SparseModule,
    VersionCache,
    attach_occupancy,
    attach_shift,
    find_occupancy,
    has_hooks,
    kernels_take,
    needs_autograd,
    residual_as,
    version_key,
)
from .neuron import neuron_kernel
from .neurons import find_adapter, neuron_support

MODES = ("auto", "sparse", "dense", "torch")


class Bypass:
    """Instance ``forward`` of a module whose work a :class:`SparseConv2d` upstream has taken over."""

    def __init__(self, module: nn.Module, owner: SparseConv2d, last: bool):
        self.module = module
        self.owner = owner
        self.last = last  # the neuron closes the handshake

    def __call__(self, x, *args, **kwargs):
        if self.owner._pending:
            if self.last:
                self.owner._pending = False
                T = self.owner.time_steps
                if T and isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[0] != T:
                    raise RuntimeError(
                        f"{type(self.module).__name__}: got {x.shape[0]} time steps, but the fused layer before it "
                        f"was optimized for T={T} on a flattened [T*N, ...] batch; run sparseflow.optimize again "
                        "for the new T")
            return x
        return type(self.module).forward(self.module, x, *args, **kwargs)


def install_bypass(module: nn.Module, owner: SparseConv2d, last: bool) -> None:
    module.forward = Bypass(module, owner, last)


def remove_bypass(module: nn.Module) -> None:
    if isinstance(module.__dict__.get("forward"), Bypass):
        del module.__dict__["forward"]


def is_bypassed(module: nn.Module) -> bool:
    return isinstance(module.__dict__.get("forward"), Bypass)


def adopt_dense(new: nn.Module, dense: nn.Module, bn: nn.Module | None) -> None:
    """Let the drop-in ``new`` take over ``dense``'s parameters, train/eval mode, SpikingJelly step mode and class
    (for ``to_dense``); fold ``bn`` (kept as ``_bn``) and bypass it."""
    new.weight = dense.weight
    new.bias = dense.bias
    new.training = dense.training
    if hasattr(dense, "step_mode"):
        new.step_mode = dense.step_mode
    new.__dict__["_original_class"] = type(dense)
    new.__dict__["_bn"] = bn
    if bn is not None:
        install_bypass(bn, new, last=True)


def dense_copy(module: nn.Module, default_cls: type, runtime: tuple) -> nn.Module:
    """The dense module ``module`` took over (its original class, else ``default_cls``) with the same parameters
    and state, without the drop-in's ``runtime`` attributes; the folded BatchNorm runs on its own again."""
    bn = module.__dict__.get("_bn")
    if bn is not None:
        remove_bypass(bn)
    klass = module.__dict__.get("_original_class", default_cls)
    m = klass.__new__(klass)
    nn.Module.__init__(m)
    for k, v in module.__dict__.items():
        if k not in runtime:
            m.__dict__[k] = v
    if "step_mode" in module.__dict__:
        m.step_mode = module.__dict__["step_mode"]  # through the framework's property (SpikingJelly)
    return m


def _affine_math(mean, var, weight, bias, eps: float):
    inv = torch.rsqrt(var.float() + eps)
    w = weight.float() if weight is not None else torch.ones_like(inv)
    b = bias.float() if bias is not None else torch.zeros_like(inv)
    scale = w * inv
    return scale, b - mean.float() * scale


# The BatchNorm fold as operators (torch.library.custom_op): under torch.compile, Inductor would regenerate this
# arithmetic (its rsqrt and fused multiply-adds round differently from eager's kernels), and a folded scale one
# ulp off flips spikes that the network then amplifies; as an operator it runs the same eager kernels in both.
@torch.library.custom_op("sparseflow::bn_affine", mutates_args=())
def _bn_affine_op(mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _affine_math(mean, var, weight, bias, eps)


@_bn_affine_op.register_fake
def _(mean, var, weight, bias, eps):
    return mean.new_empty(mean.shape, dtype=torch.float32), mean.new_empty(mean.shape, dtype=torch.float32)


@torch.library.custom_op("sparseflow::fold_bn", mutates_args=())
def _fold_bn_op(conv_weight: torch.Tensor, conv_bias: torch.Tensor | None, mean: torch.Tensor, var: torch.Tensor,
                weight: torch.Tensor | None, bias: torch.Tensor | None,
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    scale, shift = _affine_math(mean, var, weight, bias, eps)
    w = (conv_weight.float() * scale.view(-1, *[1] * (conv_weight.dim() - 1))).to(conv_weight.dtype)
    b = (conv_bias.float() * scale + shift) if conv_bias is not None else shift
    return w, b.to(conv_weight.dtype)


@_fold_bn_op.register_fake
def _(conv_weight, conv_bias, mean, var, weight, bias, eps):
    return torch.empty_like(conv_weight), conv_weight.new_empty(conv_weight.shape[:1])


def _detached(t):
    return None if t is None else t.detach()


def _bn_tensors(bn):
    return (_detached(bn.running_mean), _detached(bn.running_var), _detached(bn.weight), _detached(bn.bias),
            float(bn.eps))


def bn_affine(bn: nn.BatchNorm2d):
    """Eval-mode BatchNorm as ``y * scale + shift`` (fp32), through the ``sparseflow::bn_affine`` operator (the
    same kernels eagerly and under ``torch.compile``)."""
    return torch.ops.sparseflow.bn_affine(*_bn_tensors(bn))


def bn_key(bn: nn.BatchNorm2d | None):
    """Cache key of a BatchNorm's folded form: changes with its parameters, statistics and eps. (A training-mode
    forward updates the running statistics without bumping their version counters; it does bump
    ``num_batches_tracked``'s.)"""
    if bn is None:
        return None
    return (*version_key(bn.weight, bn.bias, bn.running_mean, bn.running_var,
                         getattr(bn, "num_batches_tracked", None)), bn.eps)


def fold_bn(weight: torch.Tensor, bias: torch.Tensor | None, bn) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight * scale, bias * scale + shift)`` per output channel (dim 0) for an eval-mode BatchNorm ``bn``
    (None: unchanged), computed in fp32 and returned in ``weight``'s dtype (the ``sparseflow::fold_bn`` operator:
    the same kernels eagerly and under ``torch.compile``)."""
    if bn is None:
        return weight, bias
    return torch.ops.sparseflow.fold_bn(weight.detach(), None if bias is None else bias.detach(), *_bn_tensors(bn))


class SparseConv2d(SparseModule, nn.Conv2d):
    """Drop-in ``nn.Conv2d`` (same parameters, ``state_dict`` keys and ``isinstance``) running SparseFlow's
    kernels in eval mode; see the module docstring. Inputs ``[N, C, H, W]`` or multi-step
    ``[T, N, C, H, W]`` (SpikingJelly ``step_mode='m'``)."""

    def __init__(self, *args, block_size=None, mode: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.block_size = block_size
        self.mode = mode
        self.write_occupancy = False
        self.defer_shift = False  # cuDNN paths: the bias left to the max pool that alone consumes the output
        self.numerics = "fast"  # or "faithful": see forward
        self.time_steps: int | None = None
        # True when the layer runs fused only with its residual (neuron(bn(conv(x)) + identity), optimize's fx pass):
        # called without one, it is the convolution alone and the BatchNorm and neuron run themselves
        self.residual_chain = False
        self.__dict__["_bn"] = None
        self.__dict__["_neuron"] = None
        self._init_runtime()

    def _init_runtime(self):
        self.__dict__["_pending"] = False
        self.__dict__["_wcache"] = VersionCache()
        self.__dict__["_acache"] = VersionCache()
        self.__dict__["_scache"] = VersionCache()
        self.__dict__["_tcache"] = VersionCache()
        self.last_path: str | None = None

    # -------------------------------------------------------------------------------------- building
    @classmethod
    def from_dense(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None, neuron: nn.Module | None = None,
                   *, block_size=None, mode: str = "auto", time_steps: int | None = None) -> SparseConv2d:
        """Wrap ``conv`` (sharing its parameters). With ``bn`` (eval-mode BatchNorm fed by ``conv``) it is
        folded; with ``neuron`` (fed by ``bn``) the whole spiking layer runs fused. The caller puts the new
        module where ``conv`` was; ``bn`` and ``neuron`` stay where they are and are bypassed."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_dense expects an nn.Conv2d, got {type(conv).__name__}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding_mode={conv.padding_mode!r} is not supported (only 'zeros')")
        if conv.groups != 1:
            raise ValueError(f"groups={conv.groups} is not supported yet")
        if isinstance(conv.padding, str):
            raise ValueError(f"padding={conv.padding!r} strings are not supported by the fused path")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if neuron is not None and bn is None:
            pass  # conv -> neuron (no BatchNorm) is fine
        if neuron is not None:
            adapter, why = neuron_support(neuron)
            if adapter is None:
                raise ValueError(f"neuron {type(neuron).__name__} cannot be fused: {why}")
            if conv.dilation != (1, 1):
                raise ValueError("the fused spiking layer supports dilation 1 only")
        if bn is not None:
            if not isinstance(bn, nn.BatchNorm2d):
                raise TypeError(f"bn must be an nn.BatchNorm2d, got {type(bn).__name__}")
            if bn.num_features != conv.out_channels:
                raise ValueError(f"bn has {bn.num_features} features, conv {conv.out_channels} outputs")
            if not bn.track_running_stats or bn.running_mean is None:
                raise ValueError("BatchNorm without running statistics cannot be folded")
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                  conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                  device="meta", block_size=block_size, mode=mode)
        new.weight = conv.weight
        new.bias = conv.bias
        new.training = conv.training
        new.time_steps = time_steps
        if hasattr(conv, "step_mode"):
            new.step_mode = conv.step_mode
        new.__dict__["_original_class"] = type(conv)
        new.__dict__["_bn"] = bn
        new.__dict__["_neuron"] = neuron
        if bn is not None:
            install_bypass(bn, new, last=neuron is None)
        if neuron is not None:
            install_bypass(neuron, new, last=True)
        return new

    def to_dense(self) -> nn.Conv2d:
        """The plain convolution back (same parameters), and the bypassed modules restored."""
        for m in (self._bn, self._neuron):
            if m is not None:
                remove_bypass(m)
        klass = self.__dict__.get("_original_class", nn.Conv2d)
        conv = klass.__new__(klass)
        nn.Module.__init__(conv)
        for k, v in self.__dict__.items():
            if k in ("_bn", "_neuron", "_pending", "_wcache", "_acache", "_scache", "_tcache", "_original_class",
                     "block_size", "mode", "write_occupancy", "defer_shift", "time_steps", "last_path",
                     "step_mode", "numerics", "residual_chain"):
                continue
            conv.__dict__[k] = v
        if "step_mode" in self.__dict__:
            conv.step_mode = self.__dict__["step_mode"]  # through the framework's property (SpikingJelly)
        return conv

    @property
    def folded_bn(self):
        return self._bn

    @property
    def fused_neuron(self):
        return self._neuron

    def kind(self) -> str:
        if self._neuron is not None:
            return "conv+bn+neuron" if self._bn is not None else "conv+neuron"
        return "conv+bn" if self._bn is not None else "conv"

    def extra_repr(self):
        return super().extra_repr() + f", fused={self.kind()}, block_size={self.block_size}, mode={self.mode}"

    def __setstate__(self, state):
        super().__setstate__(state)
        if "_pending" not in self.__dict__:
            self._init_runtime()

    # -------------------------------------------------------------------------------------- running
    def _use_kernels(self, x: torch.Tensor) -> bool:
        bn, neuron = self._bn, self._neuron
        if self.training or (bn is not None and bn.training):
            return False
        if neuron is not None and neuron.training:
            return False
        if (bn is not None or neuron is not None) and self.chain_hooked():
            return False
        if not kernels_take(x, self.weight, type(self).__name__) or needs_autograd(x, self, bn, neuron):
            return False
        return self.block_size != "dense" or neuron is not None or bn is not None

    def chain_hooked(self) -> bool:
        """Whether this layer, its folded BatchNorm or its fused neuron has a hook (or a global module hook is
        registered). The chain then runs through its modules (the convolution on its own weights, the BatchNorm
        module, the neuron module from its stored membrane), so that every hook sees what it sees in the dense
        model."""
        return has_hooks(self, self._bn, self._neuron)

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
        ``sn(bn(conv(x))) + identity`` of a SEW-ResNet block (cnf ADD)."""
        if x.dim() not in (4, 5):
            raise ValueError(f"SparseConv2d expects [N, C, H, W] or [T, N, C, H, W], got {tuple(x.shape)}")
        # as the multi-step SpikingJelly layer says (a layer made with time_steps takes the [T*N, ...] view)
        if getattr(self, "step_mode", None) == "m" and x.dim() != 5 and self.time_steps is None:
            raise ValueError(f"SparseConv2d (step_mode='m'): expected x with shape [T, N, C, H, W], got "
                             f"{tuple(x.shape)}")
        if residual is not None and self._neuron is None:
            raise ValueError("SparseConv2d: residual is only accepted by a fused spiking layer")
        self._pending = False
        if residual is None and getattr(self, "residual_chain", False):
            self.last_path = "torch"  # the block's own forward: its BatchNorm, add and neuron follow
            return self._dense_forward(x)
        if not self._use_kernels(x):
            self.last_path = "torch"
            if residual is None:
                return self._dense_forward(x)
            return self._dense_residual_forward(x, residual, residual_after)
        if residual is not None and residual_after and residual.dtype != x.dtype:
            out = residual + self._kernel_forward(x)  # the dense add's type promotion
        else:
            out = self._kernel_forward(x, residual, residual_after)
        self._pending = (self._bn is not None or self._neuron is not None) and residual is None
        return out

    def _kernel_forward(self, x, residual=None, residual_after=False):
        """The eval-mode forward on the path this call takes: faithful numerics, traced, fused layer or conv."""
        if getattr(self, "numerics", "fast") == "faithful":
            return self._faithful_forward(x, residual, residual_after)
        if compiling():
            return self._compiled_forward(x, residual, residual_after)
        if self._neuron is not None:
            return self._spiking_forward(x, residual, residual_after)
        return self._conv_forward_kernels(x)

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

    def _affine(self):
        bn = self._bn
        if bn is None:
            return None, None
        return self._acache.get(bn_key(bn), lambda: bn_affine(bn))

    def _config(self, C, CO):
        return tiling.conv_config(C, CO, self.block_size)

    def _packed(self, cfg: ConvConfig, dtype):
        key = (*version_key(self.weight), cfg.block_k, cfg.block_n, dtype)
        return self._wcache.get(key, lambda: pack_weight(self.weight, cfg.block_k, cfg.block_n, dtype))

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
    def _conv_forward_kernels(self, x):
        five = x.dim() == 5
        flat = x.flatten(0, 1) if five else x
        C = flat.shape[1]
        cfg = self._config(C, self.out_channels)
        scale, shift = self._affine()
        occ = find_occupancy(x, flat)

        def run_kernel(dense):
            return sparse_conv2d(flat, self.weight, self.bias, self.stride, self.padding, self.dilation,
                                 config=cfg, packed_weight=self._packed(cfg, x.dtype), scale=scale,
                                 shift=shift, occupancy=occ, dense=dense)

        defer = getattr(self, "defer_shift", False)

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
        if self.block_size != "dense" and triton_groups_ok(C, cfg):
            cands["sparse"] = lambda: run_kernel(False)
        key = ("conv", tuple(flat.shape), flat.stride(), x.dtype, self.out_channels, self.kernel_size,
               self.stride, self.padding, self.dilation, occ is not None, scale is not None,
               self.block_size, defer)
        path = self._choose(key, cands, x)
        self.last_path = path
        y = cands[path]()
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
            path = self.last_path or "torch"
            if path not in ("sparse", "dense"):
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
                cfg = self._config(flat.shape[1], self.out_channels)
                packed = pack_weight(self.weight, cfg.block_k, cfg.block_n, x.dtype)
                y = torch.ops.sparseflow.conv2d(flat, self.weight, self.bias, list(self.stride), list(self.padding),
                                                list(self.dilation), scale, shift, packed, list(cfg.key()),
                                                path == "dense")
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
        OH = conv_output_size(H, self.kernel_size[0], self.stride[0], self.padding[0], 1)
        OW = conv_output_size(W, self.kernel_size[1], self.stride[1], self.padding[1], 1)
        v0 = adapter.get_v(neuron, (N, self.out_channels, OH, OW), x.device)
        res5 = residual.reshape(T, N, self.out_channels, OH, OW) if residual is not None else None
        path = self.last_path or "fused_dense"
        cfgs = spiking_configs(C, self.out_channels, T)
        cfg = cfgs.get(path) or (self._config(C, self.out_channels) if path == "fused_sparse" else None)
        packed = None if cfg is None or path == "cudnn" else pack_weight(self.weight, cfg.block_k, cfg.block_n,
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

    def _choose(self, key, cands, x):
        if self.mode != "auto":
            return self.mode if self.mode in cands else "dense"
        return kdispatch.choose(key, cands, fallback="sparse" if "sparse" in cands else "dense",
                                device=x.device)

    # -- spiking layer
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
        scale, shift = self._affine()
        cfg = self._config(C, self.out_channels)
        OH = conv_output_size(H, self.kernel_size[0], self.stride[0], self.padding[0], 1)
        OW = conv_output_size(W, self.kernel_size[1], self.stride[1], self.padding[1], 1)
        v0 = adapter.get_v(neuron, (N, self.out_channels, OH, OW), x.device)
        flat = x5.flatten(0, 1)
        occ = find_occupancy(x, flat) if x5 is x else None
        res5 = residual_as("SparseConv2d", residual, (T, N, self.out_channels, OH, OW))
        after = res5 is not None and residual_after
        common = dict(scale=scale, shift=shift, neuron=spec, v=v0, return_v=True, residual=res5, residual_after=after)
        write_occ = self.write_occupancy and not after  # (the output is not spikes then)
        weight = self.weight

        def fused(c, sparse):
            return spiking_conv2d(x5, weight, self.bias, self.stride, self.padding, config=c, v_dtype=x.dtype,
                                  packed_weight=self._packed(c, x.dtype), occupancy=occ if sparse else None,
                                  sparse=sparse and occ is None, write_occupancy=write_occ, **common)

        def cudnn():
            w, b = self._torch_weights(fold=False)
            return spiking_conv2d(x5, w, b, self.stride, self.padding, path="cudnn", v_dtype=x.dtype, **common)

        cands = {}
        for cname, c in spiking_configs(C, self.out_channels, T).items():
            cands[cname] = (lambda c=c: fused(c, False))
        if self.block_size != "dense" and triton_groups_ok(C, cfg):
            cands["fused_sparse"] = lambda: fused(cfg, True)
        if not write_occ:
            cands["cudnn"] = cudnn
        key = ("spiking", tuple(x5.shape), x.dtype, self.out_channels, self.kernel_size, self.stride,
               self.padding, occ is not None, write_occ, spec.kind, residual is not None, after)
        if self.mode == "auto":
            path = kdispatch.choose(key, cands, fallback="fused_dense", device=x.device)
        else:
            path = {"sparse": "fused_sparse", "dense": "fused_dense", "torch": "cudnn"}[self.mode]
            if path not in cands:
                path = "fused_dense"
        self.last_path = path
        res = cands[path]()
        spikes, v = res[0], res[1]
        if write_occ and len(res) == 3:
            attach_occupancy(spikes, spikes.flatten(0, 1), res[2])
        adapter.set_v(neuron, v, x.dtype)
        if x.dim() == 5:
            return spikes
        return spikes.flatten(0, 1) if adapter.is_multistep(neuron) else spikes[0]


def spiking_configs(C: int, CO: int, T: int) -> dict[str, ConvConfig]:
    """The dense fused-kernel configurations a spiking layer measures (``sparseflow_kernels.tiling``)."""
    return tiling.spiking_configs(C, CO, T)


def triton_groups_ok(C: int, cfg: ConvConfig) -> bool:
    return tiling.conv_groups_fit(C, cfg)
