"""What the report of ``optimize()`` accounts for besides the layers a pass replaced: an entry for every module
about to be considered, every convolution / linear layer no pass or handler reported (with the reason), the
BatchNorms that stayed unfolded (and why), and the report of a model without spiking modules (nothing changed)."""

from __future__ import annotations

from torch import nn

from .report import LayerEntry, OptimizeReport, user_type

#: layer types the report accounts for even when no pass or handler touched them
COMPUTE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                 nn.Linear)


def account_compute_layers(model, an, rep) -> None:
    """A "left" entry, with the reason, for every convolution / linear layer that no pass or handler
    reported (Conv3d, ConvTranspose3d, ...): the report accounts for every compute layer of the model."""
    seen = {e.name for e in rep.layers}
    for name, m in model.named_modules():
        if not name or name in seen or not isinstance(m, COMPUTE_TYPES):
            continue
        if any(name.startswith(s + ".") for s in seen):
            continue  # inside a module a handler replaced as a whole
        info = an.first(name)
        reason = ("not called in the example forward" if info is None
                  else f"no sparse op for {type(m).__name__} layers")
        rep.add(LayerEntry(name=name, type=user_type(m), action="left", reason=reason,
                           in_shape=info.in_shape if info else None,
                           elem_density=info.elem_density if info else None))


def new_entry(rep, name, m, info, filter_fn) -> LayerEntry:
    """The report entry of a module about to be considered ("left" until replaced); its reason is set already
    when ``filter_fn`` excludes the module."""
    entry = LayerEntry(name=name, type=user_type(m), action="left", in_shape=info.in_shape if info else None,
                       elem_density=info.elem_density if info else None)
    rep.add(entry)
    if filter_fn is not None and not filter_fn(m, name):
        entry.reason = "excluded by filter_fn"
    return entry


def unchanged_report(model) -> OptimizeReport:
    """A model without spiking modules: nothing is replaced, folded or fused (not even a stem BatchNorm: the
    model computes exactly what it did); the report lists its compute layers with the reason."""
    rep = OptimizeReport(notes=["no spiking modules found: model unchanged"])
    for name, m in model.named_modules():
        if name and isinstance(m, COMPUTE_TYPES):
            rep.add(LayerEntry(name=name, type=user_type(m), action="left", reason="no spiking modules in the model"))
    return rep


def explain_unfolded_bns(rep) -> None:
    """A BatchNorm fed by a convolution that it was not folded into (the convolution stayed dense, or could not
    take it): the reason says so, and where to look."""
    by_name = {e.name: e for e in rep.layers}
    for e in rep.layers:
        if e.action != "left" or not e.reason.startswith("fed by convolution "):
            continue
        conv = e.reason[len("fed by convolution "):].split(" ")[0]
        ce = by_name.get(conv)
        how = ("which stays as it is" if ce is None or ce.action == "left"
               else "which runs without it")
        e.reason = f"runs as it is: fed by convolution {conv}, {how} (see {conv})"
