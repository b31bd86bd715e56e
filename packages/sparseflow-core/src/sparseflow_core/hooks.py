"""Which hooks keep a module from being replaced, fused or folded.

A replacement module would drop the hooks registered on the module it replaces, and a fused or folded module
would hand them other values: such modules are left as they are. Both the passes of ``optimize()`` and the op
handlers ask :func:`module_hooks`; SparseFlow's own forward pre-hooks on the model (the lazy optimization, the
input cast of ``dtype=``, the check of ``static_input=True``) subclass :class:`OwnPreHook` and do not count. They
carry the observer mark (``sparseflow_ops.OBSERVER_ATTR``) too, so that neither a fused chain's hook check nor the
CUDA-graph wrapper's takes them for a user's hook.
"""

from __future__ import annotations

from torch import nn

from sparseflow_ops import OBSERVER_ATTR


class OwnPreHook:
    """Base of SparseFlow's own forward pre-hooks on a model; :func:`module_hooks` and ``has_hooks`` do not count
    them."""

    @classmethod
    def install(cls, model: nn.Module, *args) -> None:
        """Register ``cls(*args)`` on ``model`` in place of any earlier hook of this kind."""
        cls.remove(model)
        model.register_forward_pre_hook(cls(*args))

    @classmethod
    def remove(cls, model: nn.Module) -> None:
        """Unregister the hooks of this kind from ``model``."""
        for hid, hook in list(model._forward_pre_hooks.items()):
            if isinstance(hook, cls):
                del model._forward_pre_hooks[hid]


setattr(OwnPreHook, OBSERVER_ATTR, True)


def module_hooks(m: nn.Module) -> str:
    """The kinds of hooks registered on ``m`` (or on every module), '' when none."""
    from torch.nn.modules import module as _mm

    kinds = [k for k, d in (("forward", "_forward_hooks"), ("forward pre", "_forward_pre_hooks"),
                            ("backward", "_backward_hooks"), ("backward pre", "_backward_pre_hooks"))
             if getattr(m, d, None)]
    kinds += [f"global {k}" for k, d in (("forward", "_global_forward_hooks"),
                                         ("forward pre", "_global_forward_pre_hooks")) if getattr(_mm, d, None)]
    if "forward pre" in kinds and all(isinstance(h, OwnPreHook) for h in m._forward_pre_hooks.values()):
        kinds.remove("forward pre")
    return ", ".join(kinds)
