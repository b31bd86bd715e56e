"""``SparseLinear`` and ``SparseConv1d``: drop-in ``nn.Linear`` / ``nn.Conv1d(kernel_size=1)`` on the sparse GEMM.

Both run :func:`sparseflow_kernels.sparse_linear` (a prescan of non-zero (row tile, K block) blocks, then a
tensor-core GEMM over those only) in eval mode on CUDA (or the CPU under the Triton interpreter), and the
module's own torch forward otherwise (training, plain CPU, other dtypes).

* ``SparseLinear`` takes any leading shape (``[M, K]``, SpikingJelly multi-step ``[T, N, K]``, tokens
  ``[T, N, L, K]``); ``step_mode`` is kept, as the GEMM treats every leading dim alike.
* ``SparseConv1d`` is a ``kernel_size=1`` projection over ``[N, C, L]`` (or multi-step ``[T, N, C, L]``, as
  SpikingJelly's ``layer.Conv1d`` and Spikformer's ``SeqToANNContainer(Conv1d, BatchNorm1d)`` run it), read in
  place without a transpose. ``from_dense(conv, bn=...)`` folds the eval-mode ``BatchNorm1d`` it feeds into the
  GEMM's epilogue; the BatchNorm stays in the model, bypassed (same ``state_dict``), and runs itself again
  in training mode or after ``to_dense()``. With ``neuron=`` (the spiking neuron the BatchNorm feeds) the
  whole spiking projection runs as one fused spiking layer (:func:`spiking_conv2d` on the tokens viewed as a
  ``[T, N, C, 1, L]`` map: GEMM + BatchNorm + neuron over all T steps, membrane in registers), the neuron
  bypassed as in :class:`~sparseflow_ops.SparseConv2d`; ``forward(x, residual=r)`` then returns
  ``r + spikes`` with the add in the kernel's epilogue (a Transformer block's skip connection).

Each call picks the sparse kernel, the same kernel over every block, or the torch op by measurement per
input shape (``sparseflow_kernels.dispatch``); ``mode`` forces one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparseflow_kernels import ConvConfig, tiling
from sparseflow_kernels import dispatch as kdispatch  # noqa: F401  (the dispatch the paths measure with)
from sparseflow_kernels.conv import pack_weight
from sparseflow_kernels.library import compiling, neuron_args
from sparseflow_kernels.linear import (
    LinearConfig,
    pack_linear_weight,
    sparse_conv1x1,
    sparse_linear,
)
from sparseflow_kernels.spiking import spiking_conv2d

from ._common import residual_as, version_key
from .base import SparseModule, bn_affine, bn_key, check_dense, check_foldable_bn, check_mode, fold_bn
from .neuron import neuron_kernel
from .neurons import find_adapter, neuron_support


class _GemmModule(SparseModule):
    """What SparseLinear and SparseConv1d share: the GEMM's configuration and packed weight, the cuBLAS weights
    with the BatchNorm folded in, and the dispatch between kernels and torch."""

    _caches = ("_wcache", "_acache", "_bcache", "_tcache")

    def _init_gemm(self, block_size, mode: str, config: LinearConfig | None) -> None:
        check_mode(mode)
        self.config = config
        self._init_dropin(block_size, mode)

    def _use_kernels(self, x: torch.Tensor) -> bool:
        return self.mode != "torch" and super()._use_kernels(x)

    def _cfg(self, K: int, N: int) -> LinearConfig:
        return tiling.linear_config(K, N, self.block_size, self.config)

    def _packed(self, cfg: LinearConfig, dtype):
        key = (*version_key(self.weight), cfg.block_k, cfg.block_n, dtype)
        return self._wcache.get(key, lambda: pack_linear_weight(self.weight, cfg.block_k, cfg.block_n, dtype))

    def _torch_weights(self, dtype):
        """(weight [N, K], bias) for the cuBLAS path, the BatchNorm (if any) folded in, cached by version."""
        bn = self.folded_bn
        key = (*version_key(self.weight, self.bias), dtype, bn_key(bn))

        def compute():
            w = self.weight.detach()
            w, b = fold_bn(w.reshape(w.shape[0], -1), None if self.bias is None else self.bias.detach(), bn)
            return w.to(dtype).contiguous(), None if b is None else b.to(dtype)

        return self.__dict__["_tcache"].get(key, compute)

    def _traced_run(self, x, K, N):
        """The forward as ``torch.compile`` / ``torch.export`` trace it: the path the eager dispatch chose for this
        module (run the model once eagerly first), as registered operators, without version caches or timing."""
        bn = self.folded_bn
        path = self.last_path or "dense"
        conv1x1 = isinstance(self, nn.Conv1d)
        if path == "torch":
            w = self.weight.detach()
            w, b = fold_bn(w.reshape(w.shape[0], -1), None if self.bias is None else self.bias.detach(), bn)
            w, b = w.to(x.dtype).contiguous(), None if b is None else b.to(x.dtype)
            if conv1x1:
                y = torch.matmul(w, x)
                return y if b is None else y + b.view(-1, 1)
            return F.linear(x, w, b)
        cfg = self._cfg(K, N)
        if path == "sparse_m128":
            cfg = tiling.wide_linear_config(cfg)
        scale, shift = bn_affine(bn) if bn is not None else (None, None)
        packed = pack_linear_weight(self.weight, cfg.block_k, cfg.block_n, x.dtype)
        return torch.ops.sparseflow.linear(x, self.weight, self.bias, scale, shift, packed, list(cfg.key()),
                                           path == "dense", conv1x1)

    def _run(self, key, x, kernel, torch_op, K, N):
        if compiling():
            y = self._traced_run(x, K, N)
            self.last_path = self.last_path or "dense"
            return y
        cfg = self._cfg(K, N)
        scale, shift = self._affine()
        w = self._packed(cfg, x.dtype)

        def run_torch():  # cuBLAS with the BatchNorm folded into the weights (no separate BN pass)
            wt, bt = self._torch_weights(x.dtype)
            if isinstance(self, nn.Conv1d):  # k=1 on [B, K, L]: one batched GEMM, no layout copies
                y = torch.matmul(wt, x)
                return y if bt is None else y.add_(bt.view(-1, 1))
            return F.linear(x, wt, bt)

        def run_kernel(dense, c=cfg):
            return kernel(c, w, scale, shift, dense)

        cands = {"dense": lambda: run_kernel(True), "torch": run_torch}
        if self.block_size != "dense" and tiling.linear_blocks_fit(K, cfg):
            cands["sparse"] = lambda: run_kernel(False)
            if self.mode == "auto" and self.config is None and cfg.block_m == 64 and cfg.block_n == 128:
                big = tiling.wide_linear_config(cfg)  # same packed weight, taller row tiles
                cands["sparse_m128"] = lambda: run_kernel(False, big)
        return self._dispatch((*key, cfg.key(), scale is not None, self.block_size), cands, x)

    def kind(self) -> str:
        return super().kind() + ("+neuron" if self.fused_neuron is not None else "")


def _check_bn(bn, features: int):
    check_foldable_bn(bn, features, owner="the projection", kind=nn.BatchNorm1d)


class SparseLinear(_GemmModule, nn.Linear):
    """Drop-in ``nn.Linear`` (same parameters, ``state_dict`` keys and ``isinstance``) on the sparse GEMM
    in eval mode; see the module docstring. ``from_dense(linear, bn=...)`` folds a ``BatchNorm1d`` over the
    output features (inputs ``[M, K]``)."""

    _kind = "linear"

    def __init__(self, in_features, out_features, bias=True, *, block_size=None, mode: str = "auto",
                 config: LinearConfig | None = None, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._init_gemm(block_size, mode, config)

    @classmethod
    def from_dense(cls, linear: nn.Linear, bn: nn.BatchNorm1d | None = None, *, block_size=None,
                   mode: str = "auto", config: LinearConfig | None = None) -> SparseLinear:
        """Wrap ``linear`` (sharing its parameters); the caller puts the new module where it was."""
        check_dense(linear, nn.Linear, lambda m: m.weight.dtype not in (torch.float32, torch.float16, torch.bfloat16)
                    and f"weight dtype {m.weight.dtype} is not supported")
        _check_bn(bn, linear.out_features)
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta",
                  block_size=block_size, mode=mode, config=config)
        return new._adopt(linear, bn)

    def to_dense(self) -> nn.Linear:
        """The plain ``nn.Linear`` (or the SpikingJelly class it was) back, same parameters."""
        return self._dense_copy(nn.Linear)

    @staticmethod
    def _feature_dim(y):
        return y.dim() - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The GEMM (+ folded BatchNorm) on the path measured fastest; ``torch`` (the dense layer, its BatchNorm
        running on its own) where the kernels cannot run, and under numerics="faithful"."""
        self._pending = False
        bn = self._bn
        if not self._use_kernels(x) or self.faithful:
            self.last_path = "torch"
            return F.linear(x, self.weight, self.bias)
        if bn is not None and x.dim() != 2:
            raise ValueError(f"SparseLinear with a folded BatchNorm1d expects [M, K] inputs, got {tuple(x.shape)}")
        K, N = self.in_features, self.out_features

        def kernel(cfg, w, scale, shift, dense):
            return sparse_linear(x, self.weight, self.bias, config=cfg, packed_weight=w, scale=scale, shift=shift,
                                 dense=dense)

        key = ("linear", tuple(x.shape), x.stride(), x.dtype, N)
        y = self._run(key, x, kernel, lambda: F.linear(x, self.weight, self.bias), K, N)
        self._pending = bn is not None
        return y


class SparseConv1d(_GemmModule, nn.Conv1d):
    """Drop-in ``nn.Conv1d`` with ``kernel_size=1`` (stride 1, no padding, groups 1) on the sparse GEMM;
    inputs ``[N, C, L]``, ``[C, L]`` or multi-step ``[T, N, C, L]``. See the module docstring."""

    _kind = "conv1x1"

    def __init__(self, in_channels, out_channels, bias=True, *, block_size=None, mode: str = "auto",
                 config: LinearConfig | None = None, device=None, dtype=None):
        super().__init__(in_channels, out_channels, 1, bias=bias, device=device, dtype=dtype)
        self._init_gemm(block_size, mode, config)

    @staticmethod
    def problem(conv: nn.Conv1d) -> str | None:
        """Why ``conv`` cannot run on the GEMM, or None."""
        if conv.kernel_size != (1,):
            return f"kernel_size={conv.kernel_size[0]} (only 1 runs on the GEMM)"
        if conv.stride != (1,) or conv.dilation != (1,):
            return f"stride={conv.stride[0]}, dilation={conv.dilation[0]} (only 1)"
        if conv.groups != 1:
            return f"groups={conv.groups} (only 1)"
        if isinstance(conv.padding, str) and conv.padding not in ("valid", "same"):
            return f"padding={conv.padding!r}"
        if not isinstance(conv.padding, str) and conv.padding != (0,):
            return f"padding={conv.padding[0]} (only 0)"
        if conv.weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return f"weight dtype {conv.weight.dtype}"
        return None

    @classmethod
    def from_dense(cls, conv: nn.Conv1d, bn: nn.BatchNorm1d | None = None, neuron: nn.Module | None = None, *,
                   block_size=None, mode: str = "auto", config: LinearConfig | None = None,
                   time_steps: int | None = None) -> SparseConv1d:
        """Wrap ``conv`` (sharing its parameters); with ``bn`` (the eval-mode BatchNorm1d it feeds) the
        BatchNorm is folded and bypassed; with ``neuron`` (the spiking neuron fed by ``bn``, or by ``conv``) the
        neuron runs fused too. ``time_steps``: T of a multi-step neuron whose input the model flattens to
        ``[T*N, C, L]`` before the projection (``SeqToANNContainer``). The caller puts the new module where
        ``conv`` was."""
        check_dense(conv, nn.Conv1d, cls.problem)
        _check_bn(bn, conv.out_channels)
        if neuron is not None:
            adapter, why = neuron_support(neuron)
            if adapter is None:
                raise ValueError(f"neuron {type(neuron).__name__} cannot be fused: {why}")
        new = cls(conv.in_channels, conv.out_channels, conv.bias is not None, device="meta",
                  block_size=block_size, mode=mode, config=config)
        new.padding = conv.padding
        new.padding_mode = conv.padding_mode
        new._adopt(conv, bn, neuron)
        if neuron is not None:
            new.time_steps = time_steps
        return new

    def to_dense(self) -> nn.Conv1d:
        return self._dense_copy(nn.Conv1d)

    @staticmethod
    def _feature_dim(y):
        return 1

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                residual_after: bool = True) -> torch.Tensor:
        """``residual`` (only with a fused neuron; shaped like the output): returns ``residual + spikes``, a skip
        connection after the neuron (``residual_after``, as ``SparseConv2d`` names it; a residual before the
        neuron is not taken). ``numerics="faithful"``: the convolution and BatchNorm as the dense modules compute
        them, only the neuron (and the residual add) on the multi-step kernel (see ``SparseConv2d.forward``)."""
        if not residual_after:
            raise ValueError("SparseConv1d adds a residual after its neuron only (residual_after=False was given)")
        if x.dim() not in (2, 3, 4):
            raise ValueError(f"SparseConv1d expects [C, L], [N, C, L] or [T, N, C, L], got {tuple(x.shape)}")
        if getattr(self, "step_mode", None) == "m" and x.dim() != 4:  # as the multi-step SpikingJelly layer says
            raise ValueError(f"SparseConv1d (step_mode='m'): expected x with shape [T, N, C, L], got {tuple(x.shape)}")
        neuron = self.fused_neuron
        if residual is not None and neuron is None:
            raise ValueError("SparseConv1d: residual is only accepted by a fused spiking projection")
        self._pending = False
        four = x.dim() == 4
        flat = x.flatten(0, 1) if four else x
        x4 = self._steps(x, neuron) if neuron is not None else None
        route = self._route(x, x4)
        if route in ("faithful", "spiking"):
            run = self._faithful_spiking if route == "faithful" else self._spiking_forward
            out = run(x, x4, neuron, residual)
            self._pending = residual is None
            return out
        if route == "torch":
            self.last_path = "torch"  # (faithful: its BatchNorm and neuron run on their own)
            y = F.conv1d(flat, self.weight, self.bias)
            y = y.view(*x.shape[:2], *y.shape[1:]) if four else y
            return y if residual is None else self._dense_chain(y, neuron, residual)

        def kernel(cfg, w, scale, shift, dense):
            return sparse_conv1x1(flat, self.weight, self.bias, config=cfg, packed_weight=w, scale=scale,
                                  shift=shift, dense=dense)

        key = ("conv1x1", tuple(flat.shape), flat.stride(), x.dtype, self.out_channels)
        y = self._run(key, flat, kernel, lambda: F.conv1d(flat, self.weight, self.bias), self.in_channels,
                      self.out_channels)
        self._pending = self._bn is not None
        return y.view(*x.shape[:2], *y.shape[1:]) if four else y

    def _route(self, x: torch.Tensor, x4) -> str:
        """The forward's path for this call, decided here only: ``torch`` (the dense modules: training, hooks,
        autograd, tensors the kernels cannot take, a fused projection's input that cannot run fused, or
        numerics="faithful" without a fused neuron), ``faithful`` (the dense convolution and BatchNorm, the fused
        neuron on its kernel), ``spiking`` (the fused spiking projection), ``gemm`` (the sparse GEMM)."""
        if self.fused_neuron is not None:
            if x4 is None or not self._use_kernels(x):
                return "torch"
            return "faithful" if self.faithful else "spiking"
        return "torch" if not self._use_kernels(x) or self.faithful else "gemm"

    # -- the fused spiking projection
    def _steps(self, x, neuron):
        """``x`` as ``[T, N, C, L]`` (a view) for the fused layer, or None where it cannot run fused."""
        if x.dim() == 4:
            return x
        if x.dim() != 3:
            return None
        if find_adapter(neuron).is_multistep(neuron):
            T = self.time_steps
            if not T or x.shape[0] % T:
                raise RuntimeError(
                    f"SparseConv1d: a [T*N, C, L] input of batch {x.shape[0]} does not match the T={T} seen when "
                    "the model was optimized; run sparseflow.optimize again for the new T")
            return x.view(T, x.shape[0] // T, *x.shape[1:])
        return x.unsqueeze(0)  # one time step per call (single-step neuron)

    def _faithful_spiking(self, x, x4, neuron, residual):
        """numerics="faithful": the dense convolution and BatchNorm, then the neuron (+ residual) on the kernel,
        the spikes in the layout the dense neuron writes."""
        self.last_path = "faithful"
        four = x.dim() == 4
        y = self._conv_forward(x.flatten(0, 1) if four else x, self.weight, self.bias)
        y = y.view(*x.shape[:2], *y.shape[1:]) if four else y
        bn = self.folded_bn
        if bn is not None:
            y = type(bn).forward(bn, y)
        y4 = y.view(*x4.shape[:2], *y.shape[-2:])
        res = residual_as("SparseConv1d", residual, y4.shape)
        spikes = neuron_kernel(neuron, y4, residual=res, residual_after=True, preserve_layout=True)
        return spikes.view(y.shape)

    def _dense_chain(self, y, neuron, residual):
        """BatchNorm, neuron and the residual add with the original modules, called as modules (their hooks run;
        training mode, CPU, autograd, hooks)."""
        bn = self.folded_bn
        if bn is not None:
            y = bn(y)
        T = self.time_steps
        if T and y.dim() == 3 and find_adapter(neuron).is_multistep(neuron):
            s = neuron(y.view(T, y.shape[0] // T, *y.shape[1:])).view(y.shape)
        else:
            s = neuron(y)
        return residual + s

    @staticmethod
    def _spiking_configs(C, CO, T):
        """Token tiles of the fused kernel (:func:`sparseflow_kernels.tiling.token_spiking_configs`)."""
        return tiling.token_spiking_configs(C, CO, T)

    def _packed4(self, cfg: ConvConfig, dtype):
        key = (*version_key(self.weight), "conv", cfg.block_k, cfg.block_n, dtype)
        return self._wcache.get(key, lambda: pack_weight(self.weight.unsqueeze(-1), cfg.block_k, cfg.block_n, dtype))

    @staticmethod
    def _tokens_merge(t: torch.Tensor | None) -> bool:
        """Whether the (sample, token) dims of ``[..., N, C, L]`` merge into one of N*L tokens (a view)."""
        return t is None or t.shape[-3] == 1 or t.stride(-3) == t.shape[-1] * t.stride(-1)

    def _spiking_forward(self, x, x4, neuron, residual):
        """The fused layer over ``x4`` ``[T, N, C, L]``. Where the layouts allow (channels innermost, as the
        kernels write spikes), every sample's tokens form one ``1 x N*L`` map, so the GEMM's row tiles run over
        all N*L tokens instead of each sample's L (Spikformer-Ti: 1568 tokens in 25 tiles of 64, not 8 x 4 tiles
        with 60 of every 256 rows empty); the membrane is then kept as a ``[N, CO, L]`` view of a
        ``[CO, N*L]`` buffer."""
        adapter = find_adapter(neuron)
        spec = adapter.spec(neuron)
        T, N, C, L = x4.shape
        CO = self.out_channels
        w4 = self.weight.unsqueeze(-1)
        v0 = adapter.get_v(neuron, (N, CO, L), x.device)
        res4 = residual_as("SparseConv1d", residual, (T, N, CO, L))
        traced = compiling()  # under torch.compile: no version caches, no timing
        # (tokens merged under torch.compile too: cuDNN picks its algorithm by shape, and an fp16 1x1 conv over
        # [T, C, 1, N*L] rounds differently from one over [T*N, C, 1, L]; the compiled model must give eager's spikes)
        merge = all(self._tokens_merge(t) for t in (x4, v0, res4))

        def tokens(t, lead):  # [..., N, C, L] -> [..., 1, C, 1, N*L] (merged) or [..., N, C, 1, L]
            if t is None:
                return None
            if not merge:
                return t.unsqueeze(-2)
            m = t.movedim(-3, -2).reshape(*t.shape[:-3], t.shape[-2], N * L)  # a view: checked above
            return m.view(*lead, 1, t.shape[-2], 1, N * L)

        x5, v05, res5 = tokens(x4, (T,)), tokens(v0, ()), tokens(res4, (T,))
        bn = self.folded_bn
        bias = None  # (eager: folded into the cached shift)
        if traced:  # the fold is part of the traced graph
            scale, shift = bn_affine(bn) if bn is not None else (None, None)
            bias = self.bias
        else:
            scale, shift = self._affine_with_bias()
        cfgs = self._spiking_configs(C, CO, T)
        if traced:
            path = self.last_path if self.last_path in (*cfgs, "cudnn", "fused_sparse") else "fused_dense"
            cfg = cfgs.get(path) or cfgs["fused_dense"]
            spikes, v = torch.ops.sparseflow.spiking_conv2d(
                x5, w4, bias, [1, 1], [0, 0], scale, shift, res5, v05, None, *neuron_args(spec),
                list(cfg.key()), path == "cudnn", path == "fused_sparse", x.dtype, residual is not None)
        else:
            common = dict(scale=scale, shift=shift, neuron=spec, v=v05, return_v=True, residual=res5,
                          residual_after=residual is not None, v_dtype=x.dtype)

            def fused(c, sparse):
                return spiking_conv2d(x5, w4, bias, 1, 0, config=c, packed_weight=self._packed4(c, x.dtype),
                                      sparse=sparse, **common)

            def cudnn():
                key = (*version_key(self.weight), "cl")
                wcl = self._tcache.get(key, lambda: w4.detach().contiguous(memory_format=torch.channels_last))
                return spiking_conv2d(x5, wcl, bias, 1, 0, path="cudnn", **common)

            cands = {name: (lambda c=c: fused(c, False)) for name, c in cfgs.items()}
            if self.block_size != "dense" and tiling.conv_groups_fit(C, cfgs["fused_dense"]):
                cands["fused_sparse"] = lambda: fused(cfgs["fused_dense"], True)
            cands["cudnn"] = cudnn
            key = ("spiking1d", tuple(x5.shape), x5.stride(), x.dtype, CO, spec.kind, residual is not None,
                   None if res5 is None else res5.stride(), scale is not None, self.block_size)
            spikes, v = self._dispatch(key, cands, x, fallback="fused_dense", default="fused_dense",
                                       forced={"sparse": "fused_sparse", "dense": "fused_dense"})
        if merge:  # [T, 1, CO, 1, N*L] -> [T, N, CO, L]; the membrane [1, CO, 1, N*L] -> [N, CO, L]
            spikes = spikes.reshape(T, CO, N, L).movedim(2, 1)
            v = v.reshape(CO, N, L).movedim(1, 0)
        else:
            spikes = spikes.squeeze(3)
            v = v.view(N, CO, L)
        adapter.set_v(neuron, v, x.dtype)
        # as the input's shape: [T, N, CO, L] or the flat [T*N, CO, L]
        return spikes if x.dim() == 4 else spikes.reshape(T * N, CO, L)

