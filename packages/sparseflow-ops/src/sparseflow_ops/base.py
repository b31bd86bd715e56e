"""``SparseModule``: the base of every SparseFlow drop-in module.

A drop-in subclasses the dense module it replaces (same parameters, ``state_dict`` keys and ``isinstance``) and
this base, which owns what all of them share:

* **runtime state** - the version caches named in ``_caches``, ``last_path`` (the path the last call took) and
  the ``_pending`` hand-over to bypassed modules (:mod:`.bypass`): built by :meth:`~SparseModule._init_runtime`,
  rebuilt when a pickled module is loaded (copies and pickles carry no cache), and left out of the module
  ``to_dense`` returns (``_runtime``);
* **the folded BatchNorm** (``_bn``, :attr:`~SparseModule.folded_bn`): checked by :func:`check_foldable_bn`,
  adopted and bypassed by :meth:`~SparseModule._adopt`, run as the kernels' per-channel ``scale`` / ``shift``
  (:meth:`~SparseModule._affine`, cached under the BatchNorm's version counters) or folded into weights
  (:func:`fold_bn`), both through the ``sparseflow::bn_affine`` / ``sparseflow::fold_bn`` operators;
* **numerics** - ``"fast"`` (default) or ``"faithful"`` (``optimize(..., numerics="faithful")``): the dense
  modules' own arithmetic and layouts, the kernels only where they give the dense result bit for bit;
* **path choice** - :meth:`~SparseModule._use_kernels` (whether this call can run on the kernels at all) and
  :meth:`~SparseModule._choose` (which named path: under faithful numerics the exact one, the one ``mode``
  forces, else the one ``sparseflow_kernels.dispatch`` measured fastest for the call's key).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from sparseflow_kernels import dispatch as kdispatch
from sparseflow_kernels.library import bn_fold_affine, bn_fold_weights
from sparseflow_kernels.sparse_conv import fold_affine

from ._common import VersionCache, has_hooks, kernels_take, needs_autograd, version_key
from .bypass import adopt_dense, dense_copy

MODES = ("auto", "sparse", "dense", "torch")


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def check_dense(dense, expected: type, problem=None) -> None:
    """TypeError unless ``dense`` (what ``from_dense`` was given) is an ``expected``; ValueError with the reason
    ``problem(dense)`` gives (None: none) why it cannot run on the drop-in."""
    if not isinstance(dense, expected):
        raise TypeError(f"from_dense expects an nn.{expected.__name__}, got {type(dense).__name__}")
    why = problem(dense) if problem is not None else None
    if why:
        raise ValueError(why)


# ------------------------------------------------------------------------------------------- folded BatchNorm
def check_foldable_bn(bn, channels: int, owner: str = "the convolution", kind: type = nn.BatchNorm2d) -> None:
    """ValueError / TypeError unless ``bn`` (None: nothing to fold) is a ``kind`` BatchNorm over the ``channels``
    outputs of ``owner`` with running statistics."""
    if bn is None:
        return
    if not isinstance(bn, kind):
        raise TypeError(f"bn must be an nn.{kind.__name__}, got {type(bn).__name__}")
    if bn.num_features != channels:
        raise ValueError(f"bn has {bn.num_features} features, {owner} {channels} outputs")
    if not bn.track_running_stats or bn.running_mean is None:
        raise ValueError("BatchNorm without running statistics cannot be folded")


def _detached(t):
    return None if t is None else t.detach()


def _bn_tensors(bn):
    return (_detached(bn.running_mean), _detached(bn.running_var), _detached(bn.weight), _detached(bn.bias),
            float(bn.eps))


def bn_affine(bn: nn.BatchNorm2d):
    """Eval-mode BatchNorm as ``y * scale + shift`` (fp32), through the ``sparseflow::bn_affine`` operator (the
    same kernels eagerly and under ``torch.compile``)."""
    return bn_fold_affine(*_bn_tensors(bn))


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
    return bn_fold_weights(weight.detach(), None if bias is None else bias.detach(), *_bn_tensors(bn))


# ------------------------------------------------------------------------------------------------- the base
class SparseModule:
    """Base of every SparseFlow drop-in module (``SparseConv2d``, ``SparseLinear``, ...); see the module docstring.

    ``sparseflow_core.optimize`` never replaces a module that is already one, and ``restore`` calls its
    ``to_dense()``, which must return the original dense module type holding the same parameters (and leave
    any module it bypassed running on its own again).
    """

    #: the VersionCache attributes of this drop-in (packed weights, folded BatchNorm, ...)
    _caches: tuple[str, ...] = ("_acache",)
    #: attributes that are the drop-in's own: not carried over to the module ``to_dense`` returns
    _runtime: tuple[str, ...] = ("_pending", "_pool_pending", "_bn", "_neuron", "_pool", "_original_class",
                                 "_wcache", "_acache", "_bcache",
                                 "_scache", "_tcache", "block_size", "mode", "config", "write_occupancy", "defer_shift",
                                 "static_passthrough",
                                 "time_steps", "last_path", "step_mode", "numerics", "residual_chain",
                                 "_sum_neuron")
    #: "fast" or "faithful" (set per instance by ``optimize(..., numerics=...)``)
    numerics = "fast"
    #: whether ``forward(x, residual=r)`` returns ``r + forward(x)``, the add run by the module itself (in a kernel's
    #: epilogue where it can), so that ``optimize`` may move a skip connection's add into the call
    takes_skip_add = False

    def to_dense(self):  # pragma: no cover - every subclass implements it
        raise NotImplementedError(f"{type(self).__name__}.to_dense")

    # -- runtime state and pickling
    def _init_dropin(self, block_size, mode: str) -> None:
        """The drop-in's own state after the dense module's ``__init__``: nothing folded or fused yet."""
        self.block_size = block_size
        self.mode = mode
        self.time_steps: int | None = None
        self.__dict__["_bn"] = None
        self.__dict__["_neuron"] = None
        self.__dict__["_pool"] = None
        self._init_runtime()

    def _init_runtime(self) -> None:
        self.__dict__["_pending"] = False
        self.__dict__["_pool_pending"] = False
        for name in self._caches:
            self.__dict__[name] = VersionCache()
        self.last_path: str | None = None

    def __setstate__(self, state):
        super().__setstate__(state)
        if any(name not in self.__dict__ for name in ("_pending", *self._caches)):
            self._init_runtime()

    def _adopt(self, dense: nn.Module, bn=None, neuron=None, pool=None):
        """Take over ``dense``'s parameters; fold ``bn`` and fuse ``neuron`` (and ``pool``, the max pool after it),
        all bypassed. Returns self."""
        adopt_dense(self, dense, bn, neuron, pool)
        return self

    def _dense_copy(self, default_cls: type) -> nn.Module:
        """The dense module back (``to_dense``): same parameters; the folded and fused modules run on their own."""
        return dense_copy(self, default_cls, self._runtime)

    # -- the folded BatchNorm and the fused neuron
    @property
    def folded_bn(self):
        return self.__dict__.get("_bn")

    @property
    def fused_neuron(self):
        return self.__dict__.get("_neuron")

    @property
    def fused_pool(self):
        """The max pool after the fused neuron that this layer pools for (on the paths that return pooled spikes)."""
        return self.__dict__.get("_pool")

    def _affine(self):
        """(scale, shift) of the folded BatchNorm (fp32, cached under its versions), or (None, None)."""
        bn = self.folded_bn
        if bn is None:
            return None, None
        return self._acache.get(bn_key(bn), lambda: bn_affine(bn))

    def _affine_with_bias(self):
        """(scale, shift) of the folded BatchNorm with the layer's own bias folded into the shift
        (``fold_affine``: ``(conv + bias) * scale + shift``), fp32, cached under the versions of both (in ``_bcache``,
        which a drop-in calling this lists in its ``_caches``); the kernels then take no bias, and nothing is folded
        per call (two small kernels a layer, in every replay of a CUDA graph)."""
        if self.bias is None:
            return self._affine()
        key = (bn_key(self.folded_bn), *version_key(self.bias), self.bias.dtype)
        return self._bcache.get(key, lambda: fold_affine(self.bias.detach(), *self._affine()))

    def kind(self) -> str:
        return self._kind + ("+bn" if self.folded_bn is not None else "")

    def _repr_fields(self) -> dict:
        """What ``repr`` shows beyond the dense module's own fields."""
        return {"fused": self.kind(), "block_size": self.block_size, "mode": self.mode}

    def extra_repr(self):
        return super().extra_repr() + "".join(f", {k}={v}" for k, v in self._repr_fields().items())

    # -- numerics and path choice
    @property
    def faithful(self) -> bool:
        """numerics="faithful": the dense modules' arithmetic and layouts."""
        return self.numerics == "faithful"

    def chain_hooked(self) -> bool:
        """Whether this layer, its folded BatchNorm or its fused neuron has a hook (or a global module hook is
        registered). The chain then runs through its modules (the layer on its own weights, the BatchNorm module,
        the neuron module from its stored membrane), so that every hook sees what it sees in the dense model."""
        return has_hooks(self, self.folded_bn, self.fused_neuron, self.fused_pool)

    def _use_kernels(self, x: torch.Tensor) -> bool:
        """Whether this call can run on the kernels: eval mode (this module, its folded BatchNorm and fused neuron),
        no hook on the chain (:meth:`chain_hooked`), an input the kernels take with this module's weight, and no
        autograd to record."""
        bn, neuron = self.folded_bn, self.fused_neuron
        if self.training or any(m is not None and m.training for m in (bn, neuron)):
            return False
        if (bn is not None or neuron is not None) and self.chain_hooked():
            return False
        return kernels_take(x, self.weight, type(self).__name__) and not needs_autograd(x, self, bn, neuron)

    def _choose(self, key, cands: Mapping, x: torch.Tensor, *, fallback: str | None = None, default: str = "dense",
                forced: Mapping | None = None, exact: str | None = None, traced: bool = False) -> str:
        """The named path this call takes among ``cands`` (name -> callable), remembered as ``last_path``:

        * numerics="faithful": ``exact``, the candidate that computes as the dense module (where offered);
        * a ``mode`` other than "auto": its path (``forced`` maps a mode to a candidate; ``default`` where the
          call does not offer it);
        * ``traced`` (under ``torch.compile``: no timing): the path the eager dispatch chose, else ``fallback``;
        * else the candidate ``sparseflow_kernels.dispatch`` measured fastest for ``key`` (``fallback``: "sparse"
          where offered, else "dense", until measured)."""
        if fallback is None:
            fallback = "sparse" if "sparse" in cands else "dense"
        if self.faithful and exact in cands:
            path = exact
        elif self.mode != "auto":
            path = (forced or {}).get(self.mode, self.mode)
            path = path if path in cands else default
        elif traced:
            path = self.last_path if self.last_path in cands else fallback
        else:
            path = kdispatch.choose(key, cands, fallback=fallback, device=x.device)
        self.last_path = path
        return path

    def _dispatch(self, key, cands: Mapping, x: torch.Tensor, **how):
        """Run the path :meth:`_choose` picks among ``cands``."""
        return cands[self._choose(key, cands, x, **how)]()
