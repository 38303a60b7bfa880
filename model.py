"""The two pretrained networks: Whisper's audio encoder and a Llama/Qwen-style decoder, loaded from
Hugging Face folders (config.json + safetensors, sharded or not) through one name table each, so a
missing, extra or mis-shaped weight is an error that names it. After openai/whisper, meta-llama/llama3
and pytorch-labs/gpt-fast (a KV cache written in place; prefill and decode_one_token kept apart)."""
import functools
import glob
import json
import math
import os
import re
import sys
import time
import types
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

# ----------------------------------------------------------------------------- device, dtype, loading

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(x):
    if x is None or isinstance(x, torch.dtype):
        return x
    if isinstance(x, str) and x.lower() in DTYPES:
        return DTYPES[x.lower()]
    raise ValueError(f"unknown dtype {x!r}: use one of {', '.join(DTYPES)}")


def bf16_is_fast(t_fp32, t_bf16):
    """bf16 halves the bytes, but only pays where the device computes it natively: CPUs without AVX512-BF16
    or AMX emulate it, several times slower than fp32. A clear margin keeps a noisy timing from flipping it."""
    return t_bf16 < 0.7 * t_fp32


def _matmul_time(dtype, device, seconds=0.1):
    x, w = torch.randn(256, 576, device=device, dtype=dtype), torch.randn(1536, 576, device=device, dtype=dtype)
    F.linear(x, w)   # warm-up: the first call picks and builds the kernel
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        F.linear(x, w)   # one LLM projection of a training batch (SmolLM2's MLP shape)
        n += 1
    return (time.perf_counter() - t0) / n


def pick_dtype(name, device):
    """A dtype setting -> torch dtype; None keeps the checkpoint's. "auto": bf16 where the device runs it fast,
    fp32 elsewhere: a GPU says whether it has bf16; on a CPU the two are timed on one matmul (a few ms),
    since the instruction set alone does not say how fast a given torch build runs bf16."""
    if name != "auto":
        return parse_dtype(name)
    device = torch.device(device)
    if device.type == "cuda":
        fast, why = torch.cuda.is_bf16_supported(), "this GPU's bf16 support"
    elif device.type == "cpu":
        t32, t16 = _matmul_time(torch.float32, device), _matmul_time(torch.bfloat16, device)
        fast = bf16_is_fast(t32, t16)
        why = f"a bf16 matmul takes {t16 / t32:.2f}x the fp32 time on this {torch.backends.cpu.get_cpu_capability()} CPU"
    else:
        fast, why = False, f"{device.type}: fp32 is the safe choice"
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"dtype: {'bf16' if fast else 'fp32'} ({why})", file=sys.stderr)   # stdout is chat.py's reply
    return torch.bfloat16 if fast else torch.float32


def pick_device(name=None):
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    return torch.device(name)


def _json(folder, name, required=True):
    path = os.path.join(folder, name)
    if not required and not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _ids(x):                     # configs give stop ids as null, an int or a list
    return [] if x is None else [x] if isinstance(x, int) else list(x)


def _config_dtype(hf):
    # transformers 5 writes "dtype"; older configs (and every published checkpoint) "torch_dtype"
    return DTYPES.get(str(hf.get("dtype") or hf.get("torch_dtype")), torch.float32)


def _checkpoint_keys(folder):
    """{checkpoint key: file} from model.safetensors.index.json if present, else every *.safetensors."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return {k: os.path.join(folder, v) for k, v in json.load(f)["weight_map"].items()}
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights found")
    where = {}
    for path in files:
        with safe_open(path, "pt") as f:
            where.update((k, path) for k in f.keys())
    return where


def _lookup(table, name):
    """Our parameter name -> its table entry, the layer number filled into every '{}'."""
    m = re.search(r"\.(\d+)\.", name)
    entry = table[name if m is None else name[:m.start()] + ".{}." + name[m.end():]]

    def fill(e):
        return e.format(m[1] if m else "") if isinstance(e, str) else tuple(fill(x) for x in e)
    return fill(entry)


def _load(model, folder, where, sources, dtype, device, skip):
    """Fill a model built on the meta device. sources(our name) -> checkpoint keys (several are
    concatenated on dim 0: the fused q|k|v). Every checkpoint key must be used unless skip(key)."""
    state, used, seen = {}, set(), set()
    open_file = functools.cache(lambda path: safe_open(path, "pt"))
    index = os.path.join(folder, "model.safetensors.index.json")
    source = index if os.path.exists(index) else ", ".join(sorted(set(where.values())))
    for name, ref in model.state_dict(keep_vars=True).items():
        if id(ref) in seen:
            continue                                   # tied alias: the caller re-ties it
        seen.add(id(ref))
        keys = sources(name)
        keys = (keys,) if isinstance(keys, str) else keys
        for k in keys:
            if k not in where:
                raise ValueError(f"{source}: missing key {k!r} (needed for {name})")
        parts = [open_file(where[k]).get_tensor(k) for k in keys]
        t = torch.cat(parts) if len(parts) > 1 else parts[0]
        if t.shape != ref.shape:
            raise ValueError(f"{where[keys[0]]}: {' + '.join(keys)} has shape {tuple(t.shape)}, "
                             f"expected {tuple(ref.shape)} (for {name})")
        state[name] = t.to(device=device, dtype=dtype)
        used.update(keys)
    extra = sorted(k for k in where if k not in used and not skip(k))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise ValueError(f"{where[extra[0]]}: unexpected key {extra[0]!r}{more}")
    model.load_state_dict(state, strict=False, assign=True)   # strict=False: tied aliases only
    return model


# ----------------------------------------------------------------------------- Whisper encoder

@dataclass
class WhisperConfig:
    n_mels: int = 80
    n_ctx: int = 1500
    d_model: int = 512
    n_heads: int = 8
    n_layers: int = 6
    ffn_dim: int = 2048

    @classmethod
    def from_hf(cls, c):
        if c.get("activation_function", "gelu") != "gelu" or c.get("scale_embedding", False):
            raise ValueError("only Whisper's own gelu encoder without embedding scale is supported")
        return cls(n_mels=c["num_mel_bins"], n_ctx=c["max_source_positions"], d_model=c["d_model"],
                   n_heads=c["encoder_attention_heads"], n_layers=c["encoder_layers"],
                   ffn_dim=c["encoder_ffn_dim"])


def sinusoids(length, channels, max_timescale=10000):
    # whisper's fixed positions; checkpoints store them, this only makes a fresh encoder sensible
    inv = torch.exp(-math.log(max_timescale) / (channels // 2 - 1) * torch.arange(channels // 2))
    t = torch.arange(length)[:, None] * inv[None, :]
    return torch.cat([t.sin(), t.cos()], dim=1)


class EncoderBlock(nn.Module):
    def __init__(self, d, n_heads, ffn_dim):
        super().__init__()
        self.n_heads = n_heads
        self.attn_ln = nn.LayerNorm(d)
        self.query, self.key = nn.Linear(d, d), nn.Linear(d, d, bias=False)   # whisper's key has no bias
        self.value, self.out = nn.Linear(d, d), nn.Linear(d, d)
        self.mlp_ln = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, ffn_dim), nn.Linear(ffn_dim, d)

    def forward(self, x, mask=None):
        B, T, D = x.shape
        h = self.attn_ln(x)
        q, k, v = (p(h).view(B, T, self.n_heads, -1).transpose(1, 2) for p in (self.query, self.key, self.value))
        x = x + self.out(F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, T, D))
        return x + self.fc2(F.gelu(self.fc1(self.mlp_ln(x))))


class WhisperEncoder(nn.Module):
    def __init__(self, cfg: WhisperConfig):
        super().__init__()
        self.cfg = cfg
        self.conv1 = nn.Conv1d(cfg.n_mels, cfg.d_model, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(cfg.d_model, cfg.d_model, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", sinusoids(cfg.n_ctx, cfg.d_model))
        self.blocks = nn.ModuleList(EncoderBlock(cfg.d_model, cfg.n_heads, cfg.ffn_dim)
                                    for _ in range(cfg.n_layers))
        self.ln_post = nn.LayerNorm(cfg.d_model)

    def forward(self, mel, lengths=None, padded=False):
        """mel (B, n_mels, T <= 3000), lengths (B,) real mel frames -> (B, T_out, d), out lengths (B,).
        padded=True is the release's mode (every clip padded to 30 s, attention over the padding); else
        each row is masked past its length, even when the longest row fills the whole window."""
        B, M, T = mel.shape
        if M != self.cfg.n_mels or T > 2 * self.cfg.n_ctx:
            raise ValueError(f"expected mel (B, {self.cfg.n_mels}, T <= {2 * self.cfg.n_ctx}), "
                             f"got {tuple(mel.shape)}")
        T_out = (T - 1) // 2 + 1
        x = mel.to(self.conv1.weight.dtype)
        lengths = None if lengths is None else torch.as_tensor(lengths, device=mel.device)
        out_lengths = torch.full((B,), T_out, device=mel.device) if lengths is None else (lengths - 1) // 2 + 1
        # Padded mode (T = 3000) is the reference: whisper attends over the padding, so no mask.
        # Real-frames mode masks each row past its length, so a batch equals each clip alone: the
        # convs' zero padding is reproduced by zeroing past the end, and padded keys are hidden.
        mask = None
        if lengths is not None and not padded:
            frames = (torch.arange(T, device=mel.device) < lengths[:, None])[:, None]
            x = F.gelu(self.conv1(x * frames)) * frames
            mask = (torch.arange(T_out, device=mel.device) < out_lengths[:, None])[:, None, None]
        else:
            x = F.gelu(self.conv1(x))
        x = F.gelu(self.conv2(x)).transpose(1, 2)
        x = x + self.positional_embedding[:T_out].to(x.dtype)
        for block in self.blocks:
            x = block(x, mask)
        return self.ln_post(x), out_lengths

    @classmethod
    def from_pretrained(cls, folder, dtype=None, device=None):
        hf = _json(folder, "config.json")
        where = _checkpoint_keys(folder)
        # a full Whisper checkpoint nests the encoder under model.encoder.; an encoder-only file (or a
        # saved WhisperModel) under encoder.; everything else (the text decoder) is not ours to load
        prefix = "model.encoder." if any(k.startswith("model.encoder.") for k in where) else "encoder."
        with torch.device("meta"):
            model = cls(WhisperConfig.from_hf(hf))
        _load(model, folder, where, lambda name: prefix + _lookup(WHISPER_NAMES, name),
              parse_dtype(dtype) or _config_dtype(hf), pick_device(device),
              skip=lambda k: not k.startswith(prefix))
        return model.eval()


# ours -> Hugging Face Whisper encoder names (after the model.encoder. / encoder. prefix)
WHISPER_NAMES = {
    "conv1.weight": "conv1.weight", "conv1.bias": "conv1.bias",
    "conv2.weight": "conv2.weight", "conv2.bias": "conv2.bias",
    "positional_embedding": "embed_positions.weight",
    "ln_post.weight": "layer_norm.weight", "ln_post.bias": "layer_norm.bias",
    **{f"blocks.{{}}.{ours}.{p}": f"layers.{{}}.{hf}.{p}" for ours, hf in [
        ("attn_ln", "self_attn_layer_norm"), ("query", "self_attn.q_proj"), ("value", "self_attn.v_proj"),
        ("out", "self_attn.out_proj"), ("mlp_ln", "final_layer_norm"), ("fc1", "fc1"), ("fc2", "fc2")]
       for p in ("weight", "bias")},
    "blocks.{}.key.weight": "layers.{}.self_attn.k_proj.weight",
}


# ----------------------------------------------------------------------------- Llama / Qwen decoder

@dataclass
class DecoderConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    qkv_bias: bool = False
    tie_embeddings: bool = False
    max_seq_len: int = 4096
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)

    @classmethod
    def from_hf(cls, c):
        common = dict(vocab_size=c["vocab_size"], dim=c["hidden_size"], n_layers=c["num_hidden_layers"],
                      bos_token_id=c.get("bos_token_id"), eos_token_id=_ids(c.get("eos_token_id")))
        heads = c["num_attention_heads"]
        if c.get("model_type") == "qwen" or "QWenLMHeadModel" in c.get("architectures", []):
            # Qwen-1's dynamic NTK and log-n attention only act past seq_length (8192 for Qwen-7B-Chat):
            # within it, which is all BLSP-Emo uses, plain RoPE and attention are exact
            head_dim = c.get("kv_channels", c["hidden_size"] // heads)
            if c.get("rotary_pct", 1.0) != 1.0 or head_dim * heads != c["hidden_size"]:
                raise ValueError("Qwen-1 config with partial rotary or kv_channels * heads != hidden_size")
            return cls(**common, n_heads=heads, n_kv_heads=heads, ffn_dim=c["intermediate_size"] // 2,
                       norm_eps=c.get("layer_norm_epsilon", 1e-6), rope_theta=c.get("rotary_emb_base", 10000.0),
                       qkv_bias=True, max_seq_len=c.get("seq_length", 2048), model_type="qwen")
        mt = c.get("model_type")
        if mt not in ("llama", "qwen2"):
            raise ValueError(f"model_type {mt!r} is not supported (llama, qwen2, qwen)")
        if c.get("attention_bias") or c.get("mlp_bias") or c.get("use_sliding_window"):
            raise ValueError(f"{mt} config uses attention_bias / mlp_bias / sliding window: not supported")
        if c.get("head_dim") not in (None, c["hidden_size"] // heads):
            raise ValueError(f"head_dim {c['head_dim']} != hidden_size / num_attention_heads: not supported")
        # published configs: rope_theta + rope_scaling; transformers 5 writes both into rope_parameters
        rope = dict(c.get("rope_scaling") or c.get("rope_parameters") or {})
        theta = c.get("rope_theta") or rope.get("rope_theta") or 10000.0
        rope.pop("rope_theta", None)
        rope["rope_type"] = rope.pop("type", None) or rope.get("rope_type", "default")
        if rope["rope_type"] not in ("default", "linear", "llama3"):
            raise ValueError(f"rope type {rope['rope_type']!r} is not supported (default, linear, llama3)")
        return cls(**common, n_heads=heads, n_kv_heads=c.get("num_key_value_heads") or heads,
                   ffn_dim=c["intermediate_size"], norm_eps=c.get("rms_norm_eps", 1e-6), rope_theta=theta,
                   rope_scaling=None if rope["rope_type"] == "default" else rope, qkv_bias=mt == "qwen2",
                   tie_embeddings=c.get("tie_word_embeddings", False),
                   max_seq_len=c.get("max_position_embeddings", 4096), model_type=mt)


def rope_inv_freq(cfg):
    hd = cfg.dim // cfg.n_heads
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    s = cfg.rope_scaling
    if not s:
        return inv
    if s["rope_type"] == "linear":
        return inv / s["factor"]
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between blended
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    medium = (wavelen >= old / hi) & (wavelen <= old / lo)
    return torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def apply_rope(x, cos, sin):
    # rotate-half pairs dimension i with i + hd/2 (Hugging Face's layout, so q/k weights load as stored)
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat((-x2, x1), dim=-1) * sin).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class KVCache:
    """Keys/values for every layer, preallocated (B, n_kv, max_len, head_dim) and written in place, plus
    which slots hold real tokens and each row's next RoPE position (rows differ under left padding)."""

    def __init__(self, cfg, batch, max_len, device, dtype):
        shape = (batch, cfg.n_kv_heads, max_len, cfg.dim // cfg.n_heads)
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.len, self.max_len = 0, max_len

    def update(self, layer, k, v):
        end = self.len + k.shape[2]
        self.k[layer][:, :, self.len:end] = k
        self.v[layer][:, :, self.len:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg, layer_id):
        super().__init__()
        self.layer_id, self.n_heads, self.n_kv_heads = layer_id, cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.wqkv = nn.Linear(cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * self.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, mask, cache):
        B, S, _ = x.shape
        hd, kvd = self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = self.wqkv(x).split([self.n_heads * hd, kvd, kvd], dim=-1)
        q = apply_rope(q.view(B, S, self.n_heads, hd).transpose(1, 2), cos, sin)
        k = apply_rope(k.view(B, S, self.n_kv_heads, hd).transpose(1, 2), cos, sin)
        v = v.view(B, S, self.n_kv_heads, hd).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer_id, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(y.transpose(1, 2).reshape(B, S, -1))


class FeedForward(nn.Module):
    def __init__(self, dim, ffn_dim):
        super().__init__()
        self.w_gate = nn.Linear(dim, ffn_dim, bias=False)
        self.w_up = nn.Linear(dim, ffn_dim, bias=False)
        self.w_down = nn.Linear(ffn_dim, dim, bias=False)

    def forward(self, x):
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    def __init__(self, cfg, layer_id):
        super().__init__()
        self.attention = Attention(cfg, layer_id)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, cache)
        return x + self.feed_forward(self.ffn_norm(x))


def sample(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """(B, V) logits -> (B,) ids. Greedy at temperature 0."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        p = sorted_logits.softmax(-1)
        drop = p.cumsum(-1) - p > top_p            # keep the smallest head reaching top_p, never empty
        logits = logits.masked_fill(drop.scatter(-1, order, drop), -float("inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight
        # a plain fp32 tensor, not a buffer: .to(bf16) would round the frequencies and skew far positions
        self.inv_freq = rope_inv_freq(cfg)
        # read by adapter.LoRALinear during forward: the partial-LoRA mask and its non-zero rows, found once
        self.ctx = types.SimpleNamespace(lora_mask=None, lora_rows=None)

    def embed(self, tokens):
        return self.tok_embeddings(tokens)

    def new_cache(self, batch, max_len, device=None, dtype=None):
        w = self.tok_embeddings.weight
        return KVCache(self.cfg, batch, max_len, device or w.device, dtype or w.dtype)

    def forward(self, tokens=None, *, embeds=None, valid=None, cache=None, lora_mask=None, logits_at=None):
        x = self.tok_embeddings(tokens) if embeds is None else embeds.to(self.tok_embeddings.weight.dtype)
        B, S, _ = x.shape
        start = 0 if cache is None else cache.len
        plain = valid is None and start == 0           # no padding, nothing cached: SDPA's causal kernel
        valid = torch.ones(B, S, dtype=torch.bool, device=x.device) if valid is None else valid.bool()
        pos = valid.cumsum(1) - valid.long()           # RoPE position = real tokens before this one
        keys = valid
        if cache is not None:
            if start + S > cache.max_len:
                raise ValueError(f"KV cache holds {cache.max_len} positions, {start + S} needed")
            pos = pos + cache.pos[:, None]
            cache.valid[:, start:start + S] = valid
            keys = cache.valid[:, :start + S]
        mask = None
        if not plain:
            qi = torch.arange(start, start + S, device=x.device)[:, None]
            ki = torch.arange(keys.shape[1], device=x.device)[None]
            # causal and key real; a padding query still sees itself, else its softmax row is all -inf
            # and the NaN it makes would leak through the values of later layers
            mask = (((ki <= qi) & keys[:, None]) | (ki == qi))[:, None]
        if self.inv_freq.device != x.device:
            self.inv_freq = self.inv_freq.to(x.device)
        freqs = pos[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]          # (B, 1, S, head_dim)
        cos, sin = emb.cos(), emb.sin()
        self.ctx.lora_mask = lora_mask
        self.ctx.lora_rows = None if lora_mask is None else lora_mask.reshape(-1).nonzero().squeeze(1)
        try:
            for layer in self.layers:
                x = layer(x, cos, sin, mask, cache)
        finally:
            self.ctx.lora_mask = self.ctx.lora_rows = None
        if cache is not None:
            cache.len += S
            cache.pos += valid.sum(1)
        if isinstance(logits_at, torch.Tensor):
            x = x[logits_at]
        elif logits_at == "last":
            x = x[:, -1]
        elif logits_at not in (None, "hidden"):
            raise ValueError(f"logits_at must be None, 'last', 'hidden' or a bool mask, not {logits_at!r}")
        x = self.norm(x)
        return x if isinstance(logits_at, str) and logits_at == "hidden" else self.lm_head(x)

    def prefill(self, tokens, embeds, valid, cache, lora_mask):
        return self(tokens, embeds=embeds, valid=valid, cache=cache, lora_mask=lora_mask, logits_at="last")

    def decode_one_token(self, token, cache):
        return self(token[:, None], cache=cache, logits_at="last")

    @torch.no_grad()
    def generate(self, tokens=None, *, embeds=None, valid=None, max_new_tokens=64, temperature=0.0,
                 top_k=None, top_p=None, stop_ids=None, lora_mask=None, on_token=None, generator=None):
        """Batched prompts are LEFT-padded (valid False on the left), so every row's last position is
        real. Returns each row's new tokens without the stop token."""
        x = tokens if embeds is None else embeds
        B, S = x.shape[:2]
        stop = torch.tensor(self.cfg.eos_token_id if stop_ids is None else list(stop_ids),
                            dtype=torch.long, device=x.device)
        cache = self.new_cache(B, S + max_new_tokens, device=x.device)
        logits = self.prefill(tokens, embeds, valid, cache, lora_mask)   # partial LoRA: prompt only
        done = torch.zeros(B, dtype=torch.bool, device=x.device)
        out = [[] for _ in range(B)]
        for step in range(max_new_tokens):
            token = sample(logits, temperature, top_k, top_p, generator)
            done |= torch.isin(token, stop)
            ids = token.masked_fill(done, -1)
            if on_token is not None:
                on_token(ids)
            ids = ids.tolist()                         # the one host sync per step
            for row, t in enumerate(ids):
                if t >= 0:
                    out[row].append(t)
            if all(t < 0 for t in ids) or step == max_new_tokens - 1:
                break
            logits = self.decode_one_token(token, cache)
        return out

    @classmethod
    def from_pretrained(cls, folder, dtype=None, device=None):
        hf = _json(folder, "config.json")
        cfg = DecoderConfig.from_hf(hf)
        # chat checkpoints list further stop ids (<|endoftext|> beside <|im_end|>) in generation_config
        for e in _ids(_json(folder, "generation_config.json", required=False).get("eos_token_id")):
            cfg.eos_token_id += [e] if e not in cfg.eos_token_id else []
        with torch.device("meta"):
            model = cls(cfg)
        column = 1 if cfg.model_type == "qwen" else 0
        device = pick_device(device)

        def skip(key):
            # old checkpoints persisted RoPE tables; a tied lm_head.weight is the embedding again
            return key.endswith("rotary_emb.inv_freq") or (cfg.tie_embeddings and key == "lm_head.weight")

        _load(model, folder, _checkpoint_keys(folder), lambda name: _lookup(DECODER_NAMES, name)[column],
              parse_dtype(dtype) or _config_dtype(hf), device, skip)
        if cfg.tie_embeddings:
            model.lm_head.weight = model.tok_embeddings.weight
        model.inv_freq = rope_inv_freq(cfg).to(device)    # was built on the meta device
        return model.eval()


# ours -> (llama / qwen2 name, Qwen-1 name). A tuple of names is concatenated: our fused q|k|v.
# Qwen-1's c_attn is already fused in that order; its w2 is the silu'd gate and w1 the up projection.
_L, _H = "model.layers.{}.", "transformer.h.{}."
DECODER_NAMES = {
    "tok_embeddings.weight": ("model.embed_tokens.weight", "transformer.wte.weight"),
    "layers.{}.attention_norm.weight": (_L + "input_layernorm.weight", _H + "ln_1.weight"),
    "layers.{}.attention.wqkv.weight": (tuple(_L + f"self_attn.{x}_proj.weight" for x in "qkv"),
                                        _H + "attn.c_attn.weight"),
    "layers.{}.attention.wqkv.bias": (tuple(_L + f"self_attn.{x}_proj.bias" for x in "qkv"),
                                      _H + "attn.c_attn.bias"),
    "layers.{}.attention.wo.weight": (_L + "self_attn.o_proj.weight", _H + "attn.c_proj.weight"),
    "layers.{}.ffn_norm.weight": (_L + "post_attention_layernorm.weight", _H + "ln_2.weight"),
    "layers.{}.feed_forward.w_gate.weight": (_L + "mlp.gate_proj.weight", _H + "mlp.w2.weight"),
    "layers.{}.feed_forward.w_up.weight": (_L + "mlp.up_proj.weight", _H + "mlp.w1.weight"),
    "layers.{}.feed_forward.w_down.weight": (_L + "mlp.down_proj.weight", _H + "mlp.c_proj.weight"),
    "norm.weight": ("model.norm.weight", "transformer.ln_f.weight"),
    "lm_head.weight": ("lm_head.weight", "lm_head.weight"),
}
