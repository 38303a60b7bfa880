"""Convert the authors' released BLSP-Emo checkpoint into a run folder of ours, once.

The release (Hugging Face cwang621/blsp-emo, ModelScope iic/Blsp-Emo-Qwen-7B) is a `Blsp2Model` saved by
`transformers`: pickled `pytorch_model-*.bin` shards + `pytorch_model.bin.index.json`, a nested `config.json`
(`whisper_config`, `qwen_config`, adapter and LoRA fields) and Qwen-1's `qwen.tiktoken`. Its state dict:
    whisper_model.*                          HF WhisperEncoder names              -> whisper/ model.encoder.*
    qwen_model.model.transformer.* , .lm_head Qwen-1 names (plora's LoraModel wraps QWenLMHeadModel as `.model`;
                                             without LoRA the prefix is qwen_model.)  -> llm/ in Qwen2's names
                                             (c_attn split into q_proj|k_proj|v_proj), which model.py loads
    ...<target>.lora_A.default.weight (r, in), .lora_B.default.weight (out, r): plora keeps the base weight at
                                             `<target>.weight` (no `base_layer`)  -> decoder.layers.N.<ours>.lora_A/B
    adapter.subsampler.conv_layers.N.*, adapter.fc1/fc2 (no bias), adapter.speech_ln -> adapter.conv_layers.N.*,
                                             adapter.fc1, adapter.fc2, adapter.speech_ln
    hidden2emotion.weight                    (num_emotions, hidden), no bias      -> emotion_head.weight
LoRA (src/plora.py): delta = lora_B(lora_A(x)) * lora_alpha / r, on every Linear whose module name ENDS WITH a
target ("c_attn,c_proj,w1,w2": so attn.c_proj and mlp.c_proj both), with lora_scope "audio": only where the
lora mask is 1, i.e. the speech embeddings of the prompt; text and generated tokens see the base Qwen. That is
our partial LoRA, so the LoRA stays unmerged: merging would change every text position too.

The run's config.json says "padded": true, so every path that encodes audio for it (chat.py, evaluate.py, the
feature cache) hears a clip as the release does: padded to 30 s, the encoder attending over the padding, its
output cut after ceil(n / 160) mel frames, as the release's feature extractor's attention mask counts them.

Two differences from the release worth knowing (the conversion does not change numbers, these are run-time):
- The release's Conv1dSubsampler convolves the whole batch with no mask between its convs: a clip shorter than
  the longest in its batch has its last frames mixed, through the kernel, with the encoder's output on its
  padding (whisper encodes the whole 30 s window; the batch is cut at the longest clip), and then with the
  convs' outputs there. Ours zeroes every frame past a clip's length before each conv, so a batch equals each
  clip alone. For one clip (chat, and the release's chat demo) there is no such padding and both agree exactly.
- Qwen-1 switches on dynamic NTK RoPE and log-n attention scaling only past `seq_length` tokens (8192 for
  Qwen-7B-Chat); our Decoder implements neither, so prompts longer than that differ.

Pickles are read only here, with torch.load(weights_only=True, mmap=True), one shard at a time, each once; the
output is safetensors written per shard (peak memory about one shard), byte-identical when converted twice.
The Qwen-1 half (qwen_table with no prefix, the same shard reading, write_llm) also converts a plain Qwen-1
folder, Qwen-7B-Chat as downloaded (safetensors or .bin shards): convert_qwen, which prepare.py --llm=PATH calls.
Usage: python scripts/release.py PATH/TO/blsp-emo [runs/blsp-emo-release]     (or: python scripts/prepare.py --blsp-emo=PATH)
"""
import argparse
import json
import os
import re
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: data.py, model.py

from convert import FormatError, write_config, write_tokenizer
from prepare import read_json, weight_map

DEFAULT_OUT = os.path.join("runs", "blsp-emo-release")
N_EMOTIONS = 5  # data.EMOTIONS: neutral, happy, angry, sad, surprise, the release's label order too
# Qwen-1 Linear -> Qwen2's (model.py's Decoder names). Qwen-1's MLP is c_proj(w1(x) * silu(w2(x))): w2 is the
# gate; its c_attn is q|k|v stacked on the output axis, split in three here (its LoRA B too; A is shared).
QWEN_LINEARS = {"attn.c_attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                "attn.c_proj": ("self_attn.o_proj",), "mlp.w2": ("mlp.gate_proj",), "mlp.w1": ("mlp.up_proj",),
                "mlp.c_proj": ("mlp.down_proj",)}
# Blsp2Config's defaults (src/configuration_blsp2.py), for fields a config.json leaves out
BLSP_DEFAULTS = {"conv_kernel_sizes": "5,5,5", "adapter_inner_dim": 512, "adapter_hidden_layers": 0,
                 "lora_config": {}, "lora_scope": "audio", "adapter_type": "subsampler", "num_emotions": 5}
TOKENIZER_FILES = ("qwen.tiktoken", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# buffers some Qwen-1 revisions saved (their QWenLMHeadModel lists them as ignorable): recomputed, never weights
IGNORED = re.compile(r".*(rotary_emb\.inv_freq|attn\.masked_bias|registered_causal_mask)$")


class ReleaseError(ValueError):
    """A release folder we cannot convert; the message is one line and names the file/field/key."""


def _fail(msg):
    raise ReleaseError(" ".join(str(msg).split()))


def _need(d, key, where):
    if key not in d:
        _fail(f"{where} has no field {key!r}")
    return d[key]


def read_config(src):
    """The release's config.json -> our run config (plus the dims the weight table needs)."""
    path = os.path.join(src, "config.json")
    raw = read_json(path, ReleaseError, f" (is {src} the BLSP-Emo release folder?)")
    c = {**BLSP_DEFAULTS, **raw}
    wc, qc = _need(raw, "whisper_config", path), _need(raw, "qwen_config", path)
    if c["adapter_type"] != "subsampler":
        _fail(f"{path}: adapter_type={c['adapter_type']!r} is not supported (only 'subsampler')")
    if int(c["adapter_hidden_layers"]) > 0:
        _fail(f"{path}: adapter_hidden_layers={c['adapter_hidden_layers']} is not supported (only 0: fc1-GELU-fc2)")
    kernels = [int(k) for k in str(c["conv_kernel_sizes"]).split(",")]
    if len(set(kernels)) != 1:
        _fail(f"{path}: conv_kernel_sizes={c['conv_kernel_sizes']!r} is not supported (one kernel size for all convs)")
    if int(c["num_emotions"]) != N_EMOTIONS:
        _fail(f"{path}: num_emotions={c['num_emotions']} is not supported (ours has {N_EMOTIONS} labels)")
    dims = {k: int(_need(wc, k, f"{path} whisper_config")) for k in
            ("d_model", "num_mel_bins", "encoder_layers", "encoder_ffn_dim", "max_source_positions")}
    dims.update(qwen_dims(qc, path, "qwen_config."))
    lora, targets = _read_lora(c, path)
    run = {"whisper": "whisper", "llm": "llm",
           "adapter": {"d_enc": dims["d_model"], "d_llm": dims["hidden_size"],
                       "inner_dim": int(c["adapter_inner_dim"]), "kernel_size": kernels[0], "n_convs": len(kernels)},
           "lora": lora, "num_emotions": N_EMOTIONS, "stage": "release",
           # how it was trained to hear: its WhisperFeatureExtractor pads every clip to 30 s (padding="max_length",
           # the extractor's default) and its encoder attends over the padding; every path that encodes for this
           # run reads this (SpeechLM.encode_audio, cache.with_features)
           "padded": True,
           # provenance, for a reader: not read back by any code
           "release": {"source": os.path.basename(os.path.abspath(src)),
                       "lora_scope": c["lora_scope"] if lora else None,
                       "lora_target_modules": lora and c["lora_config"].get("target_modules")}}
    return raw, run, dims, targets


def qwen_dims(qc, path, field=""):
    """A Qwen-1 config (the release's qwen_config, or a Qwen-1 folder's config.json) -> the dims the weight table
    needs; ReleaseError naming path and the field for what our Qwen2-named Decoder cannot express."""
    for key, ok in (("rotary_pct", lambda v: float(v) == 1.0), ("no_bias", lambda v: v is True)):
        if key in qc and not ok(qc[key]):
            _fail(f"{path}: {field}{key}={qc[key]!r} is not supported")
    where = f"{path} {field[:-1]}" if field else path
    dims = {k: int(_need(qc, k, where)) for k in
            ("hidden_size", "num_hidden_layers", "num_attention_heads", "kv_channels", "intermediate_size",
             "vocab_size")}
    if dims["kv_channels"] * dims["num_attention_heads"] != dims["hidden_size"]:
        _fail(f"{path}: {field}kv_channels={dims['kv_channels']} x num_attention_heads="
              f"{dims['num_attention_heads']} != hidden_size={dims['hidden_size']} (Qwen-1 needs them equal)")
    return dims


def _read_lora(c, path):
    """lora_config -> our {"r","alpha","dropout","targets"} and the Qwen-1 Linears it covers (None: no LoRA)."""
    lc = c["lora_config"] or {}
    if not lc:
        return None, ()
    if c["lora_scope"] != "audio":
        _fail(f"{path}: lora_scope={c['lora_scope']!r} is not supported (only 'audio': LoRA at the speech positions)")
    if lc.get("layers_to_transform") is not None:
        _fail(f"{path}: lora_config.layers_to_transform={lc['layers_to_transform']!r} is not supported (all layers)")
    r, alpha = int(_need(lc, "r", f"{path} lora_config")), _need(lc, "lora_alpha", f"{path} lora_config")
    tm = _need(lc, "target_modules", f"{path} lora_config")
    # plora matches a list by module-name suffix and a string by re.fullmatch, over every module of the LLM
    names = ["transformer.wte", "transformer.drop", "transformer.rotary_emb", "transformer.ln_f", "lm_head",
             "transformer.h.0", "transformer.h.0.ln_1", "transformer.h.0.attn", "transformer.h.0.attn.attn_dropout",
             "transformer.h.0.ln_2", "transformer.h.0.mlp"] + [f"transformer.h.0.{m}" for m in QWEN_LINEARS]
    hit = [n for n in names if (re.fullmatch(tm, n) if isinstance(tm, str) else any(n.endswith(t) for t in tm))]
    bad = [n for n in hit if n.split("transformer.h.0.")[-1] not in QWEN_LINEARS]
    if bad or not hit:
        _fail(f"{path}: lora_config.target_modules={tm!r} is not supported (it covers {bad or 'nothing'}; "
              f"ours: {', '.join(QWEN_LINEARS)})")
    targets = tuple(n.split("transformer.h.0.")[-1] for n in hit)
    lora = {"r": r, "alpha": alpha, "dropout": float(lc.get("lora_dropout", 0.0)),
            "targets": [n.split(".")[-1] for t in targets for n in QWEN_LINEARS[t]]}
    return lora, targets


def weight_table(dims, targets, n_convs, lora_prefix=True):
    """release key -> (part, our key, shape, how). part: whisper | llm | run (our model.safetensors). A tuple
    of keys takes the tensor split in equal parts on dim 0 (how "split") or a copy each (how "copy")."""
    t = {}
    d, f, ne = dims["d_model"], dims["encoder_ffn_dim"], dims["num_mel_bins"]
    w = lambda k, shape: t.__setitem__("whisper_model." + k, ("whisper", "model.encoder." + k, shape, None))
    w("conv1.weight", (d, ne, 3)), w("conv1.bias", (d,)), w("conv2.weight", (d, d, 3)), w("conv2.bias", (d,))
    w("embed_positions.weight", (dims["max_source_positions"], d))
    w("layer_norm.weight", (d,)), w("layer_norm.bias", (d,))
    for i in range(dims["encoder_layers"]):
        p = f"layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            w(p + f"self_attn.{proj}.weight", (d, d))
            if proj != "k_proj":  # Whisper's key projection has no bias
                w(p + f"self_attn.{proj}.bias", (d,))
        for ln in ("self_attn_layer_norm", "final_layer_norm"):
            w(p + f"{ln}.weight", (d,)), w(p + f"{ln}.bias", (d,))
        w(p + "fc1.weight", (f, d)), w(p + "fc1.bias", (f,)), w(p + "fc2.weight", (d, f)), w(p + "fc2.bias", (d,))

    t.update(qwen_table(dims, targets, "qwen_model.model." if lora_prefix else "qwen_model."))

    a, L, inner, k = "adapter.", dims["hidden_size"], dims["inner_dim"], dims["kernel_size"]
    for i in range(n_convs):  # Conv1dSubsampler(d, 2d, D): d -> 2d -GLU-> d ... -> 2D -GLU-> D
        c_in, c_out = d, (2 * d if i < n_convs - 1 else 2 * L)
        t[a + f"subsampler.conv_layers.{i}.weight"] = ("run", a + f"conv_layers.{i}.weight", (c_out, c_in, k), None)
        t[a + f"subsampler.conv_layers.{i}.bias"] = ("run", a + f"conv_layers.{i}.bias", (c_out,), None)
    t[a + "fc1.weight"] = ("run", a + "fc1.weight", (inner, L), None)
    t[a + "fc2.weight"] = ("run", a + "fc2.weight", (L, inner), None)
    t[a + "speech_ln.weight"] = ("run", a + "speech_ln.weight", (L,), None)
    t[a + "speech_ln.bias"] = ("run", a + "speech_ln.bias", (L,), None)
    t["hidden2emotion.weight"] = ("run", "emotion_head.weight", (N_EMOTIONS, L), None)
    return t


def qwen_table(dims, targets=(), prefix=""):
    """Qwen-1 key (prefix + its Hugging Face name) -> ("llm", our Qwen2 name(s), shape, how) as in weight_table,
    and ("run", ...) for the LoRA of the Linears in targets."""
    t = {}
    D, V, F = dims["hidden_size"], dims["vocab_size"], dims["intermediate_size"] // 2
    P = dims["kv_channels"] * dims["num_attention_heads"]
    llm = lambda k, ours, shape, how=None: t.__setitem__(prefix + k, ("llm", ours, shape, how))
    llm("transformer.wte.weight", "model.embed_tokens.weight", (V, D))
    llm("transformer.ln_f.weight", "model.norm.weight", (D,)), llm("lm_head.weight", "lm_head.weight", (V, D))
    io = {"attn.c_attn": (D, 3 * P), "attn.c_proj": (P, D), "mlp.w1": (D, F), "mlp.w2": (D, F), "mlp.c_proj": (F, D)}
    for i in range(dims["num_hidden_layers"]):
        h, o = f"transformer.h.{i}.", f"model.layers.{i}."
        llm(h + "ln_1.weight", o + "input_layernorm.weight", (D,))
        llm(h + "ln_2.weight", o + "post_attention_layernorm.weight", (D,))
        llm(h + "attn.c_attn.bias", tuple(o + n + ".bias" for n in QWEN_LINEARS["attn.c_attn"]), (3 * P,), "split")
        for m, (n_in, n_out) in io.items():
            names = QWEN_LINEARS[m]
            llm(h + m + ".weight", tuple(o + n + ".weight" for n in names), (n_out, n_in), "split")
            if m in targets:
                ours = tuple(f"decoder.layers.{i}.{n}" for n in names)
                t[prefix + h + m + ".lora_A.default.weight"] = ("run", tuple(n + ".lora_A" for n in ours),
                                                                (dims["lora_r"], n_in), "copy")
                t[prefix + h + m + ".lora_B.default.weight"] = ("run", tuple(n + ".lora_B" for n in ours),
                                                                (n_out, dims["lora_r"]), "split")
    return t


def read_index(src, what="the BLSP-Emo release folder"):
    """{key: shard file name}, from the folder's index (safetensors, else pickled .bin), or from a lone weights
    file, which is loaded here to list its keys and returned too, so that it is read once; the index's (or the
    file's) path; {shard: its state dict}."""
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        path = os.path.join(src, index)
        if os.path.isfile(path):
            return {k: v for k, v in weight_map(path, ReleaseError).items() if not IGNORED.match(k)}, path, {}
        path = os.path.join(src, single)
        if os.path.isfile(path):
            sd = _load_shard(path)
            return {k: single for k in sd if not IGNORED.match(k)}, path, {single: sd}
    _fail(f"{src}: no model.safetensors(.index.json) or pytorch_model.bin(.index.json) (is it {what}?)")


def _check_keys(table, wm, index_path):
    """Every tensor the config implies is in the index, and nothing else: before any shard is read."""
    for key in sorted(table):
        if key not in wm:
            _fail(f"{index_path}: has no {key} (the config needs it)")
    for key in sorted(wm):
        if key not in table:
            _fail(f"{index_path}: names {key}, which this config does not have")


def _load_shard(path):
    if path.endswith(".safetensors"):
        try:
            return load_file(path)
        except Exception as e:  # a truncated download
            _fail(f"{path}: cannot read as safetensors ({type(e).__name__}: {e})")
    try:  # mmap: the shard's bytes stay on disk and are paged in as each tensor is written out
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # a truncated download, a legacy (non-zip) pickle, or a pickle with code in it
        _fail(f"{path}: cannot read as a weights-only torch checkpoint ({type(e).__name__}: {e})")
    if not isinstance(sd, dict):
        _fail(f"{path}: holds a {type(sd).__name__}, not a state dict")
    return sd


def _shard_names(files):
    """Output file for each input shard that holds a part's tensors: one file, or HF-style numbered shards."""
    if len(files) == 1:
        return {files[0]: "model.safetensors"}
    return {s: f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i, s in enumerate(files)}


def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def _gb(n):
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def convert(src, out_dir=DEFAULT_OUT, log=print):
    """Convert the release folder `src` into the run folder `out_dir`; returns out_dir. ReleaseError if it can't."""
    raw, run, dims, targets = read_config(src)
    a = run["adapter"]
    dims.update(inner_dim=a["inner_dim"], kernel_size=a["kernel_size"], lora_r=run["lora"]["r"] if run["lora"] else 0)
    table = weight_table(dims, targets, a["n_convs"], lora_prefix=bool(run["lora"]))
    _need_tiktoken(src)
    wm, index_path, preloaded = read_index(src)
    _check_keys(table, wm, index_path)

    # what it costs, before anything is loaded: weights in the release's dtype, and the largest shard
    itemsize = DTYPE_BYTES.get(raw.get("torch_dtype") or "bfloat16", 2)
    numel = {p: 0 for p in ("whisper", "llm", "run")}
    for part, _, shape, _ in table.values():
        numel[part] += torch.Size(shape).numel()
    shards = sorted(set(wm.values()))
    biggest = max(os.path.getsize(os.path.join(src, s)) for s in shards)
    log(f"[release] {sum(numel.values()) / 1e6:,.1f} M parameters, {_gb(sum(numel.values()) * itemsize)} of weights "
        f"as stored ({raw.get('torch_dtype', 'bfloat16')}): whisper encoder {_gb(numel['whisper'] * itemsize)}, "
        f"Qwen {_gb(numel['llm'] * itemsize)}, adapter + emotion head + LoRA {_gb(numel['run'] * itemsize)}; "
        f"converting {len(shards)} shard(s) one at a time, peak memory about {_gb(biggest)} (the largest shard)")

    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir):
        _replace_ok(out_dir)  # before the long part, not after it
    tmp = out_dir + ".partial"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)  # an interrupted earlier conversion
    os.makedirs(os.path.join(tmp, "whisper")), os.makedirs(os.path.join(tmp, "llm"))
    try:
        dirs = {p: os.path.join(tmp, p) for p in ("whisper", "llm")}
        dtypes, ours = _convert_shards(src, dirs, table, wm, index_path, preloaded, lambda m: log("[release] " + m))
        save_file(ours, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        _write_configs(src, tmp, raw, run, dtypes)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)
    log(f"[release] wrote {out_dir} (no pickle in it; the .bin shards are not needed any more)")
    return out_dir


def _replace_ok(out_dir):
    """Only an earlier conversion of the release may be replaced: never a user's folder."""
    try:
        with open(os.path.join(out_dir, "config.json")) as f:
            if json.load(f).get("stage") == "release":
                return
    except (OSError, json.JSONDecodeError, AttributeError):
        pass
    if os.listdir(out_dir):
        _fail(f"{out_dir}: exists and is not a converted release; pick another output folder")


def _convert_shards(src, dirs, table, wm, index_path, preloaded, log):
    """Each shard read once, its tensors of part p (see weight_table) written to the folder dirs[p], as one
    safetensors file per input shard; returns ({part: dtype}, {our key: tensor} for part "run")."""
    by_part = {p: sorted({wm[k] for k, v in table.items() if v[0] == p}) for p in dirs}
    names = {p: _shard_names(by_part[p]) for p in by_part}
    index = {p: {} for p in by_part}
    total = {p: 0 for p in by_part}
    dtypes, ours = {}, {}
    index_name = os.path.basename(index_path)
    for shard in sorted(set(wm.values())):
        path = os.path.join(src, shard)
        log(f"reading {shard}")
        sd = preloaded.pop(shard, None) or _load_shard(path)
        listed = sorted(k for k, s in wm.items() if s == shard)
        for key in listed:
            if key not in sd:
                _fail(f"{path}: has no {key}, which {index_name} says it holds")
        for key in sd:
            if wm.get(key) != shard and not IGNORED.match(key):
                _fail(f"{path}: holds {key}, which {index_name} does not list for it")
        out, storages = {p: {} for p in dirs}, set()
        for key in listed:
            part, name, shape, how = table[key]
            x = sd[key]
            if not isinstance(x, torch.Tensor) or not x.is_floating_point():
                _fail(f"{path}: {key} is not a floating-point tensor")
            if tuple(x.shape) != tuple(shape):
                _fail(f"{path}: {key} has shape {tuple(x.shape)}, the config implies {tuple(shape)}")
            targets = name if isinstance(name, tuple) else (name,)
            pieces = x.chunk(len(targets)) if how == "split" else [x] * len(targets)
            for n, y in zip(targets, pieces):
                if part == "run" or how is not None:
                    y = y.contiguous().clone()  # small (adapter, emotion head, LoRA), or a slice of a fused tensor
                elif y.untyped_storage().data_ptr() in storages:
                    y = y.clone()  # safetensors refuses tensors that share storage (tied weights in a pickle)
                else:
                    storages.add(y.untyped_storage().data_ptr())   # from the mmap straight to the file
                    y = y.contiguous()
                (ours if part == "run" else out[part])[n] = y
            if part != "run":  # the folder's config says what its weights are: the first tensor's dtype
                dtypes.setdefault(part, str(x.dtype).split(".")[-1])
        for part, tensors in out.items():
            if tensors:
                fname = names[part][shard]
                save_file(tensors, os.path.join(dirs[part], fname), metadata={"format": "pt"})
                index[part].update({n: fname for n in tensors})
                total[part] += sum(x.numel() * x.element_size() for x in tensors.values())
        del sd, out
    for part in index:
        if len(names[part]) > 1:
            _write_json(os.path.join(dirs[part], "model.safetensors.index.json"),
                        {"metadata": {"total_size": total[part]}, "weight_map": index[part]})
    return dtypes, ours


def _write_configs(src, tmp, raw, run, dtypes):
    wc = dict(raw["whisper_config"], torch_dtype=dtypes["whisper"])
    wc.setdefault("model_type", "whisper")
    _write_json(os.path.join(tmp, "whisper", "config.json"), wc)
    try:  # the model.json that model.py reads
        write_config(os.path.join(tmp, "whisper"), "whisper")
    except FormatError as e:
        _fail(e)
    write_llm(src, os.path.join(tmp, "llm"), raw["qwen_config"], dtypes["llm"])
    if os.path.isfile(os.path.join(src, "preprocessor_config.json")):
        shutil.copyfile(os.path.join(src, "preprocessor_config.json"), os.path.join(tmp, "whisper",
                                                                                     "preprocessor_config.json"))
    _write_json(os.path.join(tmp, "config.json"), run)


def _need_tiktoken(src):
    if not os.path.isfile(os.path.join(src, "qwen.tiktoken")):
        _fail(f"{os.path.join(src, 'qwen.tiktoken')}: missing (the Qwen-1 tokenizer)")


def write_llm(src, dest, qc, dtype):
    """The converted LLM folder's configs and tokenizer, from Qwen-1's config qc and the tokenizer files in src."""
    # Qwen-1 as a Qwen2 config: within seq_length (all BLSP-Emo uses), Qwen-1's dynamic NTK and log-n
    # attention are off, so it is a Qwen2 with bias on q|k|v only and untied embeddings
    heads = int(qc["num_attention_heads"])
    _write_json(os.path.join(dest, "config.json"), dict(
        model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=qc["vocab_size"],
        hidden_size=qc["hidden_size"], intermediate_size=qc["intermediate_size"] // 2,
        num_hidden_layers=qc["num_hidden_layers"], num_attention_heads=heads, num_key_value_heads=heads,
        rms_norm_eps=qc.get("layer_norm_epsilon", 1e-6), rope_theta=qc.get("rotary_emb_base", 10000.0),
        max_position_embeddings=qc.get("seq_length", 2048), tie_word_embeddings=False, torch_dtype=dtype))
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dest, name))
    try:  # the model.json that model.py reads, the tokenizer.tiktoken (+ .json) that tokenizer.Tokenizer reads
        write_config(dest, "llm")
        write_tokenizer(dest)
    except FormatError as e:
        _fail(e)


def convert_qwen(src, dest, log=print):
    """A Qwen-1 Hugging Face folder (QWenLMHeadModel, as Qwen/Qwen-7B-Chat downloads: config.json with
    model_type "qwen", safetensors or pickled shards, qwen.tiktoken) -> the existing empty folder dest, in Qwen2's
    names, which model.py and tokenizer.py read: the LLM half of convert(), its keys without a prefix.
    prepare.py calls it for --llm=PATH (and records the source, so that it runs once)."""
    path = os.path.join(src, "config.json")
    qc = read_json(path, ReleaseError, f" (is {src} a Qwen-1 folder?)")
    table = qwen_table(qwen_dims(qc, path))
    _need_tiktoken(src)
    wm, index_path, preloaded = read_index(src, "a Qwen-1 folder")
    _check_keys(table, wm, index_path)
    dtypes, _ = _convert_shards(src, {"llm": dest}, table, wm, index_path, preloaded, log)
    write_llm(src, dest, qc, dtypes["llm"])
    return dest


def main(argv=None):
    ap = argparse.ArgumentParser(description="Convert the released BLSP-Emo checkpoint into a run folder of ours.")
    ap.add_argument("src", help="the downloaded release folder (cwang621/blsp-emo or iic/Blsp-Emo-Qwen-7B)")
    ap.add_argument("out", nargs="?", default=DEFAULT_OUT, help=f"run folder to write (default {DEFAULT_OUT})")
    args = ap.parse_args(argv)
    try:
        out = convert(args.src, args.out)
    except ReleaseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    rel = os.path.relpath(out)
    print(f"chat with it:  python chat.py clip.wav --ckpt {out if rel.startswith('..') else rel} --emotion")
    return 0


if __name__ == "__main__":
    sys.exit(main())
