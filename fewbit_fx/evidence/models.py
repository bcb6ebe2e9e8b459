"""A small catalog of models for tests, the CLI and benchmarks.

    model, args, kwargs = fewbit_fx.evidence.models.build("gpt2", scale="tiny")
    loss = model(*args, **kwargs)...

Every model is built from scratch with random weights (Hugging Face models from their
config classes: nothing is downloaded), seeded so two builds are identical, in train mode,
with every dropout probability set to 0 so a training forward is deterministic.

Scales: "tiny" (2 layers, hidden 64, sequence 16, batch 2: a forward+backward well under a
second on a CPU; for tests), "small" (demos and reports), "base" (real GPT-2 small / BERT-base
/ ViT-base sizes with short sequences; Llama/Mistral ~100M-parameter configs).

Hugging Face models need `transformers` (the "hf" extra); the plain-torch models need only torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

SCALES = ("tiny", "small", "base")


@dataclass(frozen=True)
class _Size:
    layers: int
    hidden: int
    heads: int
    intermediate: int
    seq: int
    batch: int
    vocab: int


# Transformer sizes; "base" is overridden per family where the real model differs.
_SIZES = {
    "tiny": _Size(layers=2, hidden=64, heads=4, intermediate=256, seq=16, batch=2, vocab=128),
    "small": _Size(layers=4, hidden=256, heads=4, intermediate=1024, seq=64, batch=4, vocab=1024),
    "base": _Size(layers=12, hidden=768, heads=12, intermediate=3072, seq=128, batch=1, vocab=30522),
}


def _check_scale(scale: str) -> _Size:
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    return _SIZES[scale]


def _ids(size: _Size, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (size.batch, size.seq), generator=g)


def _randn(*shape: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(*shape, generator=g)


# --- Hugging Face models ---------------------------------------------------------------

def _gpt2(scale: str):
    """GPT-2 (GPT2LMHeadModel): NewGELUActivation ("gelu_new", a tanh formula) in each MLP,
    its output kept by c_proj (a Conv1D), so auto mode picks inverted. base = GPT-2 small
    (12 x 768, vocab 50257), sequence 128."""
    from transformers import GPT2Config, GPT2LMHeadModel

    s = _check_scale(scale)
    vocab = 50257 if scale == "base" else s.vocab
    cfg = GPT2Config(
        vocab_size=vocab, n_positions=max(1024 if scale == "base" else 256, s.seq),
        n_embd=s.hidden, n_layer=s.layers, n_head=s.heads, n_inner=s.intermediate,
        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        summary_first_dropout=0.0, use_cache=False, return_dict=True,
        bos_token_id=vocab - 1, eos_token_id=vocab - 1,
    )
    return GPT2LMHeadModel(cfg), (), {"input_ids": _ids(s, vocab)}


def _bert(scale: str):
    """BERT (BertModel with pooler): GELUActivation in each intermediate block, kept by the
    output dense layer (inverted in auto mode), and the pooler's tanh. base = BERT-base
    (12 x 768, vocab 30522), sequence 128."""
    from transformers import BertConfig, BertModel

    s = _check_scale(scale)
    cfg = BertConfig(
        vocab_size=s.vocab, hidden_size=s.hidden, num_hidden_layers=s.layers,
        num_attention_heads=s.heads, intermediate_size=s.intermediate, hidden_act="gelu",
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        max_position_embeddings=max(512, s.seq), use_cache=False, return_dict=True,
    )
    ids = _ids(s, s.vocab)
    return BertModel(cfg), (), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _llama_like(scale: str, family: str):
    s = _check_scale(scale)
    if scale == "base":  # ~100M parameters (tied embeddings)
        hidden, layers, heads, kv, inter, vocab = 768, 12, 12, 4, 2048, 32000
    else:
        hidden, layers, heads, kv, inter, vocab = s.hidden, s.layers, s.heads, 2, s.hidden * 3, s.vocab
    common = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, hidden_act="silu",
        max_position_embeddings=max(2048, s.seq), attention_dropout=0.0, use_cache=False,
        tie_word_embeddings=True, return_dict=True,
    )
    if family == "llama":
        from transformers import LlamaConfig as Config, LlamaForCausalLM as Model
    else:
        from transformers import MistralConfig as Config, MistralForCausalLM as Model
    return Model(Config(**common)), (), {"input_ids": _ids(s, vocab)}


def _llama(scale: str):
    """Llama (LlamaForCausalLM): SiLU in a gated MLP, down(silu(gate(x)) * up(x)); the mul
    keeps silu's output, so auto mode picks inverted (+1 bit/elem branch mask).
    base: 12 x 768, 12 heads (4 KV), MLP 2048, vocab 32000, tied: ~100M parameters."""
    return _llama_like(scale, "llama")


def _mistral(scale: str):
    """Mistral (MistralForCausalLM): the same gated SiLU MLP as Llama, sliding-window
    attention config. base: the same ~100M-parameter shape as llama."""
    return _llama_like(scale, "mistral")


def _vit(scale: str):
    """ViT (ViTModel with pooler): GELU in each intermediate block (kept by the output dense,
    inverted in auto mode) and the pooler's tanh. base = ViT-base (12 x 768, patch 16,
    224 x 224 images, 197 tokens), batch 1."""
    from transformers import ViTConfig, ViTModel

    s = _check_scale(scale)
    image, patch = {"tiny": (16, 4), "small": (64, 8), "base": (224, 16)}[scale]
    cfg = ViTConfig(
        hidden_size=s.hidden, num_hidden_layers=s.layers, num_attention_heads=s.heads,
        intermediate_size=s.intermediate, hidden_act="gelu", hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, image_size=image, patch_size=patch,
        num_channels=3, return_dict=True,
    )
    return ViTModel(cfg), (), {"pixel_values": _randn(s.batch, 3, image, image)}


# --- plain torch models -----------------------------------------------------------------

class FunctionalMLP(nn.Module):
    """Activations called functionally in the module's own forward: F.gelu (output kept by
    fc2: inverted), torch.sigmoid (output only added: few-bit in auto mode) and x.tanh()
    (output kept by `out`, which tanh keeps anyway: nothing to save)."""

    def __init__(self, d: int, h: int, layers: int) -> None:
        super().__init__()
        self.fc1 = nn.ModuleList(nn.Linear(d, h) for _ in range(layers))
        self.fc2 = nn.ModuleList(nn.Linear(h, d) for _ in range(layers))
        self.gate = nn.Linear(d, d)
        self.proj = nn.Linear(d, d)
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for fc1, fc2 in zip(self.fc1, self.fc2):
            x = x + fc2(F.gelu(fc1(x)))
        g = torch.sigmoid(self.gate(x))
        t = self.proj(x).tanh()
        return self.out(t) + x + g


class ReuseBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, d)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(x))
        return h + self.fc2(h)  # h is used twice: a Linear (keeps it) and a residual add


class Reuse(nn.Module):
    """An activation whose output feeds both a Linear and a residual add (inverted: the
    Linear keeps the output anyway)."""

    def __init__(self, d: int, layers: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(ReuseBlock(d) for _ in range(layers)))
        self.head = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


class LoRA(nn.Module):
    """base(x) + b(a(x)): a frozen Linear plus a trainable rank-r adapter (LoRA, without
    4-bit quantization). `zero_init`: b starts at zero, so the adapted model starts as the
    base (fine-tuning studies)."""

    def __init__(self, base: nn.Module, rank: int = 8, zero_init: bool = False,
                 dims: tuple[int, int] | None = None) -> None:
        super().__init__()
        d_in, d_out = dims or (base.in_features, base.out_features)  # dims: HF's Conv1D
        self.base = base.requires_grad_(False)
        self.lora_a = nn.Linear(d_in, rank, bias=False)
        self.lora_b = nn.Linear(rank, d_out, bias=False)
        if zero_init:
            nn.init.zeros_(self.lora_b.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_b(self.lora_a(x))


class Frozen(nn.Module):
    """Adapter fine-tuning: up (frozen + LoRA) -> GELU -> down (frozen) -> SiLU -> head.
    The GELU's only consumer is frozen, so nothing keeps its output: few-bit in auto mode.
    The SiLU's consumer (head) is trainable and keeps its output: inverted."""

    def __init__(self, d: int, h: int, rank: int = 4) -> None:
        super().__init__()
        self.up = LoRA(nn.Linear(d, h), rank)
        self.act = nn.GELU()
        self.down = nn.Linear(h, d).requires_grad_(False)
        self.act2 = nn.SiLU()
        self.head = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act2(self.down(self.act(self.up(x)))))


class ConvBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))


class CNN(nn.Module):
    """conv + BatchNorm + ReLU(inplace=True) + conv + BatchNorm + SiLU blocks, mean pool, Linear.
    The in-place ReLU keeps its output, which the next conv keeps anyway (nothing to save);
    each SiLU's output is kept by the next conv/Linear (inverted)."""

    def __init__(self, channels: int, blocks: int, classes: int = 10) -> None:
        super().__init__()
        chans = [3] + [channels] * blocks
        self.blocks = nn.Sequential(*(ConvBlock(a, b) for a, b in zip(chans, chans[1:])))
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x).mean(dim=(2, 3)))


def _mlp_functional(scale: str):
    """Custom module calling F.gelu, torch.sigmoid and x.tanh() in its own forward."""
    s = _check_scale(scale)
    return FunctionalMLP(s.hidden, s.intermediate, s.layers), (_randn(s.batch, s.seq, s.hidden),), {}


def _reuse(scale: str):
    """GELU blocks whose output is used by a Linear and by a residual add."""
    s = _check_scale(scale)
    return Reuse(s.hidden, s.layers), (_randn(s.batch, s.seq, s.hidden),), {}


def _frozen(scale: str):
    """LoRA-style adapter: a frozen consumer (few-bit) and a trainable one (inverted)."""
    s = _check_scale(scale)
    return Frozen(s.hidden, s.intermediate), (_randn(s.batch, s.seq, s.hidden),), {}


def _cnn(scale: str):
    """Conv/BatchNorm/ReLU(inplace)/SiLU blocks on images."""
    s = _check_scale(scale)
    channels, blocks, image = {"tiny": (8, 2, 16), "small": (32, 3, 32), "base": (64, 4, 64)}[scale]
    return CNN(channels, blocks), (_randn(s.batch, 3, image, image),), {}


_CATALOG: dict[str, Callable[[str], tuple]] = {
    "gpt2": _gpt2,
    "bert": _bert,
    "llama": _llama,
    "mistral": _mistral,
    "vit": _vit,
    "mlp-functional": _mlp_functional,
    "reuse": _reuse,
    "frozen": _frozen,
    "cnn": _cnn,
}

HF_MODELS = ("gpt2", "bert", "llama", "mistral", "vit")


def names() -> list[str]:
    """Every model name build() accepts."""
    return list(_CATALOG)


def _get(name: str) -> Callable[[str], tuple]:
    if name not in _CATALOG:
        raise ValueError(f"unknown model {name!r}; the catalog has: {', '.join(_CATALOG)}")
    return _CATALOG[name]


def build(name: str, scale: str = "tiny", seed: int = 0) -> tuple[nn.Module, tuple, dict]:
    """(model in train mode with random weights, example args, example kwargs).

    Deterministic: the same name, scale and seed give the same weights and inputs, and the
    caller's global RNG is left as it was.
    """
    factory = _get(name)
    _check_scale(scale)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, args, kwargs = factory(scale)
    model.train()
    return model, args, kwargs


# --- any Hugging Face architecture -------------------------------------------------------

_SIZE_ATTRS = {  # catalog size field -> config attribute names used by various families
    "layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "hidden": ("hidden_size", "n_embd", "d_model"),
    "heads": ("num_attention_heads", "n_head"),
    "intermediate": ("intermediate_size", "n_inner", "ffn_dim", "d_ff"),
}


_CNN_IMAGE = {"tiny": 32, "small": 64, "base": 224}  # for CNN configs that name no image size


def _random_drop(attr: str) -> bool:
    """Config fields of random drops (dropout, drop path / drop connect, layer drop), which
    would make two runs of the same step differ."""
    return any(k in attr for k in ("dropout", "drop_path", "drop_connect", "layerdrop")) or attr.endswith("pdrop")


def build_hf(model_type: str, scale: str = "tiny", seed: int = 0) -> tuple[nn.Module, tuple, dict]:
    """Any Hugging Face architecture by config `model_type` (e.g. "gpt2", "opt", "phi"),
    random weights from its default config resized to `scale` ("base" keeps the config's
    own sizes), dropout, stochastic depth and layer drop 0, no cache, in train mode.
    Nothing is downloaded. Inputs are `input_ids` (or `pixel_values` for vision configs).
    Best effort: an architecture whose config uses other size names keeps its defaults
    for those."""
    from transformers import AutoConfig, AutoModel

    s = _check_scale(scale)
    cfg = AutoConfig.for_model(model_type)
    if scale != "base":
        for field_name, attrs in _SIZE_ATTRS.items():
            for attr in attrs:
                if hasattr(cfg, attr) and getattr(cfg, attr) is not None:
                    setattr(cfg, attr, getattr(s, field_name))
        for attr in ("num_key_value_heads", "n_head_kv"):
            if getattr(cfg, attr, None) is not None:
                setattr(cfg, attr, 2)
        if getattr(cfg, "vocab_size", None):
            cfg.vocab_size = s.vocab
        for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
            if isinstance(getattr(cfg, attr, None), int):
                setattr(cfg, attr, min(getattr(cfg, attr), s.vocab - 1))
    for attr in list(cfg.to_dict()):
        if _random_drop(attr) and isinstance(getattr(cfg, attr, None), float):
            setattr(cfg, attr, 0.0)
    if hasattr(cfg, "use_cache"):
        cfg.use_cache = False
    cfg.return_dict = True
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModel.from_config(cfg)
    model.train()
    # a vision model: an image size (BEiT also has a vocab_size), or a CNN that names none
    if hasattr(cfg, "num_channels") and (hasattr(cfg, "image_size") or not hasattr(cfg, "vocab_size")):
        size = getattr(cfg, "image_size", _CNN_IMAGE[scale])
        size = size if isinstance(size, int) else size[0]
        return model, (), {"pixel_values": _randn(s.batch, cfg.num_channels, size, size)}
    return model, (), {"input_ids": _ids(s, cfg.vocab_size)}


__all__ = ["build", "build_hf", "names", "SCALES", "HF_MODELS"]
