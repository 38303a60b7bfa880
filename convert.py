"""
Format readers for prepare.py: turn the re-published weights into the Hugging Face folders that
model.py and data.py read.

- CTranslate2 `model.bin` (Whisper) -> transformers Whisper config.json + model.encoder.* safetensors.
  Our own reader (the format is a flat list of named arrays); no ctranslate2 at run time.
- GGUF (llama / qwen2) -> config.json, generation_config.json, model.safetensors and the byte-level
  BPE tokenizer files, dequantized with llama.cpp's own `gguf` package.
"""
import json
import os
import re
import struct

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from data import LLAMA3_PATTERN, QWEN_PATTERN


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
    """Write config.json + model.safetensors (model.encoder.* only) for a CTranslate2 Whisper."""
    cfg, sd = whisper_encoder_from_ct2(path, dtype)
    save_file(sd, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    _write(os.path.join(out_dir, "config.json"), cfg)
    return cfg


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


def llm_from_gguf(path, dtype=torch.bfloat16, progress=True):
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


def convert_llm(path, out_dir, dtype=torch.bfloat16, progress=True):
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
    return cfg
