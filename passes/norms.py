"""Norm sites: LayerNorm / RMSNorm module calls whose backward can keep their output y
(which the next Linear keeps anyway) and per-row statistics instead of their input
(fewbit_fx.nn.InvertedNorm). The same duplication as an activation's, often larger: a
Hugging Face RMSNorm written as aten ops keeps x and x*rstd.

Found in eager captures only, where the module objects are at hand: nn.LayerNorm,
nn.RMSNorm, and a module that `fewbit_fx.nn.norm_kind` calls a Hugging Face RMSNorm and
whose forward computes that formula bit for bit on probe inputs (so a look-alike class
that computes something else stays as it is).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from fewbit_fx.passes.capture import example_value


@dataclass(frozen=True)
class Norm:
    """What a norm site computes, in the place a site's Activation takes (report, names)."""

    name: str  # fewbit_fx.ops.norm's kind: layer_norm, rms_norm, hf_rms_norm
    invertible: bool = True

    def saves_mask(self, dtype: torch.dtype) -> bool:
        return False

    def __str__(self) -> str:
        return self.name


def find_norm_sites(graphs: list[fx.GraphModule], model: nn.Module) -> list:
    """One module site per call of a supported norm module, in graph order."""
    from fewbit_fx.passes.detect import Site, _module_groups

    modules = dict(model.named_modules())
    sites = []
    for gi, gm in enumerate(graphs):
        for nodes, (path, _) in _module_groups(gm.graph, accept=lambda cls: True):
            module = modules.get(path)
            kind = _kind(module)
            inputs = {a for n in nodes for a in n.all_input_nodes
                      if a not in nodes and _is_float_tensor(a) and not _is_parameter(a, module)}
            if kind is None or len(inputs) != 1:
                continue
            (x,) = inputs
            sites.append(Site(Norm(kind), nodes, x, gi, path, path))
    return sites


def _kind(module) -> str | None:
    from fewbit_fx.nn import norm_kind

    kind = norm_kind(module) if isinstance(module, nn.Module) else None
    if kind == "hf_rms_norm" and not _computes_hf_rms_norm(module):
        return None
    return kind


def _computes_hf_rms_norm(module: nn.Module) -> bool:
    """The module's forward is, bit for bit, the formula InvertedNorm reproduces, in fp32
    and bf16 (probe inputs; the module's own parameters, no autograd)."""
    from fewbit_fx.ops.norm import plain_norm

    gen = torch.Generator().manual_seed(0)
    weight = module.weight
    try:
        with torch.no_grad():
            for dtype in (torch.float32, torch.bfloat16):
                x = (torch.randn(3, weight.shape[-1], generator=gen) * 3).to(dtype).to(weight.device)
                want = plain_norm(x, "hf_rms_norm", list(weight.shape), weight, None,
                                  float(module.variance_epsilon))
                got = module(x)
                if not (isinstance(got, torch.Tensor) and got.dtype == want.dtype and torch.equal(got, want)):
                    return False
    except Exception:  # noqa: BLE001 - any other signature or behaviour: not this formula
        return False
    return True


def _is_float_tensor(node: fx.Node) -> bool:
    v = example_value(node)
    return isinstance(v, torch.Tensor) and v.is_floating_point()


def _is_parameter(node: fx.Node, module) -> bool:
    """The norm's own weight/bias: an attribute read, or a graph input Dynamo lifted from
    a module's parameters (named from its source, `..._parameters_weight_`)."""
    return node.op == "get_attr" or (node.op == "placeholder" and "_parameters_" in node.name)
