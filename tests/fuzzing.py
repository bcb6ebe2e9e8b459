"""A fuzzer of our own (issue 18): random small networks, optimized and compiled, checked
against the untouched original.

Why: the unit tests check each op on inputs someone thought of; the bugs of issue 18 came
from combinations (one module at two sites with two decisions, a setitem after an inverted
site, a Hardtanh bound that bf16 cannot represent, a mutation after a graph break). So every
network here is drawn at random from a seed, and every check compares against the original
model, which is a deep copy taken before `optimize` and never rewritten.

    python3 -m pytest tests/test_fuzz.py -q                                   # CI: fixed seeds, <= 150 s
    python3 tests/fuzzing.py --minutes 30 --seed S --out reports/fuzz.md      # the long run
    python3 tests/fuzzing.py --show SEED        # one network's source (the reproducer)
    python3 tests/fuzzing.py --replay SEED      # run one network's checks, minimise failures

What is drawn (`generate`)
  Sequential (an nn.Sequential of modules) or functional forwards (an nn.Module whose forward
  is Python source written to a file, so that functional sites can be rewritten from their
  source as for a user's model); dense (B, F) / (B, T, F) or conv (B, C, H, W) layouts; 1-4
  blocks `z = pre(h); a = act(z); [mutation]; h = sum(consumers(a, z))`. Every registry
  activation (fewbit_fx.activations.SUPPORTED; the Hugging Face formula ones when
  transformers is installed) with random torch arguments, negative and boundary ones
  included, as a module, module(inplace=True), functional, method or in-place call, or a
  module already used by an earlier block (one module, two sites). Producers and consumers:
  Linear / Conv2d (trainable or frozen), matmul, mul (by z, a constant, a parameter, itself),
  residual add, LayerNorm, BatchNorm, dropout (p > 0 too: the RNG is reseeded before every
  forward), reshape/transpose/slice+cat/sum views, softmax; mutations of the activation's
  output (mul_, add_, +=, clamp_, leaky_relu_, threshold_, hardtanh_, setitem, masked_fill_,
  copy_ into a slice, zero_); graph breaks; an activation output returned as a second
  output. fp32, fp64, bf16, fp16 and autocast(cpu, bf16); train or eval; batch 0, 1 and odd
  sizes; contiguous, transposed, strided-slice and channels_last inputs; sometimes a NaN,
  +inf and -inf in the input.

What is checked (`check_eager`, `check_compiled`), per mode exact / auto / fewbit (and
optimize(auto) followed by optimize(exact), which must decide afresh)
  * optimize itself: does not raise; leaves the input, parameters, buffers, train flag and the
    global RNG untouched.
  * forward: every output bitwise equal to the original's (NaN where it has NaN), and the
    buffers after the forward (BatchNorm statistics) too; under torch.no_grad as well. A
    network whose original forward or backward raises (an in-place op on a tensor autograd
    saved) is "invalid" and skipped; if the original runs, the optimized model must run.
  * exact mode: no FewBit module anywhere; every gradient within the bound below; the same
    non-finite pattern as the original's (with NaN inputs only: NaN wherever it has NaN, as
    torch's own scalar and vectorised loops disagree at x = NaN).
  * few-bit sites (auto and fewbit modes): the gradients equal, bit for bit, those of the same
    optimized model with every FewBit module's backward replaced by our own
    g * levels[bucketize(x, borders)] (`_ReferenceFewBit`, the module's own table; NaN where
    torch's derivative is NaN) and Inverted sites left as they are.
  * every Inverted module, on the very inputs it saw in the network: elementwise within the
    dtype's floor (below); at x = NaN or inf torch's answer (at NaN either loop's); with a
    NaN upstream gradient, NaN exactly where torch's backward gives NaN (it gives 0 where f
    is flat).
  * torch.compile(model, backend=fewbit_fx.backend(mode), dynamic=True) on two input shapes:
    no fallback warning, forward and gradients close to the eager original (exact mode), or
    to the eager original with its few-bit module sites swapped for FewBit (N(0, 1) tables,
    as the backend uses); where a few-bit site is functional only finiteness is checked.

Known open bugs (KNOWN_OPEN, each with a strict-xfail reproducer in tests/test_fuzz.py): in
the configurations an entry applies to, a check whose every failure is that bug counts as
"excluded", so the CI run stays green and still fails on anything else.

Bounds (derived here, so that a failure means a bug, not noise)
  * Floor of an inverted derivative (`inverted_floor`). Inverted keeps y = round(f(x)) and
    maybe a side bit (`side`). Any x' with the same side whose f(x') rounds to y could have
    given that y, so no method can promise better than max |f'(x') - f'(x)| over them. On
    each side f is monotone, so those x' form an interval: |f(x') - y| <= max(ulp(y)/2,
    |y - f(x)|), the second term the forward's actual error at x (torch's vectorised fp32
    GELU is 1e-4 off in the left tail; x - round(tanh x) and the Hugging Face formulas in
    bf16 round several times), which no inverse can see through: the exact inverse of y is
    in the interval. Its ends are found by bisection, f' is read on 65 points of it (float64,
    torch's own op). In bf16 and fp16, also every x' of the dtype whose eager forward gives
    the same y and side (all 65536 counted once, `_half_groups`): x - round(tanh x) is 0 for
    all |x| < 0.09 in bf16, so y = 0 may mean f' anywhere in [0, 0.008]. Where f' jumps (a
    kink) the interval is cut: inverting y exactly lands on the kink, so an x whose
    interval reaches one may get f'(kink). Approximately floor = |f''| ulp(y) / |f'| where f is locally linear and
    sqrt(2 |f''| ulp(y)) at a minimum: GELU ~2e-2 at x_min in bf16, ~5e-5 in fp32 (the
    floors reports/inverse_floor.txt measures). An Inverted gradient passes if
        |g' - g f'(x)| <= |g| (2 floor(x) + 8 eps_c + m) + ulp(|g| (|f'| + floor))
    eps_c: fp32's or fp64's epsilon (what the computation runs in); m = 1e-8 in fp64
    (`_method`: the fp64 inverse's documented accuracy, and torch's fp64 Hardsigmoid uses
    an fp32 1/6), else 0; the last term rounds the result to its dtype.
  * Network gradients, exact mode. Both models run the same ops except f' at inverted
    sites, so their difference is what this network's rounding already does plus what the
    floor allows, as this network amplifies it; per gradient tensor
        max |g_opt - g_orig| <= C (noise + response + depth eps scale)
    noise = max |g_orig - g_fp64| (the original run in float64 on the same input: how much
    this network amplifies rounding); response = max |g_wobbled - g_orig|, where every
    inverted site runs torch's own backward with f' moved by its whole allowance (above)
    in a random direction per element (`wobbled`); scale = max |g_fp64|; depth = blocks
    + 1; eps the dtype's epsilon (bf16's under autocast); C = 8. Few-bit gradients are
    exact (bitwise), see above.
  * Compiled: against the eager original (or its few-bit twin, above), per tensor
        max |g_c - g_orig| <= C (noise + response + rounding + (delta + 16 depth eps) scale)
    response: that of the eager exact rewrite (the compiled graph inverts mostly the same
    sites); rounding: how far the eager original moves when every leaf module's output is
    off by one rounding, random signs (`_rounding_response`: Inductor rounds differently,
    and a LayerNorm of a constant row or a BatchNorm of a batch-constant column amplifies
    one ulp a thousandfold); delta: the 99th percentile of the floor on x in [-8, 8], for
    sites only the compiled graph inverts; 16 = COMPILED_SLACK (Inductor sums in another
    order). Outputs the same, without delta. Where this fails, plain Inductor on the same
    model is the control: if it raises too, the network is invalid (a torch.compile
    limit: Conv2d's backward on an empty batch); else its own deviation from eager is
    added to the bound.
"""
from __future__ import annotations

import argparse
import atexit
import collections
import contextlib
import copy
import dataclasses
import functools
import importlib.util
import math
import os
import random
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

import fewbit_fx
from fewbit_fx.activations import SUPPORTED, Activation
from fewbit_fx.nn import FewBit, Inverted, InvertedNorm

try:
    import transformers.activations  # noqa: F401
    HAVE_TRANSFORMERS = True
except Exception:  # noqa: BLE001 - optional: the formula activations are then not drawn
    HAVE_TRANSFORMERS = False

C = 8.0  # safety factor of the network-level bounds (module docstring)
COMPILED_SLACK = 16.0  # Inductor reorders sums: its rounding is not eager's (module docstring)
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16, "autocast": torch.float32}
MODES = ("exact", "auto", "fewbit", "auto->exact")

# Known open bugs, named; tests/test_fuzz.py has a strict-xfail reproducer of each. A
# check in a configuration an entry `applies` to whose every failure message contains the
# entry's `signature` counts as "excluded" (the known bug), not "failed"; any other failure
# there still fails. Remove an entry when its bug is fixed (its xfail then XPASSes).
@dataclass(frozen=True)
class KnownBug:
    name: str
    applies: object  # (net, mode) -> bool
    signature: str


KNOWN_OPEN: list[KnownBug] = []  # none open (the last, Hardsigmoid/Hardswish at a NaN gradient, fixed)


# --- activations: every way to write each registry entry ---------------------------------
def _params(name: str, rng: random.Random) -> dict:
    """torch arguments, boundary and negative ones included."""
    if name == "softplus":
        return {"beta": rng.choice([1.0, 2.0, 0.5, -1.0, -2.0, 3.7, -0.3]),
                "threshold": rng.choice([20.0, 1.0, 5.0, 0.5, 0.0, -1.0, 2.5])}
    if name == "elu":
        return {"alpha": rng.choice([1.0, 0.5, 2.0, 0.0, -0.5, 1.7])}
    if name == "celu":
        return {"alpha": rng.choice([1.0, 0.3, 2.5, -0.5, -1.0])}
    if name == "leaky_relu":
        return {"negative_slope": rng.choice([0.01, 0.2, 0.0, -0.3, 1.0, 1.5])}
    if name == "hardtanh":
        lo, hi = rng.choice([(-1.0, 1.0), (-0.7, 0.3), (0.0, 6.0), (-2.0, -1.0), (0.1, 0.2),
                             (-0.3, 0.3), (-3.3, 1e-3)])
        return {"min_val": lo, "max_val": hi}
    return {}


# Formulas as users write them (found by graph pattern, passes/formulas): a body on x,
# written as a class's whole forward (module form) and inline (call form).
_FORMULAS = {
    "swish": {"SwishFormula": "x * torch.sigmoid(x)", "HalfSwish": "x * torch.sigmoid(0.5 * x)"},
    "mish_formula": {"MishFormula": "x * torch.tanh(F.softplus(x))"},
    "gelu_tanh_pow_formula": {
        "GeluPow": "0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.044715 * torch.pow(x, 3.0))))"},
    "gelu_tanh_cube_formula": {
        "GeluCube": "0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))"},
    "gelu_tanh_fast_formula": {
        "GeluFast": "0.5 * x * (1.0 + torch.tanh(x * 0.7978845608028654 * (1.0 + 0.044715 * x * x)))"},
}
_FORMULA_BODIES = {cls: body for spellings in _FORMULAS.values() for cls, body in spellings.items()}


def forms(name: str, p: dict) -> dict[str, list[str]]:
    """Source for activation `name` with torch arguments `p`: constructors under "module"
    and "module_inplace", calls on {x} under "call" and "call_inplace"."""
    a = ", ".join(repr(v) for v in p.values())
    c = f", {a}" if a else ""
    hf = HAVE_TRANSFORMERS
    plain = {  # name: (torch.nn class, F function, has inplace=, HF single-op classes)
        "gelu": ("GELU", "gelu", False, ["GELUActivation()"]),
        "silu": ("SiLU", "silu", True, ["SiLUActivation()"]),
        "mish": ("Mish", "mish", True, ["MishActivation()"]),
        "softplus": ("Softplus", "softplus", False, []),
        "elu": ("ELU", "elu", True, []),
        "selu": ("SELU", "selu", True, []),
        "celu": ("CELU", "celu", True, []),
        "leaky_relu": ("LeakyReLU", "leaky_relu", True, []),
        "relu": ("ReLU", "relu", True, []),
        "relu6": ("ReLU6", "relu6", True, []),
        "hardtanh": ("Hardtanh", "hardtanh", True, []),
        "hardsigmoid": ("Hardsigmoid", "hardsigmoid", True, []),
        "hardswish": ("Hardswish", "hardswish", True, []),
        "logsigmoid": ("LogSigmoid", "logsigmoid", False, []),
        "softsign": ("Softsign", "softsign", False, []),
        "tanhshrink": ("Tanhshrink", "tanhshrink", False, []),
    }
    out = {"module": [], "module_inplace": [], "call": [], "call_inplace": []}
    if name in plain:
        cls, fn, inplace, hf_classes = plain[name]
        out["module"].append(f"nn.{cls}({a})")
        out["call"].append(f"F.{fn}({{x}}{c})")
        if inplace:
            out["module_inplace"].append(f"nn.{cls}({a}{', ' if a else ''}inplace=True)")
            out["call_inplace"].append(f"F.{fn}({{x}}{c}, inplace=True)")
        if hf:
            out["module"] += [f"hf.{k}" for k in hf_classes]
    extra = {
        "gelu_tanh": dict(module=["nn.GELU(approximate='tanh')"] + (["hf.GELUTanh()"] if hf else []),
                          call=["F.gelu({x}, approximate='tanh')"]),
        "sigmoid": dict(module=["nn.Sigmoid()"], call=["torch.sigmoid({x})", "{x}.sigmoid()"],
                        call_inplace=["torch.sigmoid_({x})", "{x}.sigmoid_()"]),
        "tanh": dict(module=["nn.Tanh()"], call=["torch.tanh({x})", "{x}.tanh()"],
                     call_inplace=["torch.tanh_({x})", "{x}.tanh_()"]),
        "selu": dict(call=["torch.selu({x})"]),
        "elu": dict(call_inplace=[f"F.elu_({{x}}{c})"]),
        "relu": dict(call=["torch.relu({x})", "{x}.relu()"],
                     call_inplace=["F.relu_({x})", "torch.relu_({x})", "{x}.relu_()"]),
        "softplus": dict(call=[f"F.softplus({{x}}, beta={p.get('beta')!r}, threshold={p.get('threshold')!r})"]),
        "gelu_tanh_formula": dict(module=["hf.NewGELUActivation()"] if hf else []),
        "gelu_fast_formula": dict(module=["hf.FastGELUActivation()"] if hf else []),
        "gelu_erf_formula": dict(module=["hf.GELUActivation(use_gelu_python=True)"] if hf else []),
        "quick_gelu": dict(module=["hf.QuickGELUActivation()"] if hf else []),
    }
    for k, v in extra.get(name, {}).items():
        out[k] += v
    for cls, body in _FORMULAS.get(name, {}).items():
        out["module"].append(f"{cls}()")
        out["call"].append(body.replace("x", "{x}"))
    if name == "leaky_relu" and p["negative_slope"] < 0:
        out["module_inplace"], out["call_inplace"] = [], []  # torch refuses their backward
    return out


def drawable() -> list[str]:
    """Registry names the generator can write (all of them, less the Hugging Face ones
    without transformers)."""
    return [n for n in SUPPORTED if any(forms(n, _params(n, random.Random(0))).values())]


# --- the network description ---------------------------------------------------------------
@dataclass
class Block:
    pre: str                   # producer of z: proj, proj_frozen, none, layernorm, batchnorm
    act: str                   # registry name
    params: dict
    form: str                  # module, module_inplace, call, call_inplace, shared
    code: str                  # constructor (module forms) or call template on {x}
    shares: int | None = None  # form "shared": the block whose module is called again
    mutate: str | None = None  # in-place op on the output a, before its consumers
    mutate_after: str | None = None  # ... after them
    consumers: list[str] = field(default_factory=list)
    graph_break: bool = False  # torch._dynamo.graph_break() right after the activation
    scale: float = 1.0         # z = pre(h) * scale: spreads inputs over the function's range


@dataclass
class Net:
    seed: int
    kind: str                  # sequential | functional
    layout: str                # dense | conv
    dims: tuple                # dense (T or 0, F); conv (C, H, W)
    batch: int
    batch2: int                # the second input shape's batch (compiled, dynamic=True)
    dtype: str                 # a DTYPES key
    autocast_at_optimize: bool  # autocast: optimize() also under autocast
    train: bool
    input_layout: str          # contiguous, transposed, sliced, channels_last
    input_grad: bool
    input_scale: float
    nonfinite: bool
    blocks: list[Block]
    return_act: int | None = None  # also return this block's activation output

    @property
    def width(self) -> int:    # size of the last axis
        return self.dims[-1]

    @property
    def depth(self) -> int:
        return len(self.blocks) + 1

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.dtype == "autocast" else self.torch_dtype

    def label(self) -> str:
        return f"seed {self.seed}: {self.kind} {self.layout} {self.dtype}"


_MUTATIONS = {
    "mul_": "{a}.mul_(1.5)", "add_": "{a}.add_(0.25)", "iadd": "{a} += 1.0",
    "clamp_": "torch.clamp_({a}, -1.0, 1.0)", "clamp_min_": "{a}.clamp_(min=-0.5)",
    "leaky_relu_": "F.leaky_relu_({a}, 0.1)", "threshold_": "F.threshold_({a}, 0.1, 0.0)",
    "hardtanh_": "F.hardtanh_({a})", "setitem": "{a}[..., 0] = 0.0",
    "setitem_batch": "{a}[:1] = 1.0", "masked_fill_": "{a}.masked_fill_({a} > 0.5, 0.5)",
    "copy_": "{a}[..., :1].copy_({a}[..., -1:])", "zero_": "{a}[..., -1:].zero_()",
}
_FUNCTIONAL_CONSUMERS = ["proj", "proj_frozen", "matmul", "mul_z", "mul_const", "mul_param",
                         "mul_self", "residual", "layernorm", "batchnorm", "dropout", "view",
                         "transpose", "slice", "sum", "softmax"]
_SEQUENTIAL_CONSUMERS = ["proj", "proj_frozen", "layernorm", "batchnorm", "dropout"]


def generate(seed: int) -> Net:
    """A random network, a pure function of the seed."""
    r = random.Random(seed)
    kind = r.choices(["functional", "sequential"], [0.7, 0.3])[0]
    layout = r.choices(["dense", "conv"], [0.65, 0.35])[0]
    dims = ((r.choice([0, 0, 1, 3]), r.choice([1, 3, 5, 8, 13])) if layout == "dense"
            else (r.choice([1, 3, 4]), r.choice([1, 3, 5]), r.choice([1, 2, 5])))
    batch = r.choices([0, 1, 2, 3, 5, 8], [1, 2, 2, 3, 2, 1])[0]
    dtype = r.choices(list(DTYPES), [0.4, 0.15, 0.2, 0.15, 0.1])[0]
    layouts = ["contiguous", "transposed", "sliced"] + (["channels_last"] if layout == "conv" else [])
    net = Net(seed=seed, kind=kind, layout=layout, dims=dims, batch=batch,
              batch2=r.choice([b for b in (2, 3, 6) if b != batch]), dtype=dtype,
              autocast_at_optimize=r.random() < 0.5, train=r.random() < 0.8,
              input_layout=r.choices(layouts, [0.5, 0.25, 0.1, 0.15][:len(layouts)])[0],
              input_grad=r.random() < 0.7, input_scale=r.choice([1.0, 1.0, 3.0]),
              nonfinite=r.random() < 0.05, blocks=[])
    names = drawable()
    for i in range(r.choice([1, 2, 2, 3, 4])):
        net.blocks.append(_block(r, net, i, names))
    if kind == "functional" and r.random() < 0.15:
        net.return_act = r.randrange(len(net.blocks))
    return net


def _block(r: random.Random, net: Net, i: int, names: list[str]) -> Block:
    functional = net.kind == "functional"
    pres = ["proj", "proj_frozen", "none", "layernorm"] + (["batchnorm"] if _bn_ok(net) else [])
    pre = r.choices(pres, [4, 2, 2, 1, 1][:len(pres)])[0]
    owners = [j for j, b in enumerate(net.blocks) if b.form in ("module", "module_inplace")]
    if owners and r.random() < 0.2:  # call an earlier block's module again: one module, two sites
        j = r.choice(owners)
        b = net.blocks[j]
        act, params, form, code, shares = b.act, b.params, "shared", b.code, j
    else:
        act = r.choice(names)
        params = _params(act, r)
        fs = forms(act, params)
        kinds = [k for k in (["module", "module_inplace"] + (["call", "call_inplace"] if functional else []))
                 if fs[k]]
        if pre == "none" and i == 0:  # in place on the leaf input: torch refuses, a wasted draw
            kinds = [k for k in kinds if not k.endswith("inplace")] or kinds
        weight = {"module": 3, "module_inplace": 1, "call": 3, "call_inplace": 1}
        form = r.choices(kinds, [weight[k] for k in kinds])[0]
        code, shares = r.choice(fs[form]), None
    consumers = _SEQUENTIAL_CONSUMERS if not functional else _FUNCTIONAL_CONSUMERS
    consumers = [c for c in consumers if c != "batchnorm" or _bn_ok(net)]
    n = r.choices([0, 1, 2], [0.1, 0.6, 0.3])[0] if functional else r.choices([0, 1], [0.3, 0.7])[0]
    return Block(pre=pre, act=act, params=params, form=form, code=code, shares=shares,
                 mutate=r.choice(list(_MUTATIONS)) if functional and r.random() < 0.15 else None,
                 mutate_after=r.choice(list(_MUTATIONS)) if functional and r.random() < 0.05 else None,
                 consumers=[r.choice(consumers) for _ in range(n)],
                 graph_break=functional and r.random() < 0.08,
                 scale=r.choice([1.0, 1.0, 3.0]) if functional else 1.0)


def _bn_ok(net: Net) -> bool:
    """BatchNorm in training needs more than one value per channel; dense only without T."""
    if net.layout == "dense" and net.dims[0]:
        return False
    return net.batch >= 2 or not net.train


# --- source generation ---------------------------------------------------------------------
def _dropout_p(net: Net) -> float:
    return 0.3 if net.seed % 2 else 0.0


def _layer(net: Net, what: str) -> str:
    """Constructor of a producer/consumer module."""
    d = net.width
    if what in ("proj", "proj_frozen"):
        m = (f"nn.Linear({d}, {d})" if net.layout == "dense"
             else f"nn.Conv2d({net.dims[0]}, {net.dims[0]}, 3, padding=1)")
        return m + (".requires_grad_(False)" if what == "proj_frozen" else "")
    if what == "layernorm":
        return f"nn.LayerNorm({d})"
    if what == "batchnorm":
        return f"nn.BatchNorm1d({d})" if net.layout == "dense" else f"nn.BatchNorm2d({net.dims[0]})"
    if what == "dropout":
        return f"nn.Dropout({_dropout_p(net)})"
    raise ValueError(what)


def source(net: Net) -> str:
    """The network as Python source: the reproducer a failure report shows."""
    head = ["import torch", "import torch.nn as nn", "import torch.nn.functional as F"]
    if HAVE_TRANSFORMERS and any("hf." in b.code for b in net.blocks):
        head.append("import transformers.activations as hf")
    body = _sequential(net) if net.kind == "sequential" else _functional(net)
    for cls, formula in _FORMULA_BODIES.items():
        if any(f"{cls}()" in b.code for b in net.blocks):
            body = (f"class {cls}(nn.Module):\n    def forward(self, x):\n        return {formula}\n\n\n"
                    + body)
    return "\n".join(head) + "\n\n\n" + body + "\n"


def _sequential(net: Net) -> str:
    lines, items = ["def build():"], []
    for i, b in enumerate(net.blocks):
        if b.pre != "none":
            items.append(_layer(net, b.pre))
        if b.form == "shared":
            items.append(f"act{b.shares}")
        else:
            lines.append(f"    act{i} = {b.code}")
            items.append(f"act{i}")
        items += [_layer(net, c) for c in b.consumers]
    lines.append("    return nn.Sequential(\n" + "".join(f"        {it},\n" for it in items) + "    )")
    return "\n".join(lines)


def _functional(net: Net) -> str:
    init = ["class Net(nn.Module):", "    def __init__(self):", "        super().__init__()"]
    fwd = ["    def forward(self, x):"]
    d, h = net.width, "x"
    for i, b in enumerate(net.blocks):
        if b.pre != "none":
            init.append(f"        self.pre{i} = {_layer(net, b.pre)}")
            z = f"self.pre{i}({h})"
        else:
            z = h
        fwd.append(f"        z{i} = {z}" + (f" * {b.scale!r}" if b.scale != 1.0 else ""))
        if b.form == "shared":
            fwd.append(f"        a{i} = self.act{b.shares}(z{i})")
        elif b.form.startswith("module"):
            init.append(f"        self.act{i} = {b.code}")
            fwd.append(f"        a{i} = self.act{i}(z{i})")
        else:
            fwd.append(f"        a{i} = {b.code.format(x=f'z{i}')}")
        if b.graph_break:
            fwd.append("        torch._dynamo.graph_break()")
        if b.mutate:
            fwd.append("        " + _MUTATIONS[b.mutate].format(a=f"a{i}"))
        terms = []
        for j, c in enumerate(b.consumers):
            name, a = f"self.c{i}_{j}", f"a{i}"
            if c in ("proj", "proj_frozen", "layernorm", "batchnorm", "dropout"):
                init.append(f"        {name} = {_layer(net, c)}")
                terms.append(f"{name}({a})")
            elif c == "matmul":
                init.append(f"        {name} = nn.Parameter(torch.randn({d}, {d}) / {d ** 0.5:.4f})")
                terms.append(f"{a} @ {name}")
            elif c == "mul_param":
                init.append(f"        {name} = nn.Parameter(torch.randn({d}))")
                terms.append(f"{a} * {name}")
            else:
                terms.append({
                    "mul_z": f"{a} * z{i}", "mul_const": f"{a} * 0.5", "mul_self": f"{a} * {a}",
                    "residual": f"{a} + z{i}", "view": f"{a}.reshape(-1).view({a}.shape)",
                    "transpose": f"({a}.transpose(-1, -2) * 2.0).transpose(-1, -2)",
                    "slice": f"torch.cat([{a}[..., :{d // 2}] * 2.0, {a}[..., {d // 2}:]], dim=-1)",
                    "sum": f"{a}.sum(-1, keepdim=True).expand_as({a})",
                    "softmax": f"torch.softmax({a}, -1)",
                }[c])
        fwd.append(f"        h{i} = " + (" + ".join(terms) if terms else f"a{i}"))
        if b.mutate_after:
            fwd.append("        " + _MUTATIONS[b.mutate_after].format(a=f"a{i}"))
        h = f"h{i}"
    fwd.append(f"        return {h}" + (f", a{net.return_act}" if net.return_act is not None else ""))
    if len(init) == 3:
        init.append("        pass")
    return "\n".join(init + [""] + fwd) + "\n\n\ndef build():\n    return Net()"


_TMP = tempfile.mkdtemp(prefix="fewbit_fuzz_")
atexit.register(shutil.rmtree, _TMP, True)


def build(net: Net) -> nn.Module:
    """The network, imported from its source file (functional sites are rewritten from
    source, so the source must be a real file), with parameters from the seed."""
    text = source(net)
    key = f"fuzz_net_{net.seed}_{abs(hash(text)) % 10**8}"
    path = os.path.join(_TMP, key + ".py")
    if not os.path.exists(path):
        with open(path, "w") as f:
            f.write(text)
    mod = sys.modules.get(key)
    if mod is None:
        spec = importlib.util.spec_from_file_location(key, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        spec.loader.exec_module(mod)
    with torch.random.fork_rng():
        torch.manual_seed(net.seed)
        model = mod.build()
    dt = net.torch_dtype
    return model.to(dt).train(net.train)


def make_input(net: Net, which: int = 0) -> tuple[Tensor, callable]:
    """(leaf base tensor, view) for input shape `which` (0, or 1 for the second shape); the
    model's input is view(base), non-contiguous as the layout says."""
    b = net.batch if which == 0 else net.batch2
    shape = ((b, net.dims[0], net.dims[1]) if net.dims[0] else (b, net.dims[1])) if net.layout == "dense" \
        else (b, *net.dims)
    g = torch.Generator().manual_seed(net.seed * 7 + which)
    lay = net.input_layout
    base_shape = list(shape)
    if lay == "transposed":
        base_shape[-1], base_shape[-2] = base_shape[-2], base_shape[-1]
    elif lay == "sliced":
        base_shape[-1] *= 2
    base = torch.randn(base_shape, generator=g) * net.input_scale
    if net.nonfinite and base.numel() >= 3:
        idx = torch.randperm(base.numel(), generator=g)[:3]
        base.view(-1)[idx] = torch.tensor([math.nan, math.inf, -math.inf])
    base = base.to(net.torch_dtype)
    if lay == "channels_last":
        base = base.contiguous(memory_format=torch.channels_last)

    def view(t: Tensor) -> Tensor:
        if lay == "transposed":
            return t.transpose(-1, -2)
        if lay == "sliced":
            return t[..., ::2]
        return t

    return base.requires_grad_(net.input_grad), view


# --- running and comparing -----------------------------------------------------------------
@dataclass
class Result:
    outputs: list[Tensor] = field(default_factory=list)
    grads: dict[str, Tensor | None] = field(default_factory=dict)
    buffers: dict[str, Tensor] = field(default_factory=dict)
    error: str | None = None   # "forward: ..." or "backward: ..."


def _autocast(net: Net, on: bool = True):
    if net.dtype == "autocast" and on:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _outputs(out) -> list[Tensor]:
    return [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(o, Tensor)]


def run(model: nn.Module, net: Net, base: Tensor, view, dtype: torch.dtype | None = None,
        autocast: bool = True, buffer_names=None) -> Result:
    """One training step's forward and backward, RNG reseeded (dropout repeats); the loss
    weights each output by fixed random numbers (no gradient is trivially constant)."""
    res = Result()
    for p in model.parameters():
        p.grad = None
    leaf = base.detach().clone()
    if dtype is not None:
        leaf = leaf.to(dtype)
    if base.is_contiguous(memory_format=torch.channels_last) and leaf.dim() == 4:
        leaf = leaf.contiguous(memory_format=torch.channels_last)
    leaf.requires_grad_(base.requires_grad)
    with torch.random.fork_rng():
        torch.manual_seed(1000 + net.seed)
        try:
            with _autocast(net, autocast):
                outs = _outputs(model(view(leaf)))
        except Exception as e:  # noqa: BLE001 - reported, not raised
            res.error = f"forward: {type(e).__name__}: {e}"
            return res
    res.outputs = [o.detach().clone() for o in outs]
    bufs = {_name(n): b for n, b in model.named_buffers()}
    names = buffer_names if buffer_names is not None else list(bufs)
    res.buffers = {n: bufs[n].detach().clone() for n in names if n in bufs}
    g = torch.Generator().manual_seed(net.seed + 99)
    loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64)).sum()
               for o in outs if o.is_floating_point() and o.requires_grad)
    if isinstance(loss, Tensor):
        try:
            loss.backward()
        except Exception as e:  # noqa: BLE001
            res.error = f"backward: {type(e).__name__}: {e}"
            return res
    res.grads = {_name(n): (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}
    if leaf.requires_grad:
        res.grads["<input>"] = leaf.grad.clone() if leaf.grad is not None else None
    return res


def _name(n: str) -> str:
    return n.removeprefix("_orig_mod.")  # torch.compile's wrapper prefixes its module's names


def _no_grad_outputs(model: nn.Module, net: Net, base: Tensor, view) -> list[Tensor] | str:
    """The forward under torch.no_grad (RNG reseeded as in `run`), or the error it raised."""
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(1000 + net.seed)
        try:
            with _autocast(net):
                return [o.clone() for o in _outputs(model(view(base.detach().clone())))]
        except Exception as e:  # noqa: BLE001
            return f"{type(e).__name__}: {e}"


def same(a: Tensor, b: Tensor) -> bool:
    """Bitwise equal values (NaN where the other has NaN; -0.0 == 0.0)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def _max(t: Tensor) -> float:
    return float(t.max()) if t.numel() else 0.0


def _close_failures(what: str, got: dict, ref: dict, ref64: dict, eps: float, depth: int,
                    delta: float = 0.0, slack: float = 1.0, sens: dict | None = None,
                    nan_only: bool = False) -> list[str]:
    """Network-level bound of the module docstring, per tensor; and the same non-finite
    pattern (NaN where the reference has NaN, the same infinities). `sens`: per tensor,
    extra room (`floor_response`, ...). `nan_only`: only NaN where the reference has NaN."""
    out = []
    for name, r in ref.items():
        o = got.get(name)
        if (r is None) != (o is None):
            out.append(f"{what} {name}: {'no gradient' if o is None else 'a gradient'} where the original has "
                       f"{'one' if o is None else 'none'}")
            continue
        if r is None:
            continue
        if o.shape != r.shape or o.dtype != r.dtype:
            out.append(f"{what} {name}: {o.dtype}{tuple(o.shape)} vs original {r.dtype}{tuple(r.shape)}")
            continue
        fin = torch.isfinite(r)
        if nan_only:  # NaN inputs: torch's loops disagree at NaN (see check_inverted_site)
            if (r.isnan() & ~o.isnan()).any():
                i = int((r.isnan() & ~o.isnan()).reshape(-1).nonzero()[0])
                out.append(f"{what} {name}: finite {float(o.reshape(-1)[i])} at [{i}] where the original has NaN")
            continue
        if not torch.equal(fin, torch.isfinite(o)) or not torch.equal(r.isnan(), o.isnan()):
            differs = (fin != torch.isfinite(o)) | (r.isnan() != o.isnan())
            i = int(differs.reshape(-1).nonzero()[0])
            out.append(f"{what} {name}: non-finite pattern differs, e.g. [{i}] {float(o.reshape(-1)[i])} vs "
                       f"original {float(r.reshape(-1)[i])}")
            continue
        t = ref64.get(name)
        t = t.to(torch.float64) if t is not None else r.double()
        both = fin & torch.isfinite(t)
        rd, od = r.double(), o.double()
        diff = _max((od - rd).abs()[fin])
        noise = _max((rd - t).abs()[both])
        scale = _max(t.abs()[both])
        moved = (sens or {}).get(name, 0.0)
        tol = C * (noise + moved + (delta + slack * depth * eps) * scale) + 1e-30
        if diff > tol:
            i = int(((od - rd).abs() * fin).reshape(-1).argmax())
            out.append(f"{what} {name}: max |diff| {diff:.3g} > bound {tol:.3g} (noise {noise:.2g}, floor "
                       f"response {moved:.2g}, scale {scale:.2g}, floor {delta:.2g}); e.g. [{i}] "
                       f"{float(o.reshape(-1)[i]):.6g} vs original {float(r.reshape(-1)[i]):.6g}")
    return out


# --- few-bit reference: g * levels[code] ---------------------------------------------------
class _ReferenceFewBit(torch.autograd.Function):
    """FewBit's backward as documented: grad * levels[bucketize(x, borders)] in at least
    fp32 (the module's own float32 borders and levels), NaN where torch's derivative is NaN
    (and at x = NaN unless the activation's derivative is never NaN)."""

    @staticmethod
    def forward(ctx, x, act: Activation, borders, levels, inplace: bool):
        dt = torch.promote_types(x.dtype, torch.float32)
        codes = torch.bucketize(x.to(dt).contiguous(), borders.to(dt))
        nan = act.derivative(x).isnan()
        if act.spec.nan_derivative != "never":
            nan |= x.isnan()
        ctx.save_for_backward(codes, levels, nan)
        if not inplace:
            return act.forward(x)
        ctx.mark_dirty(x)  # in place (inplace=True modules): y in x's storage, as the module
        return x.copy_(act.forward(x))

    @staticmethod
    def backward(ctx, g):
        codes, levels, nan = ctx.saved_tensors
        dt = torch.promote_types(g.dtype, torch.float32)
        out = (g.to(dt) * levels.to(dt)[codes]).to(g.dtype)
        return out.masked_fill(nan, math.nan), None, None, None, None


def _reference_fewbit_forward(self: FewBit, x: Tensor) -> Tensor:
    if not (torch.is_grad_enabled() and x.requires_grad):
        return self.activation.forward_(x) if self.inplace else self.activation.forward(x)
    return _ReferenceFewBit.apply(x, self.activation, self.borders, self.levels, self.inplace)


@contextlib.contextmanager
def reference_fewbit():
    """Every FewBit module (module sites and functional sites' children) runs
    _ReferenceFewBit while this is active."""
    saved = FewBit.forward
    FewBit.forward = _reference_fewbit_forward
    try:
        yield
    finally:
        FewBit.forward = saved


# --- the inverted floor --------------------------------------------------------------------
def _ulp(t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Spacing of `dtype` (t's own by default) at |t|, in float64 (the width of a rounding
    interval there)."""
    fi = torch.finfo(dtype or t.dtype)
    a = t.detach().double().abs().clamp_min(fi.smallest_normal)
    ulp = torch.exp2(torch.floor(torch.log2(a))) * fi.eps
    return ulp.nan_to_num(nan=0.0, posinf=0.0)


def _derivative(act: Activation, x: Tensor) -> tuple[Tensor, Tensor]:
    """f(x) and f'(x) in float64 (autograd of torch's own op: exact at this precision)."""
    with torch.enable_grad():
        x64 = x.detach().double().requires_grad_(True)
        y = act.forward(x64)
        (d,) = torch.autograd.grad(y.sum(), x64)
    return y.detach(), d


@functools.lru_cache(maxsize=None)
def _half_groups(act: Activation, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """For a 16-bit dtype, every finite x of it grouped by (y = the eager forward's output,
    side bit): (sorted group keys, min f', max f') over each group, f' in float64. Forwards
    that round more than once (x - round(tanh x); the Hugging Face formulas) give one y to
    x far apart; only a count of all 65536 values says how far."""
    xs = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    xs = xs[torch.isfinite(xs)]
    with torch.no_grad():
        ys = act.forward(xs)
    _, d = _derivative(act, xs)
    keys, inverse = torch.unique(_group_key(act, xs, ys), return_inverse=True)
    lo = torch.full(keys.shape, math.inf, dtype=torch.float64).scatter_reduce(0, inverse, d, "amin")
    hi = torch.full(keys.shape, -math.inf, dtype=torch.float64).scatter_reduce(0, inverse, d, "amax")
    return keys, lo, hi


def _group_key(act: Activation, x: Tensor, y: Tensor) -> Tensor:
    bits = (y.float() + 0.0).view(torch.int32).to(torch.int64)  # + 0.0: -0.0 and 0.0 are one y
    return bits * 2 + side(act, x).to(torch.int64)


def _group_floor(act: Activation, x: Tensor, y: Tensor, d: Tensor) -> Tensor:
    """max |f'(x') - f'(x)| over the x' of x's 16-bit dtype with the same y and side (0 for
    other dtypes, and for a y the count never met: torch's scalar and vectorised loops can
    round one x differently)."""
    if x.dtype not in (torch.float16, torch.bfloat16):
        return torch.zeros_like(d)
    keys, lo, hi = _half_groups(act, x.dtype)
    k = _group_key(act, x, y)
    i = torch.searchsorted(keys, k).clamp_max(keys.numel() - 1)
    found = keys[i] == k
    return torch.where(found, torch.maximum(hi[i] - d, d - lo[i]), 0.0).nan_to_num(nan=0.0)


def side(act: Activation, x: Tensor) -> Tensor:
    """The one bit Inverted may keep besides y (README: non-monotone functions, Softplus's
    jump, a Hardtanh bound the dtype rounds inward), as torch's own tests define it."""
    p, x = act.p, x.double()
    if not act.monotone:
        return x > act.x_min
    if act.name == "softplus":
        return x * p["beta"] > p["threshold"]
    if act.name in ("hardtanh", "relu6"):
        lo, hi = (p["min_val"], p["max_val"]) if act.name == "hardtanh" else (0.0, 6.0)
        return (x > lo) & (x < hi)
    return torch.zeros_like(x, dtype=torch.bool)


def inverted_floor(act: Activation, x: Tensor, y: Tensor) -> Tensor:
    """floor(x), float64, per (finite) element: the largest |f'(x') - f'(x)| over the x' that
    give the same y and side bit (module docstring): the real x' around x (on each side f is
    monotone, so they form an interval: its ends by bisection, up to 1e4 max(1, |x|) away,
    f' on 65 points of it), and in 16-bit dtypes every x' of the dtype (`_group_floor`)."""
    x64, y64 = x.detach().double(), y.detach().double()
    with torch.no_grad():
        f = act.forward(x64)
    tol = torch.maximum(_ulp(y) / 2, (y64 - f).abs().nan_to_num(nan=0.0, posinf=0.0))
    s = side(act, x64)

    def same_y(t: Tensor) -> Tensor:
        with torch.no_grad():
            return ((act.forward(t) - y64).abs() <= tol) & (side(act, t) == s)

    ends = []
    for direction in (-1.0, 1.0):
        inside, outside = x64.clone(), x64 + direction * 1e4 * x64.abs().clamp_min(1.0)
        for _ in range(100):
            mid = (inside + outside) / 2
            ok = same_y(mid)
            inside, outside = torch.where(ok, mid, inside), torch.where(ok, outside, mid)
        ends.append(inside)
    a, b = ends
    # Across a kink f' jumps. Inverting y exactly gives the kink itself for an x whose
    # interval reaches it, so such an x may get f'(kink) (torch's convention there) and
    # nothing from the far side: cut the interval at the kink.
    _, d = _derivative(act, x64)
    jumps = []
    for k in act.kinks:
        if not math.isfinite(k):
            continue
        reaches = (a <= k) & (k <= b)
        _, dk = _derivative(act, torch.full_like(x64, k))
        jumps.append(torch.where(reaches, (dk - d).abs(), 0.0))
        left = x64 < k
        a = torch.where(left, a, torch.maximum(a, torch.full_like(a, k)))
        b = torch.where(left, torch.minimum(b, torch.full_like(b, k)), b)
    grid = a[:, None] + (b - a).clamp_min(0)[:, None] * torch.linspace(0, 1, 65, dtype=torch.float64)
    grid = torch.minimum(grid, b[:, None])  # a + (b - a) can round past b, across a kink
    _, dg = _derivative(act, grid)
    floor = (dg - d[:, None]).abs().nan_to_num(nan=0.0).amax(dim=1)
    for j in jumps:
        floor = torch.maximum(floor, j.nan_to_num(nan=0.0))
    return torch.maximum(floor, _group_floor(act, x, y, d))


def check_inverted_site(module: Inverted, x: Tensor, seed: int) -> list[str]:
    """Elementwise bound of an Inverted module on the inputs it saw (module docstring)."""
    act = module.activation
    xr = x.detach().clone().requires_grad_(True)
    y = module(xr * 1)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(x.dtype)
    (ours,) = torch.autograd.grad(y, xr, g)
    xt = x.detach().clone().requires_grad_(True)
    (torch_grad,) = torch.autograd.grad(act.forward(xt), xt, g)
    fails = []
    if not same(y.detach(), act.forward(x)):
        fails.append(f"site {act} {x.dtype}: forward differs from the activation")
    fin = torch.isfinite(x)
    # x = NaN/inf: torch's answer; at NaN either of its loops' (they differ for ELU, SELU,
    # CELU, Hardswish, ReLU6, Hardtanh: 1 or NaN, 1 or 0)
    ok = (ours == torch_grad) | (ours.isnan() & torch_grad.isnan())
    for v in _torch_at_nan(act, x.dtype):
        alt = (g.double() * v).to(x.dtype)
        ok |= x.isnan() & ((ours == alt) | (ours.isnan() & alt.isnan()))
    bad = ~fin & ~ok
    if bad.any():
        i = int(bad.reshape(-1).nonzero()[0])
        fails.append(f"site {act} {x.dtype}: at x = {float(x.reshape(-1)[i])} gradient "
                     f"{float(ours.reshape(-1)[i])}, torch gives {float(torch_grad.reshape(-1)[i])}")
    # a NaN upstream gradient: NaN exactly where torch's backward gives NaN (its kernels
    # select 0 where f is flat, rather than multiply)
    nan_g = torch.full_like(g, math.nan)
    (ours_nan,) = torch.autograd.grad(module(xr * 1), xr, nan_g)
    (torch_nan,) = torch.autograd.grad(act.forward(xt), xt, nan_g)
    bad = fin & (ours_nan.isnan() != torch_nan.isnan())
    if bad.any():
        i = int(bad.reshape(-1).nonzero()[0])
        fails.append(f"site {act} {x.dtype}: upstream gradient NaN at x = {float(x.reshape(-1)[i])!r}: "
                     f"{float(ours_nan.reshape(-1)[i])}, torch gives {float(torch_nan.reshape(-1)[i])}")
    if not fin.any():
        return fails
    xf, yf, gf, of = (t.detach().reshape(-1)[fin.reshape(-1)] for t in (x, y, g, ours))
    allowed = allowance(act, xf, yf)
    _, d1 = _derivative(act, xf)
    truth = gf.double() * d1
    rounding = _ulp((gf.double().abs() * (d1.abs() + allowed)).to(x.dtype))
    bound = gf.double().abs() * allowed + rounding + 1e-300
    err = (of.double() - truth).abs()
    over = ~(err <= bound)
    if over.any():
        i = int((err / bound).nan_to_num(nan=math.inf).argmax())
        fails.append(f"site {act} {x.dtype}: {int(over.sum())} of {over.numel()} elements past the floor; "
                     f"worst x = {float(xf[i])!r}, y = {float(yf[i])!r}: g*f' = {float(of[i]):.6g}, "
                     f"exact {float(truth[i]):.6g}, bound {float(bound[i]):.3g}")
    return fails


@functools.lru_cache(maxsize=None)
def _torch_at_nan(act: Activation, dtype: torch.dtype) -> tuple[float, ...]:
    """torch's f' at x = NaN from its scalar loop (1 element) and its vectorised one."""
    out = []
    for n in (1, 64):
        x = torch.full((n,), math.nan, dtype=dtype, requires_grad=True)
        act.forward(x).backward(torch.ones_like(x))
        out.append(float(x.grad[0]))
    return tuple(out)


def _method(act: Activation, dtype: torch.dtype) -> float:
    """float64's allowance on top of the floor, 1e-8 (tests/test_inverse.py's own bound):
    the numerical inverses read x from a table accurate to ~5e-10 and refine it by Newton
    only where |f'| > 1e-3 (fewbit_fx.inverse), and torch's own float64 hardsigmoid and
    hardswish backward use float32 constants (1/6 off by 5e-9), so neither reaches float64's
    floor, and they need not agree to it."""
    return 1e-8 if dtype == torch.float64 else 0.0


def allowance(act: Activation, x: Tensor, y: Tensor) -> Tensor:
    """Per element, the f' error an Inverted site may make, relative to |g| (finite x;
    module docstring): 2 floor + 8 eps_c + m."""
    eps_c = torch.finfo(torch.promote_types(x.dtype, torch.float32)).eps
    return 2 * inverted_floor(act, x, y) + 8 * eps_c + _method(act, x.dtype)


class _Wobble(torch.autograd.Function):
    """An inverted site as torch computes it, but with f' moved by its whole allowance, in a
    random direction per element: how much this network's gradients move for errors the
    floor allows (f' errors in a tanhshrink right before a LayerNorm of width 1 are
    amplified a hundredfold)."""

    @staticmethod
    def forward(ctx, x, act: Activation, seed: int):
        ctx.save_for_backward(x)
        ctx.act, ctx.seed = act, seed
        return act.forward(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            (exact,) = torch.autograd.grad(ctx.act.forward(xr), xr, g)
        fin = torch.isfinite(x).reshape(-1)
        move = torch.zeros(x.numel(), dtype=torch.float64)
        if fin.any():
            xf = x.detach().reshape(-1)[fin]
            gen = torch.Generator().manual_seed(ctx.seed)
            sign = torch.randint(0, 2, (int(fin.sum()),), generator=gen) * 2 - 1
            move[fin] = allowance(ctx.act, xf, ctx.act.forward(xf)) * sign
        out = exact.double() + g.double() * move.view(x.shape)
        return out.to(g.dtype), None, None


def floor_response(model: nn.Module, net: Net, base: Tensor, view, ref: Result,
                   start: dict[str, Tensor]) -> dict[str, float]:
    """Per gradient tensor, max |g_wobbled - g_orig|: how far this network's gradients move
    when every inverted site of `model` errs by its whole allowance (module docstring)."""
    _restore(model, start)
    with wobbled(net.seed):
        wobble = run(model, net, base, view)
    out = {}
    for name, r in ref.grads.items():
        w = wobble.grads.get(name)
        if r is not None and w is not None and not wobble.error:
            ok = torch.isfinite(r) & torch.isfinite(w)
            out[name] = _max((w.double() - r.double()).abs()[ok])
    return out


@contextlib.contextmanager
def wobbled(seed: int):
    """Every Inverted module runs _Wobble while this is active."""
    saved = Inverted.forward

    def forward(self, x):
        if not (torch.is_grad_enabled() and x.requires_grad):
            return self.activation.forward(x)
        return _Wobble.apply(x, self.activation, seed + id(self) % 1000)

    Inverted.forward = forward
    try:
        yield
    finally:
        Inverted.forward = saved


# --- the checks ----------------------------------------------------------------------------
@dataclass
class Outcome:
    net: Net
    mode: str                  # a MODES entry, or "compiled:<mode>"
    status: str                # ok, invalid, failed, excluded
    failures: list[str] = field(default_factory=list)
    check: str = ""            # the first failing check's name (minimisation keeps it)


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict(keep_vars=True).items()}


def _restore(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Put parameters and buffers back (BatchNorm statistics move in every training run)."""
    with torch.no_grad():
        for n, t in model.state_dict(keep_vars=True).items():
            if n in state:
                t.copy_(state[n])


def _inverted_activation(m: nn.Module) -> bool:
    """Inverted activations get the elementwise check; inverted norms (InvertedNorm) are
    checked at network level only (tests/ops/test_norm_op.py checks them against their floor)."""
    return isinstance(m, Inverted) and not isinstance(m, InvertedNorm)


def _rewritten(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (FewBit, Inverted))]


def check_eager(net: Net, mode: str) -> Outcome:
    """optimize() in one mode, checked against the original (module docstring)."""
    r = random.Random(f"{net.seed}:{mode}")
    bits, tables = r.choice([1, 2, 3, 3, 4]), r.choice(["fitted", "normal"])
    norms = random.Random(f"{net.seed}:{mode}:norms").random() < 0.5  # InvertedNorm sites too
    out = Outcome(net, mode, "ok")

    def fail(check: str, msg: str) -> Outcome:
        out.status, out.check = "failed", out.check or check
        out.failures.append(f"[{check}] {msg}")
        return out

    model = build(net)
    original = copy.deepcopy(model)
    base, view = make_input(net)
    ref = run(original, net, base, view)
    if ref.error:
        out.status = "invalid"
        out.failures.append(f"original: {ref.error}")
        return out
    before, base_before, rng = _state(model), base.detach().clone(), torch.get_rng_state()
    x = view(base)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with _autocast(net, net.autocast_at_optimize):
                if mode == "auto->exact":
                    fewbit_fx.optimize(model, example_inputs=(x,), mode="auto", bits=bits, tables=tables,
                                       norms=norms)
                    fewbit_fx.optimize(model, example_inputs=(x,), mode="exact", norms=norms)
                else:
                    fewbit_fx.optimize(model, example_inputs=(x,), mode=mode, bits=bits, tables=tables,
                                       norms=norms)
    except Exception as e:  # noqa: BLE001
        return fail("optimize-raises", f"{type(e).__name__}: {e}\n{_tail(e)}")
    if not same(base.detach(), base_before) or base.grad is not None:
        fail("optimize-input", "optimize() changed the example input or gave it a gradient")
    after = _state(model)
    changed = [n for n, t in before.items() if n not in after or not same(after[n], t)]
    if changed:
        fail("optimize-state", f"optimize() changed parameters/buffers {changed[:3]}")
    if not torch.equal(rng, torch.get_rng_state()):
        fail("optimize-rng", "optimize() advanced the global RNG")
    if model.training != net.train:
        fail("optimize-state", "optimize() changed train/eval mode")
    exact = mode in ("exact", "auto->exact")
    if exact and any(isinstance(m, FewBit) for m in model.modules()):
        left = [str(m) for m in _rewritten(model) if isinstance(m, FewBit)]
        fail("exact-has-fewbit", f"{mode}: few-bit modules remain: {left}")

    # what each rewritten module saw, for the elementwise check
    seen: list[tuple[nn.Module, Tensor]] = []

    def record(m, args):  # a replaced module shares its hook dicts with the original one
        if _inverted_activation(m):
            seen.append((m, args[0].detach().clone()))

    hooks = [m.register_forward_pre_hook(record) for m in _rewritten(model) if _inverted_activation(m)]
    start = _state(model)
    got = run(model, net, base, view, buffer_names=list(ref.buffers))
    for h in hooks:
        h.remove()
    if got.error:
        return fail("crash", f"the original runs, the optimized model raises in {got.error}")
    if len(got.outputs) != len(ref.outputs) or not all(same(a, b) for a, b in zip(got.outputs, ref.outputs)):
        diffs = [_max((a.double() - b.double()).abs()) if a.shape == b.shape else math.inf
                 for a, b in zip(got.outputs, ref.outputs)]
        return fail("forward", f"outputs differ from the original (max |diff| per output {diffs})")
    drifted = [n for n, b in ref.buffers.items() if n not in got.buffers or not same(got.buffers[n], b)]
    if drifted:
        fail("buffers", f"buffers after the forward differ from the original's: {drifted[:3]}")
    _restore(model, start)
    plain = _no_grad_outputs(model, net, base, view)
    if not isinstance(plain, list) or not all(same(a, b) for a, b in zip(plain, ref.outputs)):
        why = plain if isinstance(plain, str) else "values"
        fail("forward-no-grad", f"under no_grad the outputs differ from the original's ({why})")

    for i, (m, xs) in enumerate(seen):
        for f in check_inverted_site(m, xs, net.seed + i):
            fail("site-inverted", f)
    eps = torch.finfo(net.compute_dtype).eps
    if exact:
        ref64 = run(copy.deepcopy(original).double(), net, base, view, dtype=torch.float64, autocast=False)
        response = floor_response(model, net, base, view, ref, start)
        for f in _close_failures("gradient", got.grads, ref.grads, ref64.grads, eps, net.depth, sens=response,
                                 nan_only=net.nonfinite):
            fail("grad-exact", f)
    elif any(isinstance(m, FewBit) for m in model.modules()):
        _restore(model, start)
        with reference_fewbit():
            want = run(model, net, base, view)
        for n, w in want.grads.items():
            o = got.grads.get(n)
            if (w is None) != (o is None) or (w is not None and not same(o, w)):
                d = _max((o.double() - w.double()).abs()) if (o is not None and w is not None) else None
                fail("grad-fewbit", f"gradient {n} is not g * levels[code] (max |diff| {d})")
    return out


def _tail(e: BaseException) -> str:
    return "".join(traceback.format_exception(e)[-3:])[-600:]


def _eager_reference_for(original: nn.Module, plans: list) -> nn.Module | None:
    """The eager original with the backend's few-bit module sites swapped for FewBit (the
    same N(0, 1) tables); None when a few-bit site is functional or a shared module's sites
    were decided differently (no eager counterpart)."""
    decided: dict[str, set] = collections.defaultdict(set)
    acts = {}  # the site's activation: a user formula class is no torch module FewBit knows
    for plan in plans:
        for p in plan:
            if p.decision.variant == "fewbit" and not p.site.inplace:
                if p.site.module_path is None:
                    return None
                decided[p.site.module_path].add(p.decision.bits)
                acts[p.site.module_path] = p.site.activation
            elif p.site.module_path is not None:
                decided[p.site.module_path].add(None)
    ref = copy.deepcopy(original)
    for path, bits in decided.items():
        if len(bits) != 1:
            return None
        (b,) = bits
        if b is None:
            continue
        parent, _, name = path.rpartition(".")
        owner = ref.get_submodule(parent) if parent else ref
        setattr(owner, name, FewBit(acts[path], bits=b).train(ref.training))
    return ref


@functools.lru_cache(maxsize=None)
def _grid_floor(act: Activation, dtype: torch.dtype) -> float:
    """The floor (+ float64's allowance) of `act` on x in [-8, 8], 99th percentile: the
    compiled checks see no site inputs, so they allow what most inputs could (the top
    percent is the few x right at a kink, where f' jumps)."""
    x = torch.linspace(-8, 8, 4001).to(dtype)
    return float(inverted_floor(act, x, act.forward(x)).quantile(0.99)) + _method(act, dtype)


def _network_floor(net: Net) -> float:
    acts = [fewbit_fx.activations.get(b.act, **b.params) for b in net.blocks]
    return max((_grid_floor(a, net.compute_dtype) for a in acts), default=0.0)


def _eager_floor_response(original: nn.Module, net: Net, base: Tensor, view, ref: Result) -> dict[str, float]:
    """floor_response of the eager exact rewrite: the compiled graph's inverted sites are
    (mostly) the same ones, and it sees no site inputs of its own."""
    model = copy.deepcopy(original)  # its BatchNorm statistics moved, which no forward reads
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with _autocast(net, net.autocast_at_optimize):
                fewbit_fx.optimize(model, example_inputs=(view(base),), mode="exact")
    except Exception:  # noqa: BLE001 - the eager checks report that; here it only widens nothing
        return {}
    return floor_response(model, net, base, view, ref, _state(model))


def _compiled_runs(model: nn.Module, net: Net, backend, refs: list[Result]) -> tuple[list[Result], list[str]]:
    """`model` compiled with `backend` (dynamic=True), run on both input shapes; also the
    fewbit backend's fallback warnings."""
    compiled = torch.compile(model, backend=backend, dynamic=True)
    results, fell_back = [], []
    for which, ref in enumerate(refs):
        base, view = make_input(net, which)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            results.append(run(compiled, net, base, view, buffer_names=list(ref.buffers)))
        fell_back += [str(x.message) for x in w if "fewbit backend" in str(x.message)]
        if results[-1].error:
            break
    return results, fell_back


def _rounding_response(original: nn.Module, net: Net, base: Tensor, view, ref: Result) -> dict[str, float]:
    """Per output ("0", "1", ...) and gradient tensor, how far the eager original moves when
    every leaf module's output is off by one rounding (x (1 +- eps), random signs): a
    compiler that rounds differently may move it as far (a LayerNorm of a constant row, a
    BatchNorm of a batch-constant column amplify one ulp a thousandfold)."""
    model = copy.deepcopy(original)
    eps = torch.finfo(net.compute_dtype).eps
    gen = torch.Generator().manual_seed(net.seed + 7)

    def nudge(module, args, output):
        if not isinstance(output, Tensor) or not output.is_floating_point():
            return None
        sign = torch.randint(0, 2, output.shape, generator=gen).to(output.dtype) * 2 - 1
        return output * (1 + eps * sign)

    for m in model.modules():
        if not list(m.children()):
            m.register_forward_hook(nudge)
    nudged = run(model, net, base, view)
    if nudged.error:
        return {}
    outs = _deviation({str(i): o for i, o in enumerate(nudged.outputs)},
                      {str(i): o for i, o in enumerate(ref.outputs)})
    return {**outs, **_deviation(nudged.grads, ref.grads)}


def _deviation(a: dict, b: dict) -> dict[str, float]:
    """Per tensor, max |a - b| over the elements finite in both."""
    out = {}
    for name, x in a.items():
        y = b.get(name)
        if x is not None and y is not None and x.shape == y.shape:
            ok = torch.isfinite(x) & torch.isfinite(y)
            out[name] = _max((x.double() - y.double()).abs()[ok])
    return out


def _plus(*ds: dict) -> dict[str, float]:
    out: dict[str, float] = collections.defaultdict(float)
    for d in ds:
        for k, v in d.items():
            out[k] += v
    return out


def check_compiled(net: Net, mode: str) -> Outcome:
    """torch.compile(model, backend=fewbit_fx.backend(mode), dynamic=True) on both input
    shapes against the eager original (module docstring). Where it fails, the same model
    under plain Inductor is the control: if that raises too, the network is invalid (a
    torch.compile limit, e.g. Conv2d's backward on an empty batch); else its deviation from
    eager is rounding the compiler does anyway and widens the bound."""
    out = Outcome(net, f"compiled:{mode}", "ok")
    model = build(net)
    original = copy.deepcopy(model)
    original64 = copy.deepcopy(model).double()
    eps, delta = torch.finfo(net.compute_dtype).eps, _network_floor(net)
    refs, refs64, responses = [], [], []
    for which in (0, 1):
        base, view = make_input(net, which)
        refs.append(run(original, net, base, view))
        if refs[-1].error:
            return Outcome(net, out.mode, "invalid", [f"original: {refs[-1].error}"])
        refs64.append(run(original64, net, base, view, dtype=torch.float64, autocast=False))
        responses.append(_plus(_eager_floor_response(original, net, base, view, refs[-1]),
                               _rounding_response(original, net, base, view, refs[-1])))
    be = fewbit_fx.backend(mode=mode, fallback_random=True)
    try:
        got, fell_back = _compiled_runs(model, net, be, refs)
        wants = [None, None]
        if mode != "exact" and not got[-1].error:
            eager = _eager_reference_for(original, be.plans)
            if eager is not None:
                wants = [run(eager, net, *make_input(net, which)) for which in (0, 1)]
        failures = _compiled_failures(net, mode, got, refs, refs64, wants, responses, eps, delta)
        control = None
        if failures:
            torch._dynamo.reset()
            control, _ = _compiled_runs(copy.deepcopy(original), net, "inductor", refs)
            if control[-1].error:
                why = f"plain torch.compile raises too: {control[-1].error[:300]}"
                return Outcome(net, out.mode, "invalid", [why])
            failures = _compiled_failures(net, mode, got, refs, refs64, wants, responses, eps, delta, control)
    finally:
        torch._dynamo.reset()
    failures = [("compile-fallback", m[:400]) for m in fell_back[:1]] + failures
    if failures:
        out.status, out.check = "failed", failures[0][0]
        out.failures = [f"[{c}] {m}" for c, m in failures]
    return out


def _compiled_failures(net, mode, got, refs, refs64, wants, responses, eps, delta, control=None):
    """(check, message) pairs of the compiled bounds, per shape."""
    failures = []
    for which, (g, ref, ref64, want, response) in enumerate(zip(got, refs, refs64, wants, responses)):
        if g.error:
            failures.append(("compile-crash", f"shape {which}: {g.error[:600]}"))
            break
        c = control[which] if control else None
        outs, rs, r64 = ({str(i): o for i, o in enumerate(r.outputs)} for r in (g, ref, ref64))
        extra = _plus(response, _deviation({str(i): o for i, o in enumerate(c.outputs)}, rs) if c else {})
        failures += [("compile-forward", f) for f in _close_failures(
            f"shape {which} output", outs, rs, r64, eps, net.depth, 0.0, COMPILED_SLACK, extra)]
        if net.nonfinite and mode != "exact":
            continue  # compiled few-bit makes a whole gradient NaN for one NaN x (documented)
        extra = _plus(response, _deviation(c.grads, ref.grads) if c else {})
        if mode == "exact" or want is not None:
            failures += [("compile-grad", f) for f in _close_failures(
                f"shape {which} gradient", g.grads, ref.grads if want is None else want.grads, ref64.grads,
                eps, net.depth, delta, COMPILED_SLACK, extra, nan_only=net.nonfinite)]
        else:  # a functional few-bit site: no eager twin, only the non-finite pattern
            for n, gr in g.grads.items():
                r = ref.grads.get(n)
                if gr is not None and r is not None and not torch.equal(torch.isfinite(gr), torch.isfinite(r)):
                    failures.append(("compile-grad", f"shape {which} gradient {n}: non-finite pattern differs"))
    return failures


# --- driving, excluding, minimising --------------------------------------------------------
def known(outcome: "Outcome") -> str | None:
    """The KNOWN_OPEN bug(s) a failed outcome is, if any: every failure message of it
    contains the signature of a bug that applies to its network and mode."""
    if outcome.status != "failed":
        return None
    bugs = [b for b in KNOWN_OPEN if b.applies(outcome.net, outcome.mode)]
    names = []
    for f in outcome.failures:
        hit = next((b.name for b in bugs if b.signature in f), None)
        if hit is None:
            return None
        names.append(hit)
    return " + ".join(sorted(set(names)))


def check_network(net: Net, modes=MODES[:3], compiled_modes=(), exclude: bool = True) -> list[Outcome]:
    """Every eager mode in `modes`, then every compiled mode; a known open bug's failure
    becomes status "excluded" (unless `exclude` is False)."""
    outs = [_guarded(check_eager, net, m) for m in modes]
    outs += [_guarded(check_compiled, net, m) for m in compiled_modes]
    for o in outs:
        bug = known(o) if exclude else None
        if bug:
            o.status, o.check = "excluded", bug
    return outs


def _guarded(check, net: Net, mode: str) -> Outcome:
    """A bug in a check (or a crash we did not foresee) is a failure, not the end of the run."""
    try:
        return check(net, mode)
    except Exception as e:  # noqa: BLE001
        return Outcome(net, mode if check is check_eager else f"compiled:{mode}", "failed",
                       [f"[check-raised] {type(e).__name__}: {e}\n{_tail(e)}"], "check-raised")


def _simpler(net: Net):
    """Candidate simplifications of a network, smallest changes to the description first."""
    def variant(**kw):
        n = copy.deepcopy(net)
        for k, v in kw.items():
            setattr(n, k, v)
        return n

    for i in range(len(net.blocks)):
        if len(net.blocks) > 1:
            n = copy.deepcopy(net)
            del n.blocks[i]
            for b in n.blocks:
                if b.shares == i:
                    b.form, b.shares = ("module", None) if "inplace" not in b.code else ("module_inplace", None)
                elif b.shares is not None and b.shares > i:
                    b.shares -= 1
            if n.return_act is not None:
                n.return_act = None if n.return_act == i else n.return_act - (n.return_act > i)
            yield n
    for i, b in enumerate(net.blocks):
        for j in range(len(b.consumers)):
            n = copy.deepcopy(net)
            del n.blocks[i].consumers[j]
            yield n
        for attr, plain in (("mutate", None), ("mutate_after", None), ("graph_break", False),
                            ("scale", 1.0)):
            if getattr(b, attr) != plain:
                n = copy.deepcopy(net)
                setattr(n.blocks[i], attr, plain)
                yield n
        for pre in ("none", "proj"):  # one direction only (none < proj < the others): no cycles
            if b.pre != pre and not (pre == "proj" and b.pre == "none"):
                n = copy.deepcopy(net)
                n.blocks[i].pre = pre
                yield n
    for k, v in (("return_act", None), ("nonfinite", False), ("input_layout", "contiguous"),
                 ("dtype", "float32"), ("input_scale", 1.0), ("input_grad", False), ("train", False)):
        if getattr(net, k) != v:
            yield variant(**{k: v})
    for b in (2, 1):
        if net.batch > b:
            yield variant(batch=b)
    if net.layout == "dense" and net.dims[0]:
        yield variant(dims=(0, net.dims[1]))
    for w in (1, 2, 3, 4):
        if net.width > w:
            yield variant(dims=net.dims[:-1] + (w,))


def minimise(outcome: Outcome, budget_s: float = 120.0) -> Outcome:
    """Greedily simplify a failing network while it fails the same check in the same mode."""
    best, deadline = outcome, time.monotonic() + budget_s
    mode = outcome.mode
    compiled = mode.startswith("compiled:")
    improved = True
    while improved and time.monotonic() < deadline:
        improved = False
        for cand in _simpler(best.net):
            if time.monotonic() > deadline:
                break
            if not _valid(cand):
                continue
            o = _guarded(check_compiled, cand, mode[9:]) if compiled else _guarded(check_eager, cand, mode)
            if o.status == "failed" and o.check == outcome.check:
                best, improved = o, True
                break
    return best


def _valid(net: Net) -> bool:
    if any("batchnorm" in (b.pre, *b.consumers) for b in net.blocks):
        return _bn_ok(net)
    return True


def fuzz(seed: int, deadline: float, compile_every: int = 0, on_outcome=None) -> tuple[list[Outcome], int]:
    """Networks seed, seed + 1, ... until the monotonic deadline; every `compile_every`-th
    network is also compiled (exact and one of auto/fewbit). Returns (outcomes, networks)."""
    outcomes, n = [], 0
    while time.monotonic() < deadline:
        net = generate(seed + n)
        r = random.Random(seed + n)
        compiled = ("exact", r.choice(["auto", "fewbit"])) if compile_every and n % compile_every == 0 else ()
        modes = list(MODES[:3]) + (["auto->exact"] if r.random() < 0.25 else [])
        for o in check_network(net, modes, compiled):
            outcomes.append(o)
            if on_outcome:
                on_outcome(o)
        n += 1
    return outcomes, n


def write_report(path: str, seed: int, minutes: float, elapsed: float, outcomes: list[Outcome],
                 networks: int, minimised: list[Outcome]) -> None:
    counts = collections.Counter((o.net.kind, o.net.dtype, o.mode, o.status) for o in outcomes)
    keys = sorted({(k, d, m) for k, d, m, _ in counts})
    lines = [
        "# fewbit-fx fuzzer: long run",
        "",
        f"generated by: `python3 tests/fuzzing.py --minutes {minutes:g} --seed {seed} --out {path}`",
        "",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; transformers "
        f"{'yes' if HAVE_TRANSFORMERS else 'no (formula activations not drawn)'}",
        f"seed {seed}: networks {seed} .. {seed + networks - 1} ({networks} networks), "
        f"{elapsed / 60:.1f} minutes",
        f"checks: {sum(o.status == 'ok' for o in outcomes)} passed, "
        f"{sum(o.status == 'failed' for o in outcomes)} failed, "
        f"{sum(o.status == 'invalid' for o in outcomes)} invalid (the original itself raises), "
        f"{sum(o.status == 'excluded' for o in outcomes)} excluded (failed by a known open bug: "
        f"{', '.join(b.name for b in KNOWN_OPEN) or 'none'})",
        "known open bugs hit (status excluded): " + (", ".join(
            f"{name} {n}" for name, n in collections.Counter(
                o.check for o in outcomes if o.status == "excluded").most_common()) or "none"),
        "",
        "Checks per network kind, dtype and mode (a check: one network optimized or compiled in one mode, "
        "all of tests/fuzzing.py's checks run on it):",
        "",
        "| kind | dtype | mode | passed | failed | invalid | excluded |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for k, d, m in keys:
        lines.append(f"| {k} | {d} | {m} | " + " | ".join(str(counts[(k, d, m, s)]) for s in
                                                       ("ok", "failed", "invalid", "excluded")) + " |")
    lines += ["", "## Failures", ""]
    if not minimised:
        lines.append("none")
    for o in minimised:
        lines += [f"### {o.check} in {o.mode} ({o.net.label()})", "", "```", *o.failures[:4], "```", "",
                  "```python", source(o.net).rstrip(), "```", "",
                  f"net: `{_describe(o.net)}`", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _describe(net: Net) -> str:
    d = dataclasses.asdict(net)
    d["blocks"] = len(net.blocks)
    return ", ".join(f"{k}={v}" for k, v in d.items())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--compile-every", type=int, default=20, help="also compile every n-th network")
    ap.add_argument("--show", type=int, default=None, help="print one network's source")
    ap.add_argument("--replay", type=int, default=None, help="check one network, minimise failures")
    args = ap.parse_args(argv)
    if args.show is not None:
        print(source(generate(args.show)))
        return 0
    if args.replay is not None:
        net = generate(args.replay)
        print(source(net))
        for o in check_network(net, MODES, ("exact", "auto", "fewbit"), exclude=False):
            print(o.mode, o.status, *o.failures, sep="\n  ")
            if o.status == "failed":
                m = minimise(o)
                print("minimised:\n" + source(m.net), *m.failures, sep="\n  ")
        return 0
    start = time.monotonic()
    seen_checks: dict[tuple, Outcome] = {}

    def progress(o: Outcome):
        if o.status == "failed":
            seen_checks.setdefault((o.mode, o.check, o.net.blocks[0].act if o.net.blocks else ""), o)
            print(f"FAIL {o.net.label()} {o.mode}: {o.failures[0][:300]}", flush=True)

    # leave ~10% of the time to minimise what was found
    outcomes, networks = fuzz(args.seed, start + 60 * args.minutes * 0.9, args.compile_every, progress)
    minimised = []
    for o in list(seen_checks.values())[:12]:
        minimised.append(minimise(o, budget_s=max(10.0, 6 * args.minutes / max(1, len(seen_checks)))))
    elapsed = time.monotonic() - start
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        write_report(args.out, args.seed, args.minutes, elapsed, outcomes, networks, minimised)
    failed = sum(o.status == "failed" for o in outcomes)
    print(f"{networks} networks, {len(outcomes)} checks, {failed} failed, {elapsed / 60:.1f} min")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
