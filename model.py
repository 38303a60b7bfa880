"""Whisper's audio encoder and a Llama/Qwen2-style decoder (after openai/whisper, llama3, gpt-fast), named as Hugging
Face names their tensors so a folder loads strictly: a missing, extra or mis-shaped weight is an error naming it."""
import contextlib
import glob
import json
import math
import os
import sys
import timeit
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _matmul_time(dtype, device):
    # the best of 10 runs of SmolLM2's MLP matmul on one thread: what the instruction set does, whatever the load
    x, w = torch.randn(256, 576, device=device, dtype=dtype), torch.randn(1536, 576, device=device, dtype=dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    best = min(timeit.repeat(lambda: F.linear(x, w), number=1, repeat=10))
    torch.set_num_threads(threads)
    return best


def pick_dtype(name, device):
    """None keeps the checkpoint's dtype; "auto": bf16 where the device computes it natively (a CPU is timed)."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name != "auto":
        if name.lower() not in DTYPES:
            raise ValueError(f"unknown dtype {name!r}: use one of auto, {', '.join(DTYPES)}")
        return DTYPES[name.lower()]
    device = torch.device(device)
    if device.type == "cpu":
        t32, t16 = _matmul_time(torch.float32, device), _matmul_time(torch.bfloat16, device)
        fast, cpu = t16 < 0.7 * t32, torch.backends.cpu.get_cpu_capability()   # a clear margin: timings are noisy
        why = f"a bf16 matmul takes {t16 / t32:.2f}x the fp32 time on this {cpu} CPU"
    else:   # fp32 is the safe choice where the device does not say
        fast = device.type == "cuda" and torch.cuda.is_bf16_supported()
        why = f"{device.type}: {'bf16 supported' if fast else 'fp32 is the safe choice'}"
    if int(os.environ.get("RANK", 0)) == 0:   # on stderr: stdout is chat.py's reply
        print(f"dtype: {'bf16' if fast else 'fp32'} ({why})", file=sys.stderr)
    return torch.bfloat16 if fast else torch.float32


def pick_device(name=None):
    mps = torch.backends.mps.is_available()
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"))


def read_config(config_cls, folder, kind):
    """A folder's model.json: its config in our fields, which scripts/prepare.py writes once from the Hugging Face
    config.json (as it writes the tokenizer file), so that only the tooling reads that format."""
    path = Path(folder, "model.json")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; run `python scripts/prepare.py --{kind}={folder}` first, which "
                                "writes it from the folder's config.json")
    return config_cls(**json.loads(path.read_text()))


def load_pretrained(cls, cfg, folder, name_of, dtype=None, device=None):
    """name_of(checkpoint key) -> our parameter name, or None for a tensor that is not ours."""
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights found")
    with torch.device("meta"):   # no memory, no init: every weight comes from the files
        model = cls(cfg)
    state, device, dtype = {}, pick_device(device), pick_dtype(dtype, device)
    tied = getattr(cfg, "tie_embeddings", False)
    for path in files:
        with safe_open(path, "pt") as f:
            for key in f.keys():
                if (name := name_of(key)) is not None:
                    state[name] = f.get_tensor(key).to(device, dtype)
    if tied and "embed_tokens.weight" in state:
        state.setdefault("lm_head.weight", state["embed_tokens.weight"])   # tied: usually stored once
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:   # names every missing, unexpected and mis-shaped tensor
        raise ValueError(f"{folder}: {e}") from None
    if tied:
        model.lm_head.weight = model.embed_tokens.weight   # assign=True loaded the two names apart
    return model.eval()


@dataclass
class WhisperConfig:
    n_mels: int = 80
    n_ctx: int = 1500
    d_model: int = 512
    n_heads: int = 8
    n_layers: int = 6
    ffn_dim: int = 2048


class WhisperAttention(nn.Module):
    def __init__(self, d, n_heads):
        super().__init__()
        self.n_heads = n_heads
        self.q_proj, self.k_proj = nn.Linear(d, d), nn.Linear(d, d, bias=False)   # whisper's key has no bias
        self.v_proj, self.out_proj = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x, mask):
        heads = (p(x).unflatten(-1, (self.n_heads, -1)) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k, v = (h.transpose(1, 2) for h in heads)   # (B, T, n_heads, hd) -> (B, n_heads, T, hd)
        return self.out_proj(F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2))


class EncoderLayer(nn.Module):
    def __init__(self, d, n_heads, ffn_dim):
        super().__init__()
        self.self_attn_layer_norm, self.self_attn = nn.LayerNorm(d), WhisperAttention(d, n_heads)
        self.final_layer_norm = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, ffn_dim), nn.Linear(ffn_dim, d)

    def forward(self, x, mask):
        x = x + self.self_attn(self.self_attn_layer_norm(x), mask)
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class WhisperEncoder(nn.Module):
    def __init__(self, cfg: WhisperConfig):
        super().__init__()
        self.cfg = cfg
        self.conv1 = nn.Conv1d(cfg.n_mels, cfg.d_model, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(cfg.d_model, cfg.d_model, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(cfg.n_ctx, cfg.d_model)   # whisper's sinusoids, as stored
        self.layers = nn.ModuleList(EncoderLayer(cfg.d_model, cfg.n_heads, cfg.ffn_dim) for _ in range(cfg.n_layers))
        self.layer_norm = nn.LayerNorm(cfg.d_model)

    def forward(self, mel, lengths, padded=False, tone_layer=0):
        """padded: the release's mode, whisper attending over the 30 s padding; else each row is masked past its
        length, so a batch equals each clip alone. tone_layer k > 0: beside the output, layer k's frames (layer-normed,
        no weights), where a small Whisper still holds the tone its last layer has mostly dropped."""
        lengths = torch.as_tensor(lengths, device=mel.device)
        out_lengths = (lengths - 1) // 2 + 1
        # real frames: zeroing past the end reproduces the convs' zero padding, the mask hides padded keys
        frames = ((torch.arange(mel.shape[-1], device=mel.device) < lengths[:, None]) | padded)[:, None]
        x = F.gelu(self.conv1(mel.to(self.conv1.weight.dtype) * frames)) * frames
        x = F.gelu(self.conv2(x)).transpose(1, 2)
        mask = None if padded else (torch.arange(x.shape[1], device=mel.device) < out_lengths[:, None])[:, None, None]
        x = x + self.embed_positions.weight[:x.shape[1]]
        tone = None
        for k, layer in enumerate(self.layers, 1):
            x = layer(x, mask)
            if k == tone_layer:
                tone = F.layer_norm(x, x.shape[-1:])
        x = self.layer_norm(x)
        return (x if tone is None else torch.cat([x, tone], -1)), out_lengths

    @classmethod
    def from_pretrained(cls, folder, dtype=None, device=None):
        # a full Whisper nests the encoder under model.encoder., a WhisperModel under encoder.; the rest is not ours
        return load_pretrained(cls, read_config(WhisperConfig, folder, "whisper"), folder, lambda k: next(
            (k[len(p):] for p in ("model.encoder.", "encoder.") if k.startswith(p)), None), dtype, device)


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


def rope_inv_freq(cfg):
    hd = cfg.dim // cfg.n_heads
    # on the CPU in fp32, whatever the model's device and dtype: rounded, it would skew far positions
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64, device="cpu").float() / hd))
    s = cfg.rope_scaling
    if not s:
        return inv
    if s["rope_type"] == "linear":
        return inv / s["factor"]
    # Llama 3.1: long wavelengths are slowed by `factor` (smooth 0), short ones kept (1), the band between blended
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    wavelen = 2 * math.pi / inv
    smooth = ((s["original_max_position_embeddings"] / wavelen - lo) / (hi - lo)).clamp(0, 1)
    return (1 - smooth) * inv / factor + smooth * inv


def apply_rope(x, cos, sin):
    # rotate-half pairs dimension i with i + hd/2 (Hugging Face's layout, so q/k weights load as stored)
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat((-x2, x1), dim=-1) * sin).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class KVCache:
    """Every layer's keys and values, preallocated and written in place, and which positions hold real tokens."""

    def __init__(self, cfg, batch, max_len, device, dtype):
        shape = (cfg.n_layers, 2, batch, cfg.n_kv_heads, max_len, cfg.dim // cfg.n_heads)
        self.kv, self.len = torch.empty(shape, device=device, dtype=dtype), 0   # len: filled, this step included
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)

    def extend(self, keys):   # this step's real-token flags (B, S) -> every one so far
        self.valid[:, self.len:self.len + keys.shape[1]] = keys   # past its preallocated length: a shape error
        self.len += keys.shape[1]
        return self.valid[:, :self.len]

    def update(self, layer, k, v):   # this step's keys/values (B, n_kv, S, hd) -> every one so far
        k_all, v_all = self.kv[layer, :, :, :, :self.len]
        k_all[:, :, -k.shape[2]:], v_all[:, :, -k.shape[2]:] = k, v
        return k_all, v_all


def shared_start(rows):
    """How many leading ids every row shares, up to a speech slot (a negative id) and short of a row's last id."""
    n, shortest = 0, min(len(r) for r in rows)
    while n < shortest - 1 and rows[0][n] >= 0 and all(r[n] == rows[0][n] for r in rows):
        n += 1
    return n


class PrefixKV:
    """The keys and values of a prompt start every row shares, computed once (the frozen LLM gives the same ones
    every time): a batch runs only what follows. Read like a KVCache, never written, so autograd passes through."""

    def __init__(self, decoder, tokens):
        cache = KVCache(decoder.cfg, 1, len(tokens), tokens.device, decoder.embed_tokens.weight.dtype)
        with torch.no_grad():
            decoder(tokens[None], cache=cache, logits_at=-1)
        self.kv, self.len = cache.kv, cache.len

    def extend(self, keys):
        return torch.cat([keys.new_ones(keys.shape[0], self.len), keys], 1)

    def update(self, layer, k, v):
        pk, pv = (t.expand(k.shape[0], -1, -1, -1) for t in self.kv[layer, :, :1])
        return torch.cat([pk, k], 2), torch.cat([pv, v], 2)


class Grid:
    """Which positions of a (B, S) batch the decoder computes: with valid given, the real ones only (N of B * S),
    so the projections and the MLP, nearly all the work, skip the padding; attention scatters back to (B, S)."""

    def __init__(self, B, S, valid=None):
        self.shape = (B, S)
        self.index = None if valid is None else valid.reshape(-1).nonzero().squeeze(1)

    def gather(self, t):   # (B, S, ...) -> (N, ...)
        t = t.reshape(-1, *t.shape[2:])
        return t if self.index is None else t.index_select(0, self.index)

    def scatter(self, t):   # (N, ...) -> (B, S, ...), zero at the padding
        if self.index is not None:
            t = t.new_zeros(self.shape[0] * self.shape[1], *t.shape[1:]).index_copy(0, self.index, t)
        return t.view(*self.shape, *t.shape[1:])


class Attention(nn.Module):
    def __init__(self, cfg, layer_id):
        super().__init__()
        self.layer_id, self.n_heads, self.n_kv_heads = layer_id, cfg.n_heads, cfg.n_kv_heads
        hd = cfg.dim // cfg.n_heads
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(cfg.dim, n * hd, bias=cfg.qkv_bias)
                                                 for n in (cfg.n_heads, cfg.n_kv_heads, cfg.n_kv_heads))
        self.o_proj = nn.Linear(cfg.n_heads * hd, cfg.dim, bias=False)

    def forward(self, x, cos, sin, mask, cache, grid):
        """x (N, dim): the positions grid computes; attention itself runs on the (B, S) grid, padding masked."""
        q = grid.scatter(apply_rope(self.q_proj(x).unflatten(-1, (self.n_heads, -1)), cos, sin)).transpose(1, 2)
        k = grid.scatter(apply_rope(self.k_proj(x).unflatten(-1, (self.n_kv_heads, -1)), cos, sin)).transpose(1, 2)
        v = grid.scatter(self.v_proj(x).unflatten(-1, (self.n_kv_heads, -1))).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer_id, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(grid.gather(y.transpose(1, 2).flatten(2)))


class MLP(nn.Module):
    def __init__(self, dim, ffn_dim):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(dim, ffn_dim, bias=False), nn.Linear(dim, ffn_dim, bias=False)
        self.down_proj = nn.Linear(ffn_dim, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg, layer_id):
        super().__init__()
        self.input_layernorm, self.self_attn = RMSNorm(cfg.dim, cfg.norm_eps), Attention(cfg, layer_id)
        self.post_attention_layernorm, self.mlp = RMSNorm(cfg.dim, cfg.norm_eps), MLP(cfg.dim, cfg.ffn_dim)

    def forward(self, x, cos, sin, mask, cache, grid):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, grid)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.inv_freq = rope_inv_freq(cfg)   # a plain tensor, not a buffer: .to(bf16) must not round it

    def forward(self, tokens=None, *, embeds=None, valid=None, cache=None, logits_at=None):
        """valid (B, S): False at padding, which is then never computed. cache: a KVCache to fill (generation) or a
        PrefixKV the rows follow. logits_at: an index along S or a bool (B, S) mask (None: every position); only the
        rows read pay for the vocabulary head."""
        x = self.embed_tokens(tokens) if embeds is None else embeds.to(self.embed_tokens.weight.dtype)
        B, S, _ = x.shape
        start, mask = 0 if cache is None else cache.len, None
        keys = torch.ones(B, S, dtype=torch.bool, device=x.device) if valid is None else valid.bool()
        if cache is not None:
            keys = cache.extend(keys)
        if valid is not None or start > 0:             # else no padding, nothing cached: SDPA's causal kernel
            qi = torch.arange(start, start + S, device=x.device)[:, None]
            ki = torch.arange(start + S, device=x.device)
            # causal and key real; a padding query still sees itself, else its all -inf softmax row makes a NaN
            mask = (((ki <= qi) & keys[:, None]) | (ki == qi))[:, None]
        grid = Grid(B, S, None if valid is None else valid.bool())
        pos = grid.gather((keys.cumsum(1) - keys.long())[:, start:])   # RoPE position = real tokens before this one
        freqs = pos[:, None].float() * self.inv_freq.to(x.device)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]   # (N, 1, head_dim)
        cos, sin, x = emb.cos(), emb.sin(), grid.gather(x)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache, grid)
        x = grid.scatter(x)
        if logits_at is not None:
            x = x[logits_at] if isinstance(logits_at, torch.Tensor) else x[:, logits_at]
        return self.lm_head(self.norm(x))

    @torch.no_grad()
    def generate(self, tokens=None, *, embeds=None, valid=None, max_new_tokens=64, stop_ids=(), pick=None,
                 prompt_scope=contextlib.nullcontext(), on_token=None, prefix=None):
        """Prompts LEFT-padded, after a PrefixKV they all start with (if any), read inside prompt_scope (SpeechLM's
        partial LoRA) -> each row's new tokens; on_token(ids (B,), -1 for finished rows) streams them. pick(logits
        (B, V)) -> ids (B,) chooses each step's tokens (chat.sampler); None: greedy."""
        x = tokens if embeds is None else embeds
        stop = torch.tensor(list(stop_ids), dtype=torch.long, device=x.device)
        n = 0 if prefix is None else prefix.len
        cache = KVCache(self.cfg, x.shape[0], n + x.shape[1] + max_new_tokens, x.device, self.embed_tokens.weight.dtype)
        if prefix is not None:   # every row starts with it, then its own padding and the rest
            cache.kv[:, :, :, :, :n] = prefix.kv
            cache.extend(torch.ones(x.shape[0], n, dtype=torch.bool, device=x.device))
        with prompt_scope:
            logits = self(tokens, embeds=embeds, valid=valid, cache=cache, logits_at=-1)
        done, out = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device), []
        for step in range(max_new_tokens):
            token = logits.argmax(-1) if pick is None else pick(logits)
            done |= torch.isin(token, stop)
            out.append(token.masked_fill(done, -1))
            if on_token is not None:
                on_token(out[-1])
            if step == max_new_tokens - 1 or done.all():   # the one host sync per step
                break
            logits = self(token[:, None], cache=cache, logits_at=-1)
        return [[t for t in row if t >= 0] for row in torch.stack(out, 1).tolist()]

    @classmethod
    def from_pretrained(cls, folder, dtype=None, device=None):
        # HF keeps everything but lm_head under model.; old checkpoints also persisted RoPE tables
        return load_pretrained(cls, read_config(DecoderConfig, folder, "llm"), folder, lambda k: None if k.endswith(
            "rotary_emb.inv_freq") else k.removeprefix("model."), dtype, device)
