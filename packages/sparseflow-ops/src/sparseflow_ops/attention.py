"""Attention drop-ins: SpikingJelly's spiking self-attention modules and ``nn.MultiheadAttention``.

* :class:`SparseSpikingSelfAttention` - Spikformer's ``SpikingSelfAttention``: the q/k/v and output
  ``Conv1d(k=1) + BatchNorm1d`` projections become :class:`SparseConv1d` with the BatchNorm folded (bypassed,
  kept in the model), and the product ``(v @ k^T) @ q * scale`` runs on :func:`ssa_attention`, skipping zero
  token blocks. The neurons (``qkv_lif``, ``attn_lif``, ``proj_lif``) are the module's own, called exactly as
  before, so their state, ``reset_net`` and ``state_dict`` keys are unchanged.
* :class:`SparseSpikeDrivenSelfAttention` - the Spike-driven Transformer's ``SpikeDrivenSelfAttention``: the
  per-head token sums ``(k * v).sum(tokens)`` run on :func:`channel_dot` straight from the ``[T, N, C, H, W]``
  maps and ``q * attn_lif(...)`` is one broadcast multiply, without the module's head split/merge copies. Its
  1x1 convolutions stay ordinary children (``optimize`` fuses them with their BatchNorm and neuron).
* :class:`SparseQKAttention` - QKFormer's ``QKAttention``: with ``qka_type="token"``, the head sums of ``q``, its
  ``attn_lif`` over the steps and ``attn * k`` run as one kernel (:func:`qk_token_attention`) that reads the ``qk``
  spikes once, with ``attn_lif``'s membrane read from and stored back to the module. Its 1x1 projections stay
  ordinary children (``optimize`` fuses each with its BatchNorm and neuron); a skip connection's add goes into the
  fused output projection's epilogue, as for Spikformer's attention.
* :class:`SparseMultiheadAttention` - ``nn.MultiheadAttention`` (same ``state_dict``) whose input and output
  projections run on :func:`sparse_linear` and whose softmax attention is
  ``F.scaled_dot_product_attention``; arguments it does not cover fall back to the module's own forward
  (the reason is logged once).

All of them run their own torch forward in training mode or where the kernels cannot run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparseflow_kernels import channel_dot, qk_token_attention, sparse_linear, ssa_attention
from sparseflow_kernels.library import compiling
from sparseflow_kernels.linear import default_linear_config, pack_linear_weight

from ._common import VersionCache, has_hooks, kernels_can_run, needs_autograd, notice_once, version_key
from .base import SparseModule
from .linear import SparseConv1d
from .neuron import KernelNeuronForward, neuron_kernel
from .neurons import find_adapter


def _spikingjelly_attention():
    try:
        from spikingjelly.activation_based.layer.attention import SpikeDrivenSelfAttention, SpikingSelfAttention
    except Exception:  # SpikingJelly is optional
        return None, None, None, None, None
    try:
        from spikingjelly.activation_based.layer.attention import QKAttention
    except Exception:  # a SpikingJelly without QKFormer's attention
        QKAttention = None
    try:
        from spikingjelly.activation_based.model.spikformer import SpikformerBlock, SpikformerMLP
    except Exception:  # a SpikingJelly without the model zoo's Spikformer
        SpikformerBlock = SpikformerMLP = None
    return SpikingSelfAttention, SpikeDrivenSelfAttention, SpikformerBlock, SpikformerMLP, QKAttention


SpikingSelfAttention, SpikeDrivenSelfAttention, SpikformerBlock, SpikformerMLP, QKAttention = \
    _spikingjelly_attention()


class _AttentionModule(SparseModule):
    """What the attention drop-ins share: they wrap the dense module's attributes (children, parameters, hooks)
    instead of copying parameters, and choose between a kernel (``sparse``) and the module's own torch
    arithmetic (``torch``, the exact path under numerics="faithful")."""

    _caches = ()
    _runtime = ("_pending", "_original_class", "mode", "last_path", "_wcache", "numerics")
    _dense_base: type | None = None  # the class whose forward the drop-in reimplements

    @classmethod
    def from_dense(cls, module, *, mode: str = "auto"):
        """Wrap ``module`` (sharing its children); the caller puts the new module where it was."""
        return _wrap_exact(cls, module, cls._dense_base, mode)

    def to_dense(self):
        return _unwrap(self)

    def _repr_fields(self) -> dict:
        return {}

    def _use_kernels(self, x) -> bool:
        if self.training or self.mode == "torch" or not kernels_can_run(x):
            if not x.is_cuda and not kernels_can_run(x):
                notice_once("cpu-dense", "sparseflow: CPU tensors run the dense torch ops (Triton kernels "
                            "need CUDA, or TRITON_INTERPRET=1 on the CPU)")
            return False
        return True

    def _choose(self, key, cands, x, **how) -> str:
        """The kernel or the module's own arithmetic (see :meth:`SparseModule._choose`); under ``torch.compile``
        the path the eager dispatch chose (run the model once eagerly first)."""
        return super()._choose(key, cands, x, fallback="sparse", default="torch", forced={"dense": "sparse"},
                               exact="torch", traced=compiling())


def _wrap(cls, module, mode):
    """A new instance of ``cls`` sharing ``module``'s attributes (children, parameters, hooks)."""
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    new.__dict__["_modules"] = dict(module._modules)
    new.__dict__["_original_class"] = type(module)
    new.mode = mode
    new._init_runtime()
    return new


def _wrap_exact(cls, module, base, mode, methods=("forward",)):
    """:func:`_wrap` after checking that ``module`` is a ``base`` whose ``methods`` (the math the drop-in
    reimplements) are ``base``'s own; a subclass that overrides one is left as it is (ValueError, for the report)."""
    if not isinstance(module, base):
        raise TypeError(f"from_dense expects a {base.__name__}, got {type(module).__name__}")
    for name in methods:
        if getattr(type(module), name) is not getattr(base, name):
            raise ValueError(f"{type(module).__name__} overrides {name}() of {base.__name__}; left as it is")
    return _wrap(cls, module, mode)


def _unwrap(module):
    """The original class back, sharing ``module``'s attributes; SparseFlow modules that ``optimize`` put
    inside it (the fused 1x1 convolutions of a Spike-driven attention) are made dense again too."""
    for name, child in list(module.named_modules()):
        if name and isinstance(child, SparseModule):
            parent_name, _, attr = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, attr, child.to_dense())
    klass = module.__dict__.get("_original_class")
    old = klass.__new__(klass)
    old.__dict__.update({k: v for k, v in module.__dict__.items() if k not in module._runtime})
    old.__dict__["_modules"] = dict(module._modules)
    return old


def _ssa(q, k, v, scale, dense):
    """:func:`ssa_attention`, as the registered operator while ``torch.compile`` / ``torch.export`` trace."""
    if compiling():
        return torch.ops.sparseflow.ssa_attention(q, k, v, float(scale), bool(dense))
    return ssa_attention(q, k, v, scale, dense=dense)


def _channel_dot(a, b):
    """:func:`channel_dot`, as the registered operator while ``torch.compile`` / ``torch.export`` trace."""
    return torch.ops.sparseflow.channel_dot(a, b) if compiling() else channel_dot(a, b)


def _fold_projection(container: nn.Module, block_size, mode, neuron=None, time_steps=None) -> bool:
    """``SeqToANNContainer(Conv1d, BatchNorm1d)`` -> its conv becomes a SparseConv1d with the BN folded, and
    with ``neuron`` (the neuron the container feeds) fused too when the container is exactly conv -> BN."""
    conv = container[0] if len(container) else None
    if not isinstance(conv, nn.Conv1d) or isinstance(conv, SparseModule) or SparseConv1d.problem(conv):
        return False
    bn = container[1] if len(container) > 1 and isinstance(container[1], nn.BatchNorm1d) else None
    if bn is not None and (bn.training or not bn.track_running_stats or bn.num_features != conv.out_channels):
        bn = None
    if len(container) != (1 if bn is None else 2):
        neuron = None  # something else runs between the projection and the neuron
    container[0] = SparseConv1d.from_dense(conv, bn, neuron, block_size=block_size, mode=mode,
                                           time_steps=time_steps)
    return True


def _fused_projection(container: nn.Module, neuron: nn.Module):
    """The container's SparseConv1d when it runs ``neuron`` fused (so a residual can go into its epilogue)."""
    conv = container[0] if len(container) else None
    if isinstance(conv, SparseConv1d) and conv.fused_neuron is neuron and not _hooked(neuron, container, conv):
        return conv
    return None


def _require_tokens(x_seq: torch.Tensor) -> None:
    """The attention modules' own check of their ``[T, N, C, L]`` input, with their message."""
    if x_seq.ndim != 4:
        raise ValueError(f"expected 4D input with shape [T, N, C, L], but got input with shape {x_seq.shape}")


def _project_out(attn: nn.Module, x_seq: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """``proj_lif(proj_conv_bn(x_seq))`` of an attention module, plus ``residual`` where given: in the fused output
    projection's epilogue where ``optimize`` fused it with ``proj_lif``, else a separate add."""
    if residual is None:
        return attn.proj_lif(attn.proj_conv_bn(x_seq))
    proj = _fused_projection(attn.proj_conv_bn, attn.proj_lif)
    if proj is None:
        return residual + attn.proj_lif(attn.proj_conv_bn(x_seq))
    T, N = x_seq.shape[:2]
    y = proj(x_seq.flatten(0, 1), residual=residual.reshape(T * N, *residual.shape[2:]))
    return y.view(T, N, *y.shape[1:])


def _kernel_forward(neuron: nn.Module, x: torch.Tensor) -> KernelNeuronForward | None:
    """The neuron's kernel forward where this call may run it on the multi-step kernel outside a module call, as a
    drop-in fusing it does (accelerated, multi-step, eval mode, no hook, an input the kernels take, nothing for
    autograd), else None: the module is called then."""
    fwd = neuron.__dict__.get("forward")
    if (not isinstance(fwd, KernelNeuronForward) or neuron.training or has_hooks(neuron) or not kernels_can_run(x)
            or needs_autograd(x, neuron)):
        return None
    adapter = find_adapter(neuron)
    return None if adapter.step_forward or not adapter.is_multistep(neuron) else fwd


def _neuron_over_heads(neuron: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``neuron(x)`` for an attention's ``[T, N, heads, head_dim, L]`` output, returned ``[T, N, C, L]``. Where the
    neuron runs on the multi-step kernel (:func:`_kernel_forward`), it runs over the ``[T, N, C, L]`` view of ``x``
    with its stored ``[N, heads, head_dim, L]`` membrane viewed alike and stored back so: the neuron is elementwise,
    so the same spikes and membrane, and the spikes come channels innermost per token, what the output projection
    reads in place (over the 5-D tensor the heads merged into channels through a copy, and cuDNN's channels_last
    input took another). Else the module call, reshaped."""
    T, N, H, D, L = x.shape
    fwd = _kernel_forward(neuron, x)
    if fwd is None:
        return neuron(x).reshape(T, N, H * D, L)
    return neuron_kernel(neuron, x.reshape(T, N, H * D, L), spec=fwd.spec(), state_shape=(N, H, D, L))


def _hooked(*modules) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def _unfold_projection(container: nn.Module) -> None:
    if len(container) and isinstance(container[0], SparseConv1d):
        container[0] = container[0].to_dense()


# --------------------------------------------------------------------------------------------- Spikformer
if SpikingSelfAttention is not None:

    class SparseSpikingSelfAttention(_AttentionModule, SpikingSelfAttention):
        """Spikformer's ``SpikingSelfAttention`` with sparse projections and the SSA product on
        :func:`ssa_attention`; same children, ``state_dict`` keys and neuron state."""

        takes_skip_add = True

        @classmethod
        def from_dense(cls, attn, *, block_size=None, mode: str = "auto",
                       projections=("qkv_conv_bn", "proj_conv_bn"), neurons=None):
            """Wrap ``attn`` (sharing its children); the ``projections`` named (their inputs must be spikes
            for any gain) become SparseConv1d with their BatchNorm folded, in place inside ``attn``'s
            containers. ``neurons``: ``{projection: time_steps}`` for the projections whose neuron
            (``qkv_lif``, ``proj_lif``) runs fused with them. The caller puts the new module where ``attn`` was."""
            new = _wrap_exact(cls, attn, SpikingSelfAttention, mode, ("forward", "_ssa_kernel_torch"))
            new.projections = []
            for pname in projections or ():
                if pname not in ("qkv_conv_bn", "proj_conv_bn"):
                    raise ValueError(f"unknown projection {pname!r}")
                lif = getattr(new, _PROJECTION_NEURON[pname])
                fuse = neurons is not None and pname in neurons
                if _fold_projection(getattr(new, pname), block_size, mode, lif if fuse else None,
                                    neurons.get(pname) if fuse else None):
                    new.projections.append(pname)
            return new

        def to_dense(self):
            for pname in ("qkv_conv_bn", "proj_conv_bn"):
                _unfold_projection(getattr(self, pname))
            self.__dict__.pop("projections", None)
            return _unwrap(self)

        def kind(self) -> str:
            return "ssa" + "".join(
                f"+{p}" + ("+lif" if _fused_projection(getattr(self, p), getattr(self, _PROJECTION_NEURON[p]))
                           else "") for p in self.projections)

        def forward(self, x_seq: torch.Tensor, residual: torch.Tensor | None = None):
            """``residual`` (SparseFlow's addition, ``[T, N, C, L]``): returns ``residual + attn(x_seq)``, the add
            in the fused output projection's epilogue where it runs fused with ``proj_lif``."""
            _require_tokens(x_seq)
            T, N, _, L = x_seq.shape
            qkv = self.qkv_lif(self.qkv_conv_bn(x_seq))  # [T, N, 3C, L]
            local_dim = qkv.shape[2] // 3
            if local_dim % self.num_heads != 0:
                raise ValueError(f"local qkv dim {local_dim} is not divisible by num_heads={self.num_heads}.")
            qkv = qkv.reshape(T, N, 3, self.num_heads, local_dim // self.num_heads, L)
            if self._use_kernels(qkv):
                q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
                cands = {"sparse": lambda: _ssa(q, k, v, self.scale, self.mode == "dense"),
                         "torch": lambda: self._ssa_kernel_torch(qkv, self.scale)}
                x_seq = self._dispatch(("ssa", tuple(qkv.shape), qkv.stride(), qkv.dtype), cands, qkv)
            else:
                self.last_path = "torch"
                x_seq = self._ssa_kernel_torch(qkv, self.scale)
            x_seq = _neuron_over_heads(self.attn_lif, x_seq)
            return _project_out(self, x_seq, residual)

    _PROJECTION_NEURON = {"qkv_conv_bn": "qkv_lif", "proj_conv_bn": "proj_lif"}

    if SpikformerBlock is not None:
        class SparseSpikformerBlock(_AttentionModule, SpikformerBlock):
            """Spikformer's ``SpikformerBlock`` with both skip connections (``x + attn(x)``, ``x + mlp(x)``) added in
            the epilogue of the fused spiking projection that ends each branch (``proj_conv_bn -> proj_lif``,
            ``fc2 -> neuron2``), where ``optimize`` fused them; elsewhere the adds run as before. Same children,
            ``state_dict`` keys and neuron state. Its output keeps the fused kernels' layout (channels innermost
            per token) instead of the original's ``.contiguous()`` copy: the same values."""

            _dense_base = SpikformerBlock

            def kind(self) -> str:
                attn = isinstance(self.attn, SparseSpikingSelfAttention) and self._attn_proj() is not None
                return "spikformer block" + (" (residual adds fused: " + ", ".join(
                    n for n, ok in (("attn", attn), ("mlp", self._mlp_fc2() is not None)) if ok) + ")")

            def _attn_proj(self):
                return _fused_projection(self.attn.proj_conv_bn, self.attn.proj_lif)

            def _mlp_fc2(self):
                mlp = self.mlp
                if not isinstance(mlp, SpikformerMLP) or type(mlp).forward is not SpikformerMLP.forward or _hooked(mlp):
                    return None
                return _fused_projection(mlp.fc2, mlp.neuron2)

            def forward(self, x_seq: torch.Tensor):
                if x_seq.ndim != 5:
                    raise ValueError(f"expected 5D input with shape [T, N, C, H, W], but got {x_seq.shape}")
                T, N, C, H, W = x_seq.shape
                x = x_seq.flatten(3)
                if isinstance(self.attn, SparseSpikingSelfAttention) and self._attn_proj() is not None:
                    x = self.attn(x, residual=x)
                else:
                    x = x + self.attn(x)
                fc2 = self._mlp_fc2()
                if fc2 is None:
                    x = x + self.mlp(x)
                else:
                    h = self.mlp.neuron1(self.mlp.fc1(x))
                    x = fc2(h.flatten(0, 1), residual=x.reshape(T * N, *x.shape[2:])).view(T, N, *x.shape[2:])
                return x.reshape(T, N, C, H, W)
    else:  # pragma: no cover - a SpikingJelly without Spikformer
        SparseSpikformerBlock = None

    class SparseSpikeDrivenSelfAttention(_AttentionModule, SpikeDrivenSelfAttention):
        """The Spike-driven Transformer's ``SpikeDrivenSelfAttention`` with its Hadamard attention on
        :func:`channel_dot` (no head split/merge copies); same children, ``state_dict`` keys and neuron
        state (``attn_lif`` sees the module's ``[T, N, heads, 1, head_dim]`` tensor)."""

        _dense_base = SpikeDrivenSelfAttention

        def kind(self) -> str:
            return "sdsa"

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.ndim != 5:
                raise ValueError(f"expected 5D input [T, N, C, H, W], but got {x.shape}")
            T, N, C, H, W = x.shape
            identity = x
            x = self.shortcut_lif(x)
            q = self.q_lif(self.q_bn(self.q_conv(x)))
            k = self.k_lif(self.k_bn(self.k_conv(x)))
            v = self.v_lif(self.v_bn(self.v_conv(x)))
            kf, vf = k.reshape(T * N, C, H * W), v.reshape(T * N, C, H * W)
            if self._use_kernels(kf) and kf.dtype == vf.dtype:
                cands = {"sparse": lambda: _channel_dot(kf, vf), "torch": lambda: (kf * vf).sum(dim=-1)}
                s = self._dispatch(("sdsa", tuple(kf.shape), kf.stride(), kf.dtype), cands, kf)
            else:
                self.last_path = "torch"
                s = (kf * vf).sum(dim=-1)
            # s: [T*N, C], channel c = head * head_dim + j, as the module's head split
            kv = self.attn_lif(s.reshape(T, N, self.num_heads, 1, self.head_dim))
            x = q * kv.reshape(T, N, C, 1, 1).to(q.dtype)
            return self.proj_bn(self.proj_conv(x)) + identity

else:  # pragma: no cover - without SpikingJelly
    SparseSpikingSelfAttention = SparseSpikeDrivenSelfAttention = SparseSpikformerBlock = None


# ---------------------------------------------------------------------------------------------- QKFormer
def _token_attention(neuron: nn.Module, fwd: KernelNeuronForward, qk: torch.Tensor, num_heads: int) -> torch.Tensor:
    """:func:`qk_token_attention` with ``neuron`` (the module's ``attn_lif``, on the kernel through ``fwd``, whose
    spec is cached) from its stored membrane, its final membrane stored back as the neuron module itself stores it
    (see ``neuron_kernel``)."""
    adapter = find_adapter(neuron)
    _T, N, _C2, L = qk.shape
    v0 = adapter.get_v(neuron, (N, num_heads, 1, L), qk.device)
    y, v = qk_token_attention(qk, num_heads, fwd.spec(), v=v0, return_v=True, v_dtype=qk.dtype)
    adapter.set_v(neuron, v, qk.dtype)
    return y


if QKAttention is not None:

    class SparseQKAttention(_AttentionModule, QKAttention):
        """QKFormer's ``QKAttention`` with its token attention on :func:`qk_token_attention` (see the module
        docstring); same children, ``state_dict`` keys and neuron state."""

        _dense_base = QKAttention
        takes_skip_add = True

        @classmethod
        def from_dense(cls, module, *, mode: str = "auto"):
            return _wrap_exact(cls, module, QKAttention, mode, ("forward", "_qka_forward_torch"))

        def kind(self) -> str:
            return "qk attention" + (" (token kernel)" if self.qka_type == "token" else "")

        def _token_kernel(self, qk: torch.Tensor) -> KernelNeuronForward | None:
            """``attn_lif``'s kernel forward where this call's token attention runs on the kernel: token type, this
            module's kernels usable, ``attn_lif`` on the multi-step kernel without a hook (its hooks see its input
            then; :func:`_kernel_forward`), not faithful numerics (the module's own arithmetic), not under
            ``torch.compile`` (the module's own ops are traced); else None."""
            if self.qka_type != "token" or self.faithful or compiling() or not self._use_kernels(qk):
                return None
            return _kernel_forward(self.attn_lif, qk)

        def forward(self, x_seq: torch.Tensor, residual: torch.Tensor | None = None):
            """``residual`` (SparseFlow's addition, ``[T, N, C, L]``): returns ``residual + attn(x_seq)``, the add
            in the fused output projection's epilogue where it runs fused with ``proj_lif``."""
            _require_tokens(x_seq)
            T, N, C, L = x_seq.shape
            qk = self.qk_lif(self.qk_conv_bn(x_seq))  # [T, N, 2C, L]
            fwd = self._token_kernel(qk)
            if fwd is not None:
                self.last_path = "sparse"
                x_seq = _token_attention(self.attn_lif, fwd, qk, self.num_heads)
            else:
                self.last_path = "torch"
                qk = qk.reshape(T, N, 2, self.num_heads, C // self.num_heads, L)
                x_seq = self._qka_forward_torch(qk).flatten(2, 3)
            return _project_out(self, x_seq, residual)

else:  # pragma: no cover - a SpikingJelly without QKFormer's attention
    SparseQKAttention = None


# ------------------------------------------------------------------------------------- MultiheadAttention
def _float_mask(mask, dtype, name):
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    if not mask.is_floating_point():
        raise TypeError(f"{name} must be bool or floating point, got {mask.dtype}")
    return mask.to(dtype)


class SparseMultiheadAttention(_AttentionModule, nn.MultiheadAttention):
    """Drop-in ``nn.MultiheadAttention`` (same parameters and ``state_dict``): in eval mode with
    ``need_weights=False``, the input projections (and the output projection) run on :func:`sparse_linear`
    and the attention on ``F.scaled_dot_product_attention``. Separate q/k/v weights, ``bias_k``/``bias_v``,
    ``add_zero_attn``, ``is_causal`` without a mask, ``need_weights=True`` and numerics="faithful" run the module's own
    forward."""

    @classmethod
    def from_dense(cls, mha: nn.MultiheadAttention, *, mode: str = "auto") -> SparseMultiheadAttention:
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"from_dense expects an nn.MultiheadAttention, got {type(mha).__name__}")
        new = _wrap(cls, mha, mode)
        new.__dict__["_wcache"] = {}
        return new

    def kind(self) -> str:
        return "mha"

    def unsupported(self, need_weights=False, is_causal=False, attn_mask=None) -> str | None:
        """Why a call with these arguments runs the module's own forward, or None."""
        if need_weights:
            return "need_weights=True (pass need_weights=False for the sparse path)"
        if not self._qkv_same_embed_dim or self.in_proj_weight is None:
            return "separate kdim/vdim projections"
        if self.bias_k is not None or self.add_zero_attn:
            return "bias_k/bias_v or add_zero_attn"
        if is_causal and attn_mask is None:
            return "is_causal without an attn_mask"
        return None

    def _proj(self, x, weight, bias, tag):
        """``F.linear`` on the sparse GEMM (or torch, by measurement)."""
        K, N = weight.shape[1], weight.shape[0]
        cfg = default_linear_config(K, N)
        cache = self.__dict__["_wcache"].setdefault(tag, VersionCache())
        key = (*version_key(weight), weight.data_ptr(), x.dtype)
        w = cache.get(key, lambda: pack_linear_weight(weight, cfg.block_k, cfg.block_n, x.dtype))
        cands = {"sparse": lambda: sparse_linear(x, weight, bias, config=cfg, packed_weight=w,
                                                 dense=self.mode == "dense"),
                 "torch": lambda: F.linear(x, weight, bias)}
        return self._dispatch(("mha-proj", tag, tuple(x.shape), x.dtype), cands, x)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        why = self.unsupported(need_weights, is_causal, attn_mask)
        if why is None and (self.training or not self._use_kernels(query)):
            why = "training mode or tensors the kernels cannot run"
        if why is None and not (query.dtype == key.dtype == value.dtype == self.in_proj_weight.dtype):
            why = "input and weight dtypes differ"
        if why is None and self.faithful:
            why = "numerics='faithful'"  # its own arithmetic: its fast path rounds differently from SDPA here
        if why is not None:
            if not self.training and need_weights is False and not self.faithful:
                notice_once(f"mha-fallback:{why}", f"SparseMultiheadAttention: the module's own forward ({why})")
            self.last_path = "torch"
            return nn.MultiheadAttention.forward(self, query, key, value, key_padding_mask=key_padding_mask,
                                                 need_weights=need_weights, attn_mask=attn_mask,
                                                 average_attn_weights=average_attn_weights, is_causal=is_causal)
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        L, B, E = query.shape
        S = key.shape[0]
        H, hd = self.num_heads, self.head_dim
        w, b = self.in_proj_weight, self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
        if query is key and key is value:
            q, k, v = self._proj(query, w, b, "qkv").chunk(3, dim=-1)
        else:
            wq, wk, wv = w.chunk(3)
            q, k, v = self._proj(query, wq, bq, "q"), self._proj(key, wk, bk, "k"), self._proj(value, wv, bv, "v")
        q = q.reshape(L, B, H, hd).permute(1, 2, 0, 3)
        k = k.reshape(S, B, H, hd).permute(1, 2, 0, 3)
        v = v.reshape(S, B, H, hd).permute(1, 2, 0, 3)
        mask = _float_mask(attn_mask, q.dtype, "attn_mask")
        if mask is not None:
            mask = mask.view(1, 1, L, S) if mask.dim() == 2 else mask.view(B, H, L, S)
        kpm = _float_mask(key_padding_mask, q.dtype, "key_padding_mask")
        if kpm is not None:
            kpm = kpm.view(B, 1, 1, S)
            mask = kpm if mask is None else mask + kpm
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, H, L, hd]
        o = o.permute(2, 0, 1, 3).reshape(L, B, E)
        o = self._proj(o, self.out_proj.weight, self.out_proj.bias, "out")
        self.last_path = "sparse"
        if unbatched:
            return o.squeeze(1), None
        return (o.transpose(0, 1) if self.batch_first else o), None
