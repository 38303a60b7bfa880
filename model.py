"""The two pretrained networks: Whisper's audio encoder and a Llama/Qwen2-style decoder. Modules are named
as Hugging Face names their tensors, so a downloaded folder loads with load_state_dict after a prefix is
stripped (nanoGPT's from_pretrained), strictly: a missing, extra or mis-shaped weight is an error naming it.
After openai/whisper, meta-llama/llama3 and pytorch-labs/gpt-fast (a KV cache written in place)."""
import contextlib
import glob
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

# ----------------------------------------------------------------------------- device, dtype, weights

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
    """The fastest of repeated calls of one LLM projection of a training batch (SmolLM2's MLP shape), on one
    thread: a minimum on one core says what the instruction set does, whatever else the machine is running
    (a mean over threads that wait for each other at every barrier says mostly that)."""
    x, w = torch.randn(256, 576, device=device, dtype=dtype), torch.randn(1536, 576, device=device, dtype=dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        F.linear(x, w)   # warm-up: the first call picks and builds the kernel
        best, end = float("inf"), time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            F.linear(x, w)
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return best


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


def load_weights(model, folder, name_of, dtype=None, device=None):
    """Fill a model built on the meta device from a folder's *.safetensors (one file or shards).
    name_of(checkpoint key) -> our parameter name, or None for a tensor that is not ours."""
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights found")
    state = {}
    for path in files:
        with safe_open(path, "pt") as f:
            for key in f.keys():
                if (name := name_of(key)) is not None:
                    t = f.get_tensor(key)
                    state[name] = t.to(pick_device(device), parse_dtype(dtype) or t.dtype)
    if isinstance(model, Decoder) and model.cfg.tie_embeddings and "embed_tokens.weight" in state:
        state.setdefault("lm_head.weight", state["embed_tokens.weight"])   # tied: usually stored once
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:   # names every missing, unexpected and mis-shaped tensor
        raise ValueError(f"{folder}: {e}") from None
    return model.eval()


def read_config(folder, name="config.json"):
    with open(os.path.join(folder, name)) as f:
        return json.load(f)


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


class WhisperAttention(nn.Module):
    def __init__(self, d, n_heads):
        super().__init__()
        self.n_heads = n_heads
        self.q_proj, self.k_proj = nn.Linear(d, d), nn.Linear(d, d, bias=False)   # whisper's key has no bias
        self.v_proj, self.out_proj = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x, mask):
        B, T, D = x.shape
        q, k, v = (p(x).view(B, T, self.n_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, T, D))


class EncoderLayer(nn.Module):
    def __init__(self, d, n_heads, ffn_dim):
        super().__init__()
        self.self_attn_layer_norm, self.self_attn = nn.LayerNorm(d), WhisperAttention(d, n_heads)
        self.final_layer_norm = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, ffn_dim), nn.Linear(ffn_dim, d)

    def forward(self, x, mask=None):
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
        x = F.gelu(self.conv2(x)).transpose(1, 2) + self.embed_positions.weight[:T_out]
        for layer in self.layers:
            x = layer(x, mask)
        return self.layer_norm(x), out_lengths

    @classmethod
    def from_pretrained(cls, folder, dtype=None, device=None):
        with torch.device("meta"):
            model = cls(WhisperConfig.from_hf(read_config(folder)))
        # a full Whisper checkpoint nests the encoder under model.encoder., a WhisperModel under encoder.;
        # the text decoder is not ours to load
        return load_weights(model, folder, lambda k: next(
            (k[len(p):] for p in ("model.encoder.", "encoder.") if k.startswith(p)), None), dtype, device)


# ----------------------------------------------------------------------------- Llama / Qwen2 decoder

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
    eos_token_id: list[int] = field(default_factory=list)

    @classmethod
    def from_hf(cls, c, generation_config=None):
        mt, heads = c.get("model_type"), c["num_attention_heads"]
        if mt not in ("llama", "qwen2"):
            raise ValueError(f"model_type {mt!r} is not supported (llama, qwen2; the release's Qwen-1 is "
                             "converted by scripts/release.py)")
        if c.get("attention_bias") or c.get("mlp_bias") or c.get("use_sliding_window"):
            raise ValueError(f"{mt} config uses attention_bias / mlp_bias / sliding window: not supported")
        if c.get("head_dim") not in (None, c["hidden_size"] // heads):
            raise ValueError(f"head_dim {c['head_dim']} != hidden_size / num_attention_heads: not supported")
        # published configs: rope_theta + rope_scaling; transformers 5 writes both into rope_parameters
        rope = dict(c.get("rope_scaling") or c.get("rope_parameters") or {})
        theta = c.get("rope_theta") or rope.pop("rope_theta", None) or 10000.0
        rope.pop("rope_theta", None)
        rope["rope_type"] = rope.pop("type", None) or rope.get("rope_type", "default")
        if rope["rope_type"] not in ("default", "linear", "llama3"):
            raise ValueError(f"rope type {rope['rope_type']!r} is not supported (default, linear, llama3)")
        # chat checkpoints list further stop ids (<|endoftext|> beside <|im_end|>) in generation_config
        eos = []
        for x in (c.get("eos_token_id"), (generation_config or {}).get("eos_token_id")):
            eos += [e for e in ([] if x is None else [x] if isinstance(x, int) else x) if e not in eos]
        return cls(vocab_size=c["vocab_size"], dim=c["hidden_size"], n_layers=c["num_hidden_layers"],
                   n_heads=heads, n_kv_heads=c.get("num_key_value_heads") or heads, ffn_dim=c["intermediate_size"],
                   norm_eps=c.get("rms_norm_eps", 1e-6), rope_theta=theta,
                   rope_scaling=None if rope["rope_type"] == "default" else rope, qkv_bias=mt == "qwen2",
                   tie_embeddings=c.get("tie_word_embeddings", False),
                   max_seq_len=c.get("max_position_embeddings", 4096), eos_token_id=eos)


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
        self.head_dim = hd = cfg.dim // cfg.n_heads
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * hd, cfg.dim, bias=False)

    def forward(self, x, cos, sin, mask, cache):
        B, S, _ = x.shape
        q = apply_rope(self.q_proj(x).view(B, S, self.n_heads, -1).transpose(1, 2), cos, sin)
        k = apply_rope(self.k_proj(x).view(B, S, self.n_kv_heads, -1).transpose(1, 2), cos, sin)
        v = self.v_proj(x).view(B, S, self.n_kv_heads, -1).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer_id, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, S, -1))


class MLP(nn.Module):
    def __init__(self, dim, ffn_dim):
        super().__init__()
        self.gate_proj = nn.Linear(dim, ffn_dim, bias=False)
        self.up_proj = nn.Linear(dim, ffn_dim, bias=False)
        self.down_proj = nn.Linear(ffn_dim, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg, layer_id):
        super().__init__()
        self.input_layernorm, self.self_attn = RMSNorm(cfg.dim, cfg.norm_eps), Attention(cfg, layer_id)
        self.post_attention_layernorm, self.mlp = RMSNorm(cfg.dim, cfg.norm_eps), MLP(cfg.dim, cfg.ffn_dim)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


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
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # a plain fp32 tensor, not a buffer: .to(bf16) would round the frequencies and skew far positions
        self.inv_freq = rope_inv_freq(cfg)

    def forward(self, tokens=None, *, embeds=None, valid=None, cache=None, logits_at=None):
        """tokens (B, S) or embeds (B, S, dim); valid (B, S) False at padding. logits_at: None (every
        position), "last", or a bool (B, S) mask: only the rows a loss reads pay for the vocabulary head."""
        x = self.embed_tokens(tokens) if embeds is None else embeds.to(self.embed_tokens.weight.dtype)
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
        freqs = pos[..., None].float() * self.inv_freq.to(x.device)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]          # (B, 1, S, head_dim)
        cos, sin = emb.cos(), emb.sin()
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.len += S
            cache.pos += valid.sum(1)
        if isinstance(logits_at, torch.Tensor):
            x = x[logits_at]
        elif logits_at == "last":
            x = x[:, -1]
        elif logits_at is not None:
            raise ValueError(f"logits_at must be None, 'last' or a bool mask, not {logits_at!r}")
        return self.lm_head(self.norm(x))

    @torch.no_grad()
    def generate(self, tokens=None, *, embeds=None, valid=None, max_new_tokens=64, temperature=0.0, top_k=None,
                 top_p=None, stop_ids=None, prompt_scope=contextlib.nullcontext(), on_token=None, generator=None):
        """Batched prompts are LEFT-padded (valid False on the left), so every row's last position is
        real. The prompt is read inside prompt_scope (SpeechLM's partial LoRA). Returns each row's new
        tokens without the stop token; on_token(ids (B,), -1 for finished rows) streams them."""
        x = tokens if embeds is None else embeds
        B, S = x.shape[:2]
        stop = torch.tensor(self.cfg.eos_token_id if stop_ids is None else list(stop_ids),
                            dtype=torch.long, device=x.device)
        w = self.embed_tokens.weight
        cache = KVCache(self.cfg, B, S + max_new_tokens, x.device, w.dtype)
        with prompt_scope:
            logits = self(tokens, embeds=embeds, valid=valid, cache=cache, logits_at="last")
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
            logits = self(token[:, None], cache=cache, logits_at="last")
        return out

    @classmethod
    def from_pretrained(cls, folder, dtype=None, device=None):
        gen = os.path.isfile(os.path.join(folder, "generation_config.json"))
        cfg = DecoderConfig.from_hf(read_config(folder), read_config(folder, "generation_config.json") if gen else None)
        with torch.device("meta"):
            model = cls(cfg)
        # HF keeps everything but lm_head under model.; old checkpoints also persisted RoPE tables
        load_weights(model, folder, lambda k: None if k.endswith("rotary_emb.inv_freq") else k.removeprefix("model."),
                     dtype, device)
        if cfg.tie_embeddings:
            model.lm_head.weight = model.embed_tokens.weight   # assign=True loaded the two names apart
        model.inv_freq = rope_inv_freq(cfg)                     # was built on the meta device
        return model
