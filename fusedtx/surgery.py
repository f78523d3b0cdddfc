"""Model surgery: put fusedtx modules into an existing model, and take them out again.

``swap(model)`` walks the model and replaces, in place, every submodule it knows with its fused
drop-in, sharing the parameters (no copies, no re-initialisation, same device and dtype, same
``state_dict`` keys). Known modules are matched by their exact class (by qualified name, so timm,
torchvision and transformers are never imported here); a subclass of a known class is left alone,
since its ``forward`` may differ. ``unswap(model)`` puts the stock modules back.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from fusedtx import nn as fnn


@dataclass(frozen=True)
class Rule:
    """Replace modules whose class is one of ``classes`` (``module.QualName``) using ``convert``."""

    family: str  # the swap() switch that enables it: "norm", "attention" or "window_attention"
    kind: str  # what the report counts
    classes: tuple[str, ...]
    convert: Callable[[nn.Module], nn.Module]
    # An installing rule keeps the module and overrides its method ``installs`` on the instance
    # (``convert`` does it); its children are still visited, except ``skip`` (what the fused path covers).
    installs: str | None = None
    skip: tuple[str, ...] = ()


@functools.cache
def _selects_attention_function(cls: type) -> bool | None:
    """Whether ``cls.forward`` picks its attention function by ``config._attn_implementation``; None when
    its source cannot be read (a frozen or compiled install)."""
    try:
        return "_attn_implementation" in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return None


@functools.cache
def _register_hf_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register("fusedtx", fnn.attention.hf_attention_forward)


def _hf_attention(module: nn.Module) -> nn.Module:
    """A shallow copy of a Hugging Face attention module (same submodules and parameters) whose own copy
    of the config selects fusedtx's attention function through transformers' ``AttentionInterface``."""
    selects = _selects_attention_function(type(module))
    if selects is None:
        raise ValueError("its source cannot be read, so fusedtx cannot check that it selects its attention "
                         "function through transformers' attention interface")
    if not selects:
        raise ValueError("this transformers version computes attention inside the module (no attention "
                         "interface); transformers >= 4.51 is needed for ViT, >= 5.9 for Swin")
    _register_hf_attention()
    fused = copy.copy(module)
    for registry in ("_modules", "_parameters", "_buffers"):  # its own registries, holding the same entries
        object.__setattr__(fused, registry, dict(getattr(module, registry)))
    fused.config = copy.copy(module.config)
    fused.config._attn_implementation = "fusedtx"
    return fused


RULES: list[Rule] = [
    Rule("norm", "LayerNorm", ("torch.nn.modules.normalization.LayerNorm", "timm.layers.norm.LayerNorm"),
         fnn.LayerNorm.from_module),
    # torchvision's ViT encoder blocks use nn.MultiheadAttention too.
    Rule("attention", "MultiheadAttention", ("torch.nn.modules.activation.MultiheadAttention",),
         fnn.MultiheadAttention.from_module),
    Rule("attention", "timm Attention",
         ("timm.layers.attention.Attention", "timm.models.vision_transformer.Attention"),
         fnn.Attention.from_module),
    Rule("attention", "Hugging Face attention",
         ("transformers.models.vit.modeling_vit.ViTAttention",
          "transformers.models.vit.modeling_vit.ViTSelfAttention",
          "transformers.models.vit.modeling_vit.ViTSdpaSelfAttention",
          "transformers.models.swin.modeling_swin.SwinAttention",
          "transformers.models.swin.modeling_swin.SwinSelfAttention"),
         _hf_attention),
    # Swin V2 classes are listed so that the drop-ins reject them with a clear message.
    Rule("window_attention", "torchvision ShiftedWindowAttention",
         ("torchvision.models.swin_transformer.ShiftedWindowAttention",
          "torchvision.models.swin_transformer.ShiftedWindowAttentionV2"),
         fnn.ShiftedWindowAttention.from_module),
    Rule("window_attention", "timm Swin block attention",
         ("timm.models.swin_transformer.SwinTransformerBlock",
          "timm.models.swin_transformer_v2.SwinTransformerV2Block"),
         lambda block: fnn.SwinBlockAttention.from_module(block, install=True), installs="_attn", skip=("attn",)),
    Rule("window_attention", "timm WindowAttention",
         ("timm.models.swin_transformer.WindowAttention", "timm.models.swin_transformer_v2.WindowAttention"),
         fnn.WindowAttention.from_module),
]


@dataclass
class SwapReport:
    """What :func:`swap` did: ``replaced`` counts by kind, ``left_alone`` lists (name, class, reason)."""

    model: nn.Module
    replaced: Counter = field(default_factory=Counter)
    left_alone: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.replaced.values())

    def __str__(self) -> str:
        lines = [f"fusedtx.swap: replaced {self.total} modules"]
        lines += [f"  {kind}: {count}" for kind, count in sorted(self.replaced.items())]
        if self.left_alone:
            lines.append(f"left alone: {len(self.left_alone)}")
            lines += [f"  {name} ({cls}): {why}" for name, cls, why in self.left_alone]
        return "\n".join(lines)


class FusedAway(nn.Identity):
    """Stands where a module was folded into its neighbour (a GELU after a LayerNorm); keeps it for unswap."""

    def __init__(self, stock: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_fusedtx_stock", stock)  # a plain attribute: not a submodule, not in state_dict


def _class_name(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _subclassed_rule(module: nn.Module, rules: list[Rule]) -> Rule | None:
    bases = {f"{c.__module__}.{c.__qualname__}" for c in type(module).__mro__[1:]}
    return next((r for r in rules if bases & set(r.classes)), None)


def _replace(parent: nn.Module, name: str, stock: nn.Module, fused: nn.Module) -> None:
    object.__setattr__(fused, "_fusedtx_stock", stock)
    setattr(parent, name, fused)


def swap(model: nn.Module, *, attention: bool = True, norm: bool = True, window_attention: bool = True,
         inplace: bool = True) -> SwapReport:
    """Replace every known submodule of ``model`` with its fusedtx drop-in.

    ``attention``, ``norm`` and ``window_attention`` switch the families on or off. With
    ``inplace=False`` a deep copy is swapped and the original is untouched. Returns a
    :class:`SwapReport` whose ``model`` is the swapped model (``model`` itself when in place).
    Known: ``torch.nn.LayerNorm`` (and timm's LayerNorm), and a LayerNorm directly followed by
    ``nn.GELU`` / ``nn.ReLU`` in an ``nn.Sequential`` (fused into one ``LayerNormGELU``);
    ``torch.nn.MultiheadAttention`` (torchvision's ViT too), timm's ``Attention``, and Hugging Face's
    ViT and Swin attention modules (transformers >= 4.51, Swin >= 5.9: through its attention interface);
    torchvision's ``ShiftedWindowAttention``, timm's ``WindowAttention``, and timm's
    ``SwinTransformerBlock`` whose attention path (``_attn``: shift to reverse) is replaced on the
    instance by one fused kernel. The submodules of a replaced module are visited too (timm
    ``Attention``'s ``q_norm`` and ``k_norm`` LayerNorms), and a wrapper of a known kind holding one
    (transformers < 5: ``ViTAttention`` around ``ViTSelfAttention``) is entered rather than replaced.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    enabled = {"norm": norm, "attention": attention, "window_attention": window_attention}
    rules = [r for r in RULES if enabled[r.family]]
    by_class = {cls: r for r in rules for cls in r.classes}
    report = SwapReport(model)
    rule = by_class.get(_class_name(model))
    if rule is not None and rule.installs is not None:  # swap(block) itself: its path is installed in place
        _install(model, "", rule, by_class, rules, report)
    else:
        _swap_children(model, "", by_class, rules, report)
    return report


def _swap_children(parent: nn.Module, prefix: str, by_class: dict[str, Rule], rules: list[Rule],
                   report: SwapReport, skip: tuple[str, ...] = ()) -> None:
    children = list(parent.named_children())
    for i, (name, child) in enumerate(children):
        qualified = f"{prefix}{name}"
        if name in skip:
            continue  # covered by the parent's fused path
        if hasattr(child, "_fusedtx_stock") or type(child).__module__.startswith("fusedtx."):
            # swapped before, or built from fusedtx.nn: only its submodules may be new to this call
            _swap_children(child, f"{qualified}.", by_class, rules, report)
            continue
        rule = by_class.get(_class_name(child))
        if rule is not None and any(_class_name(c) in rule.classes for c in child.children()):
            rule = None  # a wrapper of the kind (transformers < 5: ViTAttention holds ViTSelfAttention): go inside
        if rule is not None and rule.installs is not None:
            _install(child, qualified, rule, by_class, rules, report)
            continue
        if rule is None:
            sub = _subclassed_rule(child, rules)
            if sub is not None:
                report.left_alone.append((qualified, _class_name(child),
                                          f"custom subclass of a {sub.kind}: its forward may differ"))
            else:
                _swap_children(child, f"{qualified}.", by_class, rules, report)
            continue
        nxt = children[i + 1][1] if i + 1 < len(children) else None
        if (rule.kind == "LayerNorm" and isinstance(parent, nn.Sequential)
                and type(nxt) in (nn.GELU, nn.ReLU)):
            _replace(parent, name, child, fnn.LayerNormGELU.from_module(child, nxt))
            setattr(parent, children[i + 1][0], FusedAway(nxt))
            report.replaced["LayerNorm+activation"] += 1
            continue
        try:
            fused = rule.convert(child)
        except (TypeError, ValueError) as exc:
            report.left_alone.append((qualified, _class_name(child), str(exc)))
            continue
        _replace(parent, name, child, fused)
        report.replaced[rule.kind] += 1
        _swap_children(fused, f"{qualified}.", by_class, rules, report)  # e.g. timm Attention's q_norm, k_norm


def _install(module: nn.Module, qualified: str, rule: Rule, by_class: dict[str, Rule], rules: list[Rule],
             report: SwapReport) -> None:
    if "_fusedtx_installed" not in module.__dict__:
        try:
            rule.convert(module)
        except (TypeError, ValueError) as exc:
            report.left_alone.append((qualified, _class_name(module), str(exc)))
        else:
            object.__setattr__(module, "_fusedtx_installed", rule)
            report.replaced[rule.kind] += 1
    skip = rule.skip if "_fusedtx_installed" in module.__dict__ else ()  # installed now or by an earlier swap
    _swap_children(module, f"{qualified}." if qualified else "", by_class, rules, report, skip)


def unswap(model: nn.Module) -> nn.Module:
    """Put back, in place, every stock module that :func:`swap` replaced in ``model``, and the stock
    methods it overrode; returns ``model``.

    The stock modules come back as the very objects that were there, still sharing their parameters."""
    for module in model.modules():
        rule = module.__dict__.pop("_fusedtx_installed", None)
        if rule is not None:
            del module.__dict__[rule.installs]
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            stock = getattr(child, "_fusedtx_stock", None)
            if stock is not None:
                setattr(parent, name, stock)
    return model
