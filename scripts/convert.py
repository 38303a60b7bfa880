"""
Format readers for prepare.py: turn the re-published weights into the Hugging Face folders that
model.py and data.py read.

- CTranslate2 `model.bin` (Whisper) -> transformers Whisper config.json + model.encoder.* safetensors.
  Our own reader (the format is a flat list of named arrays); no ctranslate2 at run time.
- GGUF (llama / qwen2) -> config.json, generation_config.json, model.safetensors and the byte-level
  BPE tokenizer files, dequantized with llama.cpp's own `gguf` package.
- A Hugging Face config.json (Whisper, llama / qwen2) -> model.json, the fields of model.py's configs, checked
  for what model.py implements.
- Any of the tokenizer layouts (tokenizer.json, vocab.json + merges.txt, Qwen-1's qwen.tiktoken, Llama-3's
  tokenizer.model) -> tokenizer.tiktoken + tokenizer.tiktoken.json, the two files tokenizer.Tokenizer reads.
"""
import base64
import binascii
import dataclasses
import json
import os
import re
import struct
import sys
from functools import lru_cache

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: data.py, model.py

from model import DecoderConfig, WhisperConfig
from trainer import atomic_write


class FormatError(ValueError):
    """A weights file that is not what it should be; the message names the file."""


def _write(path, content):
    """Text as is, anything else as JSON."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(content if isinstance(content, str) else json.dumps(content, indent=2, ensure_ascii=False) + "\n")


def _to_torch(a, dtype):
    # views into the read-only file mapping are copied: torch wants writable memory
    a = np.ascontiguousarray(a) if a.flags.writeable else np.array(a)
    return torch.from_numpy(a).to(dtype)


# -----------------------------------------------------------------------------
# Hugging Face config.json -> model.json (model.py's config fields), once per folder

def whisper_config_from_hf(c):
    if c.get("activation_function", "gelu") != "gelu" or c.get("scale_embedding", False):
        raise ValueError("only Whisper's own gelu encoder without embedding scale is supported")
    return WhisperConfig(c["num_mel_bins"], c["max_source_positions"], c["d_model"], c["encoder_attention_heads"],
                         c["encoder_layers"], c["encoder_ffn_dim"])


def decoder_config_from_hf(c):
    mt, heads = c.get("model_type"), c["num_attention_heads"]
    if mt not in ("llama", "qwen2"):
        raise ValueError(f"model_type {mt!r} is not supported (llama, qwen2; a Qwen-1 folder is converted to "
                         "Qwen2's names by `python scripts/prepare.py --llm=PATH`, with scripts/release.py)")
    if c.get("attention_bias") or c.get("mlp_bias") or c.get("use_sliding_window"):
        raise ValueError(f"{mt} config uses attention_bias / mlp_bias / sliding window: not supported")
    if c.get("head_dim") not in (None, c["hidden_size"] // heads):
        raise ValueError(f"head_dim {c['head_dim']} != hidden_size / num_attention_heads: not supported")
    rope = dict(c.get("rope_scaling") or c.get("rope_parameters") or {})   # transformers 5: theta in there too
    kind = rope["rope_type"] = rope.pop("type", None) or rope.get("rope_type", "default")
    if kind not in ("default", "linear", "llama3"):
        raise ValueError(f"rope type {kind!r} is not supported (default, linear, llama3)")
    return DecoderConfig(c["vocab_size"], c["hidden_size"], c["num_hidden_layers"], heads,
                         c.get("num_key_value_heads") or heads, c["intermediate_size"], c.get("rms_norm_eps", 1e-6),
                         c.get("rope_theta") or rope.get("rope_theta") or 10000.0, None if kind == "default" else rope,
                         qkv_bias=mt == "qwen2", tie_embeddings=c.get("tie_word_embeddings", False),
                         max_seq_len=c.get("max_position_embeddings", 4096))


def write_config(folder, kind):
    """The folder's config.json (kind "whisper" or "llm") -> model.json, the file model.py reads."""
    path = os.path.join(folder, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = (whisper_config_from_hf if kind == "whisper" else decoder_config_from_hf)(json.load(f))
    except KeyError as e:
        raise FormatError(f"{path}: no {e.args[0]}") from None
    except ValueError as e:
        raise FormatError(f"{path}: {e}") from None
    atomic_write(os.path.join(folder, "model.json"), lambda tmp: _write(tmp, dataclasses.asdict(cfg)))
    return cfg


# -----------------------------------------------------------------------------
# CTranslate2

# type ids in the order of CTranslate2's DataType enum (include/ctranslate2/types.h). numpy has no
# bfloat16: those arrays get a one-field record dtype that says so, and ct2_tensor reinterprets them.
BF16 = np.dtype([("bfloat16", "<u2")])
CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: BF16}


def read_ct2(path):
    """CTranslate2 model.bin -> (spec name, spec revision, {name: np.ndarray}), arrays memory-mapped.

    Layout (python/ctranslate2/specs/model_spec.py `_serialize`, src/models/model.cc `load`), little
    endian: u32 binary version, string spec name, u32 spec revision, u32 count, then per variable:
    string name, u8 rank, u32 dims[rank], u8 dtype id, u32 byte count, raw bytes; then u32 count of
    aliases, each (string alias, string target). A string is u16 length (counting a trailing NUL) +
    bytes. Versions 4 to 6 share this layout (older ones stored item sizes instead of type ids).
    """
    buf = np.memmap(path, dtype=np.uint8, mode="r")
    pos = 0

    def take(fmt, n=None):  # struct values, or n raw bytes
        nonlocal pos
        size = struct.calcsize(fmt) if n is None else n
        if pos + size > len(buf):
            raise FormatError(f"{path}: truncated CTranslate2 file (ends at byte {len(buf)})")
        out = struct.unpack_from(fmt, buf, pos) if n is None else buf[pos:pos + n]
        pos += size
        return out

    def string():
        return bytes(take("", take("<H")[0])[:-1]).decode("utf-8")

    version = take("<I")[0]
    if not 4 <= version <= 6:
        raise FormatError(f"{path}: CTranslate2 binary version {version}, expected 4..6")
    spec, revision = string(), take("<I")[0]
    variables = {}
    for _ in range(take("<I")[0]):
        name = string()
        shape = take("<" + "I" * take("<B")[0])
        type_id, nbytes = take("<BI")
        if type_id not in CT2_DTYPES:
            raise FormatError(f"{path}: variable {name} has unknown dtype id {type_id}")
        a = take("", nbytes).view(CT2_DTYPES[type_id])
        if a.size != int(np.prod(shape)):
            raise FormatError(f"{path}: variable {name} has {a.size} values for shape {shape}")
        variables[name] = a.reshape(shape)
    for _ in range(take("<I")[0]):
        alias, target = string(), string()
        if target in variables:  # the runtime ignores dangling aliases; so do we
            variables[alias] = variables[target]
    return spec, revision, variables


def ct2_tensor(variables, name, dtype=torch.float32):
    """One variable as a float torch tensor; int8/int16 weights are divided by their saved scale
    (CTranslate2 stores round(w * scale), one scale per output row, or one per tensor for int16)."""
    a = variables[name]
    if a.dtype == BF16:
        return torch.from_numpy(np.array(a).view(np.uint16)).view(torch.bfloat16).to(dtype)
    t = torch.from_numpy(np.array(a))
    if a.dtype in (np.int8, np.int16):
        scale = torch.from_numpy(np.array(variables[name + "_scale"])).float()
        t = t.float() / scale.reshape(-1, *([1] * (t.dim() - 1)))
    return t.to(dtype)


def whisper_config(v, dtype):
    """A transformers WhisperConfig dict. A CTranslate2 Whisper keeps its sizes only as array shapes
    (and num_heads as scalars), so that is where they are read from."""
    def count(prefix):
        return len({m[1] for k in v if (m := re.match(prefix + r"/layer_(\d+)/", k))})

    n_enc, n_dec = count("encoder"), count("decoder")
    side = "decoder" if n_dec else "encoder"  # an encoder-only file: describe a symmetric decoder
    vocab = v["decoder/embeddings/weight"].shape[0] if "decoder/embeddings/weight" in v else 51865
    eot = 50257 if vocab >= 51865 else 50256  # .en vocabularies lack one token before <|endoftext|>
    return {
        "architectures": ["WhisperForConditionalGeneration"], "model_type": "whisper",
        "num_mel_bins": int(v["encoder/conv1/weight"].shape[1]), "d_model": int(v["encoder/conv1/weight"].shape[0]),
        "encoder_layers": n_enc, "num_hidden_layers": n_enc,
        "encoder_attention_heads": int(v["encoder/num_heads"]),
        "encoder_ffn_dim": int(v["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        "max_source_positions": int(v["encoder/position_encodings/encodings"].shape[0]),
        "decoder_layers": n_dec or n_enc, "decoder_attention_heads": int(v[f"{side}/num_heads"]),
        "decoder_ffn_dim": int(v[f"{side}/layer_0/ffn/linear_0/weight"].shape[0]),
        "max_target_positions": int(v["decoder/position_encodings/encodings"].shape[0]) if n_dec else 448,
        "vocab_size": int(vocab), "activation_function": "gelu", "scale_embedding": False,
        "bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot, "decoder_start_token_id": eot + 1,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


# CTranslate2 Whisper encoder name -> Hugging Face name, both after their encoder prefix. CTranslate2's
# LayerNorms are gamma/beta; self_attention/linear_0 (the fused q|k|v) is split apart below.
CT2_WHISPER = {
    "conv1/weight": "conv1.weight", "conv1/bias": "conv1.bias",
    "conv2/weight": "conv2.weight", "conv2/bias": "conv2.bias",
    "position_encodings/encodings": "embed_positions.weight",
    "layer_norm/gamma": "layer_norm.weight", "layer_norm/beta": "layer_norm.bias",
    **{f"layer_{{}}/{ct}/{a}": f"layers.{{}}.{hf}.{b}" for ct, hf in [
        ("self_attention/layer_norm", "self_attn_layer_norm"), ("ffn/layer_norm", "final_layer_norm")]
       for a, b in (("gamma", "weight"), ("beta", "bias"))},
    **{f"layer_{{}}/{ct}/{p}": f"layers.{{}}.{hf}.{p}" for ct, hf in [
        ("self_attention/linear_1", "self_attn.out_proj"), ("ffn/linear_0", "fc1"), ("ffn/linear_1", "fc2")]
       for p in ("weight", "bias")},
}


def whisper_encoder_from_ct2(path, dtype=None):
    """CTranslate2 Whisper model.bin -> (config dict, {model.encoder.* name: tensor}).

    The names map one to one (WhisperLoader in ctranslate2/converters/transformers.py writes them),
    with one fusion to undo: q, k and v are concatenated row-wise into self_attention/linear_0, and
    since Whisper's k_proj has no bias, its third of the fused bias is zeros. Conv weights keep
    torch's (out, in, kernel) layout; nothing is transposed or rescaled.
    dtype None keeps the file's float type (float16 for the published files).
    """
    spec, _, v = read_ct2(path)
    if spec != "WhisperSpec":
        raise FormatError(f"{path}: a CTranslate2 {spec}, expected a WhisperSpec")
    if dtype is None:  # the type of a never-quantized variable is the model's float type
        dtype = {np.dtype(np.float16): torch.float16, BF16: torch.bfloat16}.get(
            v["encoder/layer_norm/gamma"].dtype, torch.float32)
    try:
        cfg = whisper_config(v, dtype)
    except KeyError as e:
        raise FormatError(f"{path}: no variable {e.args[0]}") from None
    d, out = cfg["d_model"], {}
    for name in v:
        if not name.startswith("encoder/") or name == "encoder/num_heads" or name.endswith("_scale"):
            continue
        key = name.removeprefix("encoder/")
        m = re.match(r"layer_(\d+)/", key)
        layer, generic = (m[1], "layer_{}/" + key[m.end():]) if m else (None, key)
        t = ct2_tensor(v, name, dtype)
        if generic == "layer_{}/self_attention/linear_0/weight":
            if t.shape != (3 * d, d):
                raise FormatError(f"{path}: {name} has shape {tuple(t.shape)}, expected a fused q|k|v {(3 * d, d)}")
            for j, x in enumerate("qkv"):
                out[f"model.encoder.layers.{layer}.self_attn.{x}_proj.weight"] = t[j * d:(j + 1) * d].clone()
        elif generic == "layer_{}/self_attention/linear_0/bias":
            if t[d:2 * d].any():
                raise FormatError(f"{path}: {name} has a nonzero k bias, which Whisper's k_proj does not have")
            out[f"model.encoder.layers.{layer}.self_attn.q_proj.bias"] = t[:d].clone()
            out[f"model.encoder.layers.{layer}.self_attn.v_proj.bias"] = t[2 * d:].clone()
        elif generic in CT2_WHISPER:
            out["model.encoder." + CT2_WHISPER[generic].format(layer)] = t
        else:  # an unmapped variable (a queries_scale, say) would change the maths: refuse it
            raise FormatError(f"{path}: unexpected encoder variable {name}")
    want = [hf.format(i) for hf in CT2_WHISPER.values() for i in range(cfg["encoder_layers"]) if "{}" in hf or i == 0]
    want += [f"layers.{i}.self_attn.{x}" for i in range(cfg["encoder_layers"])
             for x in ("q_proj.weight", "k_proj.weight", "v_proj.weight", "q_proj.bias", "v_proj.bias")]
    missing = [k for k in want if "model.encoder." + k not in out]
    if missing:
        raise FormatError(f"{path}: no variable for model.encoder.{missing[0]}")
    return cfg, out


def convert_whisper(path, out_dir, dtype=None):
    """Write config.json (+ model.json) and model.safetensors (model.encoder.* only) for a CTranslate2 Whisper."""
    cfg, sd = whisper_encoder_from_ct2(path, dtype)
    save_file(sd, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    _write(os.path.join(out_dir, "config.json"), cfg)
    write_config(out_dir, "whisper")
    return cfg


# -----------------------------------------------------------------------------
# Tokenizers -> tokenizer.tiktoken (Qwen-1's rank file: base64 token, rank) + tokenizer.tiktoken.json (the rest)

# Pre-tokenizer regexes. Qwen-1/Qwen2 ship theirs (Qwen2's tokenizer.json Split pattern is this same one);
# Llama-3 differs only in grouping digits by up to three; GPT-2 is tokenizers' ByteLevel default.
QWEN_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# SmolLM2 (llama.cpp pre "smollm") runs two pre-tokenizers: Digits(individual) then the GPT-2 regex on each
# piece. One regex does the same: a digit stands alone and never takes the space before it, and a digit counts
# as the end of the text for the whitespace lookahead (a space run before a digit ends its piece).
SMOLLM_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""

QWEN1_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]
LLAMA3_SPECIALS = [  # meta-llama/llama3 tokenizer.py: 256 specials after the ranks
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>", "<|reserved_special_token_3|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|reserved_special_token_4|>", "<|eot_id|>"] + [f"<|reserved_special_token_{i}|>" for i in range(5, 251)]
STOP_NAMES = ["<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end_of_text|>", "<|eom_id|>"]
PAD_NAMES = ["<|endoftext|>", "<|finetune_right_pad_id|>", "<|end_of_text|>"]


@lru_cache(maxsize=None)
def byte_decoder():
    # GPT-2's byte-level BPE writes each byte as a printable char: printable latin-1 bytes as themselves, the
    # rest as chr(256 + k) in byte order. Invert that table.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    rest = [b for b in range(256) if b not in bs]
    return {chr(c): b for b, c in zip(bs + rest, bs + [256 + k for k in range(len(rest))])}


def _read_json(path):
    return json.loads(open(path, encoding="utf-8").read()) if os.path.isfile(path) else None


def read_tiktoken(path):
    ranks = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                tok, rank = line.split()
                ranks[base64.b64decode(tok, validate=True)] = int(rank)
            except (ValueError, binascii.Error):
                raise FormatError(f"{path}:{n}: not a tiktoken rank line ('<base64 token> <rank>')") from None
    return ranks


def _bpe_ranks(vocab, merges, where, unk=None):
    """HF byte-level vocab + merges -> (tiktoken ranks in merge order, the vocab id of each rank, id -> bytes).
    tiktoken merges the adjacent pair whose *result* has the lowest rank; HF BPE merges the pair whose *rule*
    comes first. They agree when a token's rank is the index of the rule that made it, so ranks are the 256
    single bytes (in id order) and then the merges in file order, whatever ids the vocab gives them."""
    dec = byte_decoder()

    def to_bytes(s):
        return bytes(dec[c] for c in s) if all(c in dec for c in s) else None

    id_bytes = {i: b for s, i in vocab.items() if (b := to_bytes(s)) is not None}
    singles = sorted((i, b) for i, b in id_bytes.items() if len(b) == 1)
    # Real vocabs can lack a few bytes (SmolLM2 lacks 21: six rare controls, bytes never in UTF-8). HF emits unk
    # for them, or drops them when there is no unk; tiktoken needs every byte ranked, so they rank as `unk`
    # (None: dropped after encoding). One difference stays: HF drops before merging, so its neighbours may
    # merge across a dropped byte; here they cannot (only for such a control byte inside a punctuation run).
    missing = sorted(set(range(256)) - {b[0] for _, b in singles})
    ranks = {b: r for r, (_, b) in enumerate(singles + [(unk, bytes([m])) for m in missing])}
    rank_ids = [i for i, _ in singles] + [unk] * len(missing)
    for n, (a, b) in enumerate(merges, 1):
        if a + b not in vocab:
            raise FormatError(f"{where}: merge {n} ({a!r} {b!r}) makes a token that is not in the vocab")
        tok = to_bytes(a + b)
        if tok not in ranks:
            ranks[tok] = len(ranks)
            rank_ids.append(vocab[a + b])
    return ranks, rank_ids, id_bytes


def _pattern_from_json(pre, normalizer, where):
    """tokenizer.json's pre_tokenizer -> one tiktoken regex; its normalizer -> whether to NFC first (Qwen2)."""
    steps = pre["pretokenizers"] if pre and pre["type"] == "Sequence" else [pre] if pre else []
    split, byte_regex, digits = None, False, False
    for s in steps:
        if s["type"] == "Split" and s.get("behavior") == "Isolated" and not s.get("invert"):
            p = s["pattern"]
            split = p["Regex"] if "Regex" in p else re.escape(p["String"])
        elif s["type"] == "ByteLevel" and not s.get("add_prefix_space"):
            byte_regex = s.get("use_regex", True)
        elif s["type"] == "Digits" and s.get("individual_digits"):
            digits = True
        else:
            raise FormatError(f"{where}: unsupported pre-tokenizer step {s}")
    norms = normalizer["normalizers"] if normalizer and normalizer["type"] == "Sequence" else [normalizer]
    if any(n and n["type"] != "NFC" for n in norms):
        raise FormatError(f"{where}: unsupported normalizer {normalizer}")
    nfc = any(n and n["type"] == "NFC" for n in norms)
    if split and not byte_regex and not digits:
        return split, nfc
    if byte_regex and not split:
        return (SMOLLM_PATTERN if digits else GPT2_PATTERN), nfc
    raise FormatError(f"{where}: unsupported pre-tokenizer combination {pre}")


def read_tokenizer(folder):
    """A folder's own tokenizer files -> (ranks, meta): tiktoken's bytes -> rank, and what tokenizer.tiktoken.json
    holds: the split regex, NFC or not, the added tokens (name -> id; `plain` ones are matched whole like the
    rest but are not specials), the vocab id of each rank (None when ids are ranks), chat format, stops, pad."""
    config = _read_json(os.path.join(folder, "tokenizer_config.json")) or {}
    if os.path.isfile(os.path.join(folder, "chat_template.jinja")):  # newer transformers save the template alone
        config.setdefault("chat_template", open(os.path.join(folder, "chat_template.jinja"), encoding="utf-8").read())
    added = {v["content"]: (int(i), v.get("special", True)) for i, v in (config.get("added_tokens_decoder") or {}).items()}
    rank_ids = id_bytes = None
    template = None
    if os.path.isfile(where := os.path.join(folder, "tokenizer.json")):
        tj = _read_json(where)
        model = tj["model"]
        if model.get("type", "BPE") != "BPE":
            raise FormatError(f"{where}: model type {model.get('type')} is not BPE")
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        ranks, rank_ids, id_bytes = _bpe_ranks(model["vocab"], merges, where, model["vocab"].get(model.get("unk_token")))
        pattern, nfc = _pattern_from_json(tj.get("pre_tokenizer"), tj.get("normalizer"), where)
        added.update({t["content"]: (t["id"], t.get("special", False)) for t in tj.get("added_tokens", [])})
    elif os.path.isfile(os.path.join(folder, "vocab.json")) and os.path.isfile(where := os.path.join(folder, "merges.txt")):
        vocab = _read_json(os.path.join(folder, "vocab.json"))
        lines = open(where, encoding="utf-8").read().splitlines()
        merges = [tuple(ln.split(" ")) for ln in lines if ln and not ln.startswith("#version")]
        ranks, rank_ids, id_bytes = _bpe_ranks(vocab, merges, where)
        # no pre_tokenizer written down: the family decides (what transformers' slow tokenizers hard-code)
        model_type = (_read_json(os.path.join(folder, "config.json")) or {}).get("model_type", "")
        if "Qwen2" in str(config.get("tokenizer_class")) or model_type.startswith("qwen2"):
            pattern, nfc = QWEN_PATTERN, True
        elif model_type == "llama":  # the byte-level BPE llama we use is SmolLM2
            pattern, nfc = SMOLLM_PATTERN, False
        else:
            pattern, nfc = GPT2_PATTERN, False
        if not added:  # no added-token list: control tokens that sit in the vocab, as SmolLM2's do
            reachable = set(rank_ids)
            added = {s: (i, True) for s, i in vocab.items() if re.fullmatch(r"<\|[^|]+\|>", s) and i not in reachable}
    elif os.path.isfile(where := os.path.join(folder, "qwen.tiktoken")):  # Qwen-1: tokenization_qwen.py NFCs
        ranks, pattern, nfc, template = read_tiktoken(where), QWEN_PATTERN, True, "chatml"
        added = added or {s: (len(ranks) + k, True) for k, s in enumerate(QWEN1_SPECIALS)}
    elif os.path.isfile(where := os.path.join(folder, "tokenizer.model")):  # Llama-3 original/tokenizer.model
        ranks, pattern, nfc, template = read_tiktoken(where), LLAMA3_PATTERN, False, "llama3"
        added = added or {s: (len(ranks) + k, True) for k, s in enumerate(LLAMA3_SPECIALS)}
    else:
        raise FormatError(f"{folder}: no tokenizer.json, vocab.json + merges.txt, qwen.tiktoken or tokenizer.model")

    by_name = {s: i for s, (i, _) in added.items()}
    ct = config.get("chat_template") or ""
    if isinstance(ct, list):  # several named templates
        ct = " ".join(t.get("template", "") for t in ct)
    if "<|start_header_id|>" in ct:
        template = "llama3"
    elif "<|im_start|>" in ct:
        template = "chatml"
    elif template is None:
        template = "chatml" if "<|im_start|>" in added else "llama3" if "<|start_header_id|>" in added else None

    def name_of(v):  # tokenizer_config writes tokens as strings or AddedToken dicts
        return v.get("content") if isinstance(v, dict) else v

    stops = [n for n in STOP_NAMES if n in by_name]
    eos = name_of(config.get("eos_token"))
    if eos in by_name and eos not in stops:
        stops.append(eos)
    eos_ids = [by_name[n] for n in stops]
    pad = next((n for n in [name_of(config.get("pad_token"))] + PAD_NAMES if n in by_name), None)
    # bytes of the vocab entries the ranks do not say (tokens no merge makes): the model may still emit them
    from_ranks = {i: b for b, r in ranks.items() if (i := rank_ids[r] if rank_ids else r) is not None}
    decode_only = {str(i): base64.b64encode(b).decode() for i, b in (id_bytes or {}).items() if from_ranks.get(i) != b}
    return ranks, {
        "pattern": pattern, "nfc": nfc, "added": by_name, "plain": [s for s, (_, special) in added.items() if not special],
        "ids": None if rank_ids is None or rank_ids == list(range(len(ranks))) else rank_ids,
        "decode_only": decode_only, "template": template, "eos_ids": eos_ids,
        "pad_id": by_name[pad] if pad else (eos_ids[0] if eos_ids else 0),
    }


def write_tokenizer(folder):
    """Reconcile the folder's tokenizer files once, into the two files tokenizer.Tokenizer reads."""
    ranks, meta = read_tokenizer(folder)
    lines = "".join(f"{base64.b64encode(b).decode()} {r}\n" for b, r in ranks.items())
    atomic_write(os.path.join(folder, "tokenizer.tiktoken"), lambda tmp: _write(tmp, lines))
    atomic_write(os.path.join(folder, "tokenizer.tiktoken.json"), lambda tmp: _write(tmp, json.dumps(meta) + "\n"))


# -----------------------------------------------------------------------------
# GGUF

GGUF_NAMES = {  # llama.cpp tensor name (after blk.N.) -> Hugging Face name (after model.layers.N.)
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
GGUF_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight"}
# architecture -> (model class, tokenizer class). transformers 5 rebuilds a named class's pre-tokenizer
# from the class (GPT2Tokenizer's would drop SmolLM2's digit split), so a llama-architecture byte-level
# BPE, whose split varies with tokenizer.ggml.pre, says PreTrainedTokenizerFast: tokenizer.json as written.
ARCHS = {"llama": ("LlamaForCausalLM", "PreTrainedTokenizerFast"), "qwen2": ("Qwen2ForCausalLM", "Qwen2Tokenizer")}

# The pre-tokenizers of the hub tokenizers these vocabularies were trained with, by tokenizer.ggml.pre
# (llama.cpp's llama-vocab.cpp lists the same ones), their split regexes data.py's. SmolLM2 (StarCoder
# lineage) isolates every digit and then splits GPT-2 style; Qwen2 NFC-normalizes and splits with its own.
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}


def _split(regex):
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}, _BYTE_LEVEL]}


PRE_TOKENIZERS = {  # pre -> (normalizer, pre_tokenizer)
    "smollm": (None, {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, dict(_BYTE_LEVEL, use_regex=True)]}),
    "qwen2": ({"type": "NFC"}, _split(QWEN_PATTERN)),
    "llama-bpe": (None, _split(LLAMA3_PATTERN)),
    "default": (None, dict(_BYTE_LEVEL, use_regex=True)),  # GPT-2's
}


def _gguf_reader(path):
    import gguf  # prepare-only dependency

    class Reader(gguf.GGUFReader):
        # The reader slices its np.memmap once per token string, and every memmap slice runs a Python
        # __array_finalize__: parsing through a plain ndarray view of the same mapping is several times faster
        # (and dequantizing plain arrays skips the same cost per block).
        @property
        def data(self):
            return self._plain

        @data.setter
        def data(self, mm):
            self._plain = mm.view(np.ndarray)

    try:
        return Reader(path)
    except Exception as e:  # the reader raises bare ValueErrors/struct errors on a bad file
        raise FormatError(f"{path}: not a readable GGUF file ({e})") from e


def gguf_metadata(reader):
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def undo_rope_permute(w, n_heads):
    """llama.cpp's convert_hf_to_gguf.py reorders the rows of each head of q and k from Hugging Face's
    rotate-half layout (first half, second half) to ggml's interleaved pairs; this is its inverse."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _f32(x):
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.999999747378752e-06)."""
    return float(np.format_float_positional(np.float32(x), unique=True))


def llm_config(meta, tensor_names, vocab, dtype, path):
    """A transformers llama / qwen2 config.json dict from the GGUF metadata."""
    arch = meta.get("general.architecture")
    if arch not in ARCHS:
        raise FormatError(f"{path}: architecture {arch!r} is not supported (only {sorted(ARCHS)})")

    def key(k, default=KeyError):
        if f"{arch}.{k}" not in meta and default is KeyError:
            raise FormatError(f"{path}: no {arch}.{k} in the metadata")
        return meta.get(f"{arch}.{k}", default)

    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    cfg = {
        "architectures": [ARCHS[arch][0]], "model_type": arch, "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")), "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads, "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "hidden_act": "silu", "max_position_embeddings": int(key("context_length")),
        "rms_norm_eps": _f32(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(key("rope.freq_base", 10000.0)), "rope_scaling": None,
        # llama.cpp writes output.weight only when it is not the embedding matrix
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"), "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": str(dtype).removeprefix("torch."), "use_cache": True,
    }
    if arch == "llama":
        cfg.update(head_dim=int(key("attention.key_length", hidden // heads)), mlp_bias=False,
                   attention_bias=any(n.endswith("attn_q.bias") for n in tensor_names))
    else:
        cfg.update(use_sliding_window=False, sliding_window=cfg["max_position_embeddings"],
                   max_window_layers=cfg["num_hidden_layers"])
    scaling = key("rope.scaling.type", "none")
    if scaling == "linear":
        cfg["rope_scaling"] = {"type": "linear", "factor": _f32(key("rope.scaling.factor"))}
    elif scaling != "none":
        raise FormatError(f"{path}: RoPE scaling {scaling!r} is not supported (only linear)")
    return cfg


def tokenizer_files(meta, cfg):
    """The byte-level BPE tokenizer a GGUF describes, as the files of a hub folder:
    {filename: json-able object or str}. Tokens marked CONTROL (3) are special added tokens, USER_DEFINED
    (4) plain added tokens (both matched whole), UNUSED (5) are embedding-row padding and left out."""
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise FormatError(f"tokenizer {meta.get('tokenizer.ggml.model')!r} is not supported (only byte-level "
                          "BPE, tokenizer.ggml.model = 'gpt2')")
    tokens, merges = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.merges"]
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty != 5}
    added = [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": types[i] == 3} for i in range(len(tokens)) if types[i] in (3, 4)]
    normalizer, pre = PRE_TOKENIZERS.get(meta.get("tokenizer.ggml.pre"), PRE_TOKENIZERS["default"])
    tokenizer_json = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": normalizer, "pre_tokenizer": pre, "post_processor": _BYTE_LEVEL, "decoder": _BYTE_LEVEL,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": [m.split(" ") for m in merges]},
    }
    specials = {f"{k}_token": tokens[meta[f"tokenizer.ggml.{key}_token_id"]] for k, key in
                (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown"))
                if meta.get(f"tokenizer.ggml.{key}_token_id") is not None}
    config = {
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": False,
        "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added},
        "additional_special_tokens": [a["content"] for a in added if a["special"]],
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": cfg["max_position_embeddings"],
        "tokenizer_class": ARCHS[cfg["model_type"]][1],
        **specials,
    }
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return {
        "vocab.json": vocab,
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
        "tokenizer.json": tokenizer_json,
        "tokenizer_config.json": config,
        "special_tokens_map.json": dict(specials, additional_special_tokens=config["additional_special_tokens"]),
    }


def llm_from_gguf(path, dtype=torch.float32, progress=True):
    """GGUF -> (config, {Hugging Face name: tensor}, tokenizer files, metadata). Every tensor is
    dequantized to float32 by gguf.quants, then cast once to dtype."""
    import gguf

    reader = _gguf_reader(path)
    meta = gguf_metadata(reader)
    names = [t.name for t in reader.tensors]
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise FormatError(f"{path}: no token_embd.weight tensor")
    cfg = llm_config(meta, names, int(embd.shape[-1]), dtype, path)
    permute = cfg["model_type"] == "llama"
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    out = {}
    for t in tqdm(reader.tensors, desc=f"converting {os.path.basename(path)}", unit="tensor",
                  disable=not progress, leave=False):
        kind = None
        if t.name in GGUF_TOP:
            hf = GGUF_TOP[t.name]
        else:
            parts = t.name.split(".")  # blk.N.attn_q.weight
            if len(parts) != 4 or parts[0] != "blk" or parts[2] not in GGUF_NAMES:
                raise FormatError(f"{path}: unexpected tensor {t.name}")
            hf, kind = f"model.layers.{parts[1]}.{GGUF_NAMES[parts[2]]}.{parts[3]}", parts[2]
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        w = w.reshape(tuple(int(s) for s in reversed(t.shape)))  # ggml lists dims fastest-first
        if permute and kind in ("attn_q", "attn_k"):
            w = undo_rope_permute(w, heads if kind == "attn_q" else kv)
        out[hf] = _to_torch(w, dtype)
    return cfg, out, tokenizer_files(meta, cfg), meta


def convert_llm(path, out_dir, dtype=torch.float32, progress=True):
    """Write a Hugging Face llama/qwen2 folder for a GGUF file."""
    cfg, sd, tok, meta = llm_from_gguf(path, dtype, progress)
    save_file(sd, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    _write(os.path.join(out_dir, "config.json"), cfg)
    eos = [cfg["eos_token_id"]] + [meta[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
                                   if meta.get(k) is not None and meta[k] != cfg["eos_token_id"]]
    gen = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": eos if len(eos) > 1 else eos[0]}
    if cfg["pad_token_id"] is not None:
        gen["pad_token_id"] = cfg["pad_token_id"]
    for name, content in {"generation_config.json": gen, **tok}.items():
        _write(os.path.join(out_dir, name), content)
    write_config(out_dir, "llm")
    write_tokenizer(out_dir)
    return cfg
