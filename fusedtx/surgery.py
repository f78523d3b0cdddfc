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
import itertools
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fusedtx import fastpath
from fusedtx import nn as fnn
from fusedtx.ops.layer_norm_gelu import layer_norm_gelu


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
def _source(cls: type, attr: str | None = None) -> str | None:
    """The source of ``cls`` (or of its ``attr``), None when it cannot be read (a frozen or compiled install)."""
    try:
        return inspect.getsource(getattr(cls, attr) if attr else cls)
    except (OSError, TypeError):
        return None


def _selects_attention_function(cls: type) -> bool | None:
    """Whether ``cls.forward`` picks its attention function by ``config._attn_implementation``; None when
    its source cannot be read."""
    source = _source(cls, "forward")
    return None if source is None else "_attn_implementation" in source


@functools.cache
def _calls_sdpa(cls: type) -> bool:
    """Whether ``cls`` (up to the class that defines its ``forward``) calls ``scaled_dot_product_attention``
    itself. torch's and fusedtx's own classes are never taken."""
    for c in cls.__mro__:
        if c is nn.Module or c.__module__.startswith(("torch.", "fusedtx.")):
            return False
        if "scaled_dot_product_attention" in (_source(c) or ""):
            return True
        if "forward" in c.__dict__:
            return False
    return False


def _attention_like(module: nn.Module) -> bool:
    """What the report counts as attention: a class named ``*Attention*`` / ``*Attn*``, or one calling SDPA."""
    name = type(module).__name__
    return "Attention" in name or "Attn" in name or _calls_sdpa(type(module))


def _hf_selects(module: nn.Module) -> bool:
    """A Hugging Face attention module that picks its function through ``config._attn_implementation``."""
    return (type(module).__module__.startswith("transformers.") and hasattr(module, "config")
            and ("Attention" in type(module).__name__ or "Attn" in type(module).__name__)
            and bool(_selects_attention_function(type(module))))


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
    fnn.attention.register_hf_attention()
    fused = copy.copy(module)
    for registry in ("_modules", "_parameters", "_buffers"):  # its own registries, holding the same entries
        object.__setattr__(fused, registry, dict(getattr(module, registry)))
    fused.config = copy.copy(module.config)
    fused.config._attn_implementation = "fusedtx"
    return fused


def _prenorm_forward(self, x, attn_mask=None, **kwargs):
    """timm ViT ``Block.forward`` with the attention branch's residual add and ``norm2`` in one
    ``layer_norm_gelu(..., activation="none", residual=x)`` call, which returns the normalized sum and the sum.

    Linked to the next block of its ``nn.Sequential`` (``_fusedtx_next``, set by :func:`_link_blocks`), the MLP
    branch's residual add and the next block's ``norm1`` are one such call too: the sum is returned and its
    normalized value handed to the next block, which takes it only when called with that very tensor (else,
    e.g. after a hook changed x, it runs its ``norm1``)."""
    compiling = torch.compiler.is_compiling()  # no state between blocks in a traced graph (Inductor fuses it there)
    handoff = None if compiling else self.__dict__.pop("_fusedtx_handoff", None)
    h = handoff[1] if handoff is not None and handoff[0] is x else self.norm1(x)
    y = self.drop_path1(self.ls1(self.attn(h, attn_mask=attn_mask, **kwargs)))
    h, x = _add_norm(y, x, self.norm2)
    y = self.drop_path2(self.ls2(self.mlp(h)))
    nxt = None if compiling else self.__dict__.get("_fusedtx_next")
    if nxt is None or _hooked(nxt.norm1):
        return x + y
    h, x = _add_norm(y, x, nxt.norm1)
    object.__setattr__(nxt, "_fusedtx_handoff", (x, h))
    return x


def _add_norm(y: Tensor, x: Tensor, norm: nn.Module) -> tuple[Tensor, Tensor]:
    """``(norm(y + x), y + x)`` in one pass (``norm`` a last-dim LayerNorm)."""
    return layer_norm_gelu(y, norm.weight, norm.bias, norm.eps, activation="none", residual=x)


def _hooked(module: nn.Module) -> bool:
    """Whether a forward hook of ``module`` (or a global one) would miss a call that bypasses it."""
    return bool(module._forward_hooks or module._forward_pre_hooks or nn.modules.module._global_forward_hooks
                or nn.modules.module._global_forward_pre_hooks)


NEXT_NORM = "MLP residual add with the next block's norm1"


def _link_blocks(model: nn.Module, report: SwapReport) -> None:
    """Link each pre-norm block with the fused residual path to the next one of its ``nn.Sequential`` when that
    one has it too (its ``norm1`` then runs inside this block's last residual add); unswap removes the links."""
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        for block, nxt in itertools.pairwise(seq):
            if (all(getattr(m, "_fusedtx_installed", None) is _PRENORM_RULE for m in (block, nxt))
                    and "_fusedtx_next" not in block.__dict__ and _last_dim_layer_norm(nxt.norm1)):
                object.__setattr__(block, "_fusedtx_next", nxt)
                block.__dict__.setdefault("_fusedtx_restore", {})["_fusedtx_next"] = _MISSING
                nxt.__dict__.setdefault("_fusedtx_restore", {})["_fusedtx_handoff"] = _MISSING
                report.replaced[NEXT_NORM] += 1


def _last_dim_layer_norm(norm) -> bool:
    return isinstance(norm, nn.LayerNorm) and len(norm.normalized_shape) == 1


def _install_prenorm(block: nn.Module) -> nn.Module:
    """Install :func:`_prenorm_forward` on a timm ViT ``Block`` whose ``norm2`` is a last-dim LayerNorm."""
    check = getattr(block, "norm2", None)
    if not _last_dim_layer_norm(check):
        raise TypeError(f"its norm2 ({type(check).__name__}) is not a LayerNorm over the last dimension")
    for name in ("norm1", "attn", "ls1", "drop_path1", "ls2", "drop_path2", "mlp"):
        if not hasattr(block, name):
            raise TypeError(f"it lacks {name}: not the timm ViT Block the fused residual path is written for")
    object.__setattr__(block, "forward", fnn.attention.InstalledForward(block, _prenorm_forward))
    return block


def _activation(act: nn.Module | None) -> str | None:
    """The name of an activation module that fusedtx computes in place or fuses after a LayerNorm, or None
    (also for none: an ``nn.Identity`` has nothing to fuse)."""
    name = fnn.layer_norm_gelu.activation_name(act)
    return None if name == "none" else name


def _mlp_forward(self, x):
    """timm ``Mlp.forward`` with the activation applied in place on fc1's fresh output when autograd is not
    recording (on a CPU, at ViT-B's 4096 tokens, a second buffer of that size costs about 9% of fc1 and the
    GELU together). A forward hook on fc1 or the activation may keep fc1's output: then the stock path runs."""
    if torch.is_grad_enabled() or _hooked(self.fc1) or _hooked(self.act):
        return type(self).forward(self, x)
    x = fastpath.activate(self.fc1(x), _activation(self.act))
    return self.drop2(self.fc2(self.norm(self.drop1(x))))


def _install_mlp(mlp: nn.Module) -> nn.Module:
    """Install :func:`_mlp_forward` on a timm ``Mlp`` whose activation is GELU (exact or tanh) or ReLU."""
    if _activation(getattr(mlp, "act", None)) is None:
        raise TypeError(f"its activation ({_class_name(getattr(mlp, 'act', None))}) has no in-place "
                        "fusedtx variant (torch's GELU and ReLU, timm's GELU and GELUTanh)")
    object.__setattr__(mlp, "forward", fnn.attention.InstalledForward(mlp, _mlp_forward))
    return mlp


def _routed_forward(self, *args, **kwargs):
    """The ``forward`` swap installs on a module that calls SDPA itself: its class's forward, with every
    ``F.scaled_dot_product_attention`` call inside it computed by the fused op (:class:`fnn.attention.SDPARoute`)."""
    with fnn.attention.SDPARoute():
        return type(self).forward(self, *args, **kwargs)


def _install_route(module: nn.Module) -> nn.Module:
    """Install the SDPA route on ``module`` (an instance ``forward``, see ``InstalledForward``); timm's
    ``fused_attn = False`` (its switch to the non-SDPA path) is turned on, and put back by unswap."""
    if getattr(module, "fused_attn", True) is False:
        object.__setattr__(module, "_fusedtx_restore", {"fused_attn": module.__dict__.get("fused_attn", _MISSING)})
        object.__setattr__(module, "fused_attn", True)
    object.__setattr__(module, "forward", fnn.attention.InstalledForward(module, _routed_forward))
    return module


_MISSING = object()
def _install_swin_block(block: nn.Module) -> nn.Module:
    return fnn.SwinBlockAttention.from_module(block, install=True)


_PRENORM_RULE = Rule("norm", "pre-norm residual add", ("timm.models.vision_transformer.Block",), _install_prenorm,
                     installs="forward")

RULES: list[Rule] = [
    Rule("norm", "LayerNorm", ("torch.nn.modules.normalization.LayerNorm", "timm.layers.norm.LayerNorm"),
         fnn.LayerNorm.from_module),
    # x + ls1(attn(norm1(x))) then norm2: one layer_norm_gelu call with the residual (the block's forward).
    _PRENORM_RULE,
    Rule("norm", "MLP activation in place", ("timm.layers.mlp.Mlp",), _install_mlp, installs="forward"),
    # torchvision's ViT encoder blocks use nn.MultiheadAttention too.
    Rule("attention", "MultiheadAttention", ("torch.nn.modules.activation.MultiheadAttention",),
         fnn.MultiheadAttention.from_module),
    Rule("attention", "timm Attention",
         ("timm.layers.attention.Attention", "timm.models.vision_transformer.Attention"),
         fnn.Attention.from_module),
    # Listed for transformers < 5 (ViTAttention wraps the selecting module, which is entered) and for the
    # report's message on versions that compute attention inside the module; any other transformers
    # attention module that selects its function by config._attn_implementation is found by _hf_selects.
    Rule("attention", "Hugging Face attention",
         ("transformers.models.vit.modeling_vit.ViTAttention",
          "transformers.models.vit.modeling_vit.ViTSelfAttention",
          "transformers.models.vit.modeling_vit.ViTSdpaSelfAttention",
          "transformers.models.swin.modeling_swin.SwinAttention",
          "transformers.models.swin.modeling_swin.SwinSelfAttention"),
         _hf_attention),
    # Swin V2 classes are listed so that the drop-ins reject them with a clear message.
    Rule("window_attention", "torchvision ShiftedWindowAttention",
         ("torchvision.models.swin_transformer.ShiftedWindowAttention",), fnn.ShiftedWindowAttention.from_module),
    Rule("window_attention", "timm Swin block attention", ("timm.models.swin_transformer.SwinTransformerBlock",),
         _install_swin_block, installs="_attn", skip=("attn",)),
    Rule("window_attention", "timm WindowAttention", ("timm.models.swin_transformer.WindowAttention",),
         fnn.WindowAttention.from_module),
    Rule("window_attention", "timm Swin V2 block attention",
         ("timm.models.swin_transformer_v2.SwinTransformerV2Block",),
         fnn.window_attention.install_swin_v2_block, installs="_attn", skip=("attn",)),
    # Swin V2: cosine attention and the continuous position bias, as an instance forward on the stock module.
    Rule("window_attention", "Swin V2 window attention",
         ("timm.models.swin_transformer_v2.WindowAttention",
          "torchvision.models.swin_transformer.ShiftedWindowAttentionV2",
          "transformers.models.swinv2.modeling_swinv2.Swinv2SelfAttention"),
         fnn.window_attention.install_swin_v2, installs="forward"),
]




SDPA_ROUTE = Rule("attention", "SDPA route", (), _install_route, installs="forward")
HF_INTERFACE = Rule("attention", "Hugging Face attention", (), _hf_attention)


def _discards_weights(parent: nn.Module, name: str) -> bool:
    """Whether ``parent``'s forward calls its child ``name`` only as ``self.name(...)[0]`` without passing
    ``need_weights`` (SigLIP's attention-pool head): the weights torch computes by default are thrown away."""
    src = _source(type(parent), "forward") or ""
    calls = re.findall(rf"self\.{re.escape(name)}\((?:[^()]|\([^()]*\))*\)(\s*\[\s*0\s*\])?", src)
    full = re.findall(rf"self\.{re.escape(name)}\((?:[^()]|\([^()]*\))*\)", src)
    return bool(calls) and all(calls) and not any("need_weights" in c for c in full)


@dataclass
class SwapReport:
    """What :func:`swap` did: ``replaced`` counts by kind, ``left_alone`` lists (name, class, reason) for every
    module it did not fuse that it could have wanted to (every attention-like module among them), and
    ``coverage`` counts, per family, (fused, total) over the model's modules after the swap."""

    model: nn.Module
    replaced: Counter = field(default_factory=Counter)
    left_alone: list[tuple[str, str, str]] = field(default_factory=list)
    coverage: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.replaced.values())

    def __str__(self) -> str:
        lines = [f"fusedtx.swap: replaced {self.total} modules"]
        lines += [f"  {kind}: {count}" for kind, count in sorted(self.replaced.items())]
        if self.coverage:
            lines.append(", ".join(f"{kind}: {done}/{of}" + (" fused" if kind == "attention" else "")
                                   for kind, (done, of) in self.coverage.items()))
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
    ``nn.GELU`` / ``nn.ReLU`` (or timm's ``GELU`` / ``GELUTanh``) in an ``nn.Sequential`` (fused into one
    ``LayerNormGELU``);
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
    _link_blocks(model, report)
    _count_coverage(model, enabled, report)
    return report


def _why_left_alone(module: nn.Module, enabled: dict[str, bool]) -> str:
    """The reason an attention-like module was not fused, for the report."""
    name = type(module).__name__
    if "Window" in name and not enabled["window_attention"]:
        return "window_attention=False"
    if not enabled["attention"]:
        return "attention=False"
    if "TalkingHead" in name or (hasattr(module, "proj_l") and hasattr(module, "proj_w")):
        return "talking-heads attention mixes heads across the softmax, which the kernel cannot express"
    if "Outlook" in name:
        return "outlook attention predicts local attention weights from each token (no q·kᵀ softmax)"
    return ("computes attention in its own forward: no F.scaled_dot_product_attention call, no Hugging Face "
            "attention interface, no fusedtx drop-in for its class")


def _count_coverage(model: nn.Module, enabled: dict[str, bool], report: SwapReport) -> None:
    """Fill ``report.coverage`` from the swapped model, and list every attention-like module it left stock
    (wrappers that only hold other attention modules, as transformers' ``ViTAttention``, are not counted)."""
    covered = set()  # stock modules a fused path of their parent computes (a timm Swin block's attn)
    for m in model.modules():
        rule = m.__dict__.get("_fusedtx_installed")
        if rule is not None:
            covered.update(id(getattr(m, n)) for n in rule.skip if getattr(m, n, None) is not None)
    listed = {name for name, _, _ in report.left_alone}
    counts = {"attention": [0, 0], "LayerNorm": [0, 0]}
    for name, m in model.named_modules():
        ours = type(m).__module__.startswith("fusedtx.")
        if isinstance(m, FusedAway):
            continue
        if isinstance(m, nn.LayerNorm) or "LayerNorm" in type(m).__name__:
            counts["LayerNorm"][0] += ours
            counts["LayerNorm"][1] += 1
            continue
        if not _attention_like(m) or (not ours and not _calls_sdpa(type(m)) and "_fusedtx_stock" not in m.__dict__
                                      and any(_attention_like(c) for c in m.modules() if c is not m)):
            continue
        installed = m.__dict__.get("_fusedtx_installed")
        fused = (ours or id(m) in covered or "_fusedtx_stock" in m.__dict__
                 or (installed is not None and installed.family != "norm"))
        counts["attention"][0] += fused
        counts["attention"][1] += 1
        if not fused and name not in listed:
            report.left_alone.append((name, _class_name(m), _why_left_alone(m, enabled)))
    report.coverage = {kind: (done, of) for kind, (done, of) in counts.items()}


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
        if rule is None and any(r.family == "attention" for r in rules):
            if _hf_selects(child):
                rule = HF_INTERFACE  # any transformers attention module choosing by config._attn_implementation
            elif _calls_sdpa(type(child)):
                rule = SDPA_ROUTE  # any module calling F.scaled_dot_product_attention itself
        if rule is not None and rule.installs is not None:
            _install(child, qualified, rule, by_class, rules, report)
            continue
        if rule is None:
            sub = _subclassed_rule(child, rules)
            if sub is not None and sub.kind != "pre-norm residual add":  # a Block subclass: just go inside
                report.left_alone.append((qualified, _class_name(child),
                                          f"custom subclass of a {sub.kind}: its forward may differ"))
            else:
                _swap_children(child, f"{qualified}.", by_class, rules, report)
            continue
        nxt = children[i + 1][1] if i + 1 < len(children) else None
        if (rule.kind == "LayerNorm" and isinstance(parent, nn.Sequential)
                and _activation(nxt) is not None):
            _replace(parent, name, child, fnn.LayerNormGELU.from_module(child, nxt))
            setattr(parent, children[i + 1][0], FusedAway(nxt))
            report.replaced["LayerNorm+activation"] += 1
            continue
        try:
            if rule.kind == "MultiheadAttention":
                fused = fnn.MultiheadAttention.from_module(child, weights_unused=_discards_weights(parent, name))
            else:
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
        for attr, value in module.__dict__.pop("_fusedtx_restore", {}).items():
            if value is _MISSING:
                module.__dict__.pop(attr, None)
            else:
                object.__setattr__(module, attr, value)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            stock = getattr(child, "_fusedtx_stock", None)
            if stock is not None:
                setattr(parent, name, stock)
    return model
