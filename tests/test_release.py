"""release.py: the authors' BLSP-Emo checkpoint -> a run folder of ours.

A tiny random checkpoint is written at test time in the release's exact layout (src/modeling_blsp2.py,
src/plora.py, src/modeling_adapter.py of cwang621/blsp-emo): `whisper_model.*` (HF WhisperEncoder names),
`qwen_model.model.transformer.*` (plora's LoraModel wraps QWenLMHeadModel as `.model`; the base weight stays at
`<module>.weight`, LoRA at `<module>.lora_A.default.weight`), `adapter.subsampler.conv_layers.N.*`,
`adapter.fc1/fc2/speech_ln`, `hidden2emotion.weight`, a nested config, two pickled shards + an index, and a
small qwen.tiktoken. The oracle is assembled from those same tensors without our code: transformers'
WhisperEncoder, the release's subsampler re-typed from its source, and a transformers Qwen2 carrying the
de-fused Q/K/V with the LoRA delta added by forward hooks at the speech positions only.
"""
import base64
import json
import os
import re
import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import release

D_ENC, N_MELS, N_CTX, ENC_LAYERS = 16, 8, 24, 2
D, HEADS, LAYERS, INTER, VOCAB = 32, 4, 2, 64, 512
INNER, R, ALPHA = 16, 4, 8  # alpha != r: the scaling alpha/r = 2 must survive the conversion
TARGETS = ["c_attn", "c_proj", "w1", "w2"]  # the release's lora_target_modules


def whisper_config():
    from transformers import WhisperConfig
    return WhisperConfig(num_mel_bins=N_MELS, d_model=D_ENC, encoder_layers=ENC_LAYERS, encoder_attention_heads=2,
                         encoder_ffn_dim=32, max_source_positions=N_CTX, decoder_layers=1, decoder_attention_heads=2,
                         decoder_ffn_dim=32, max_target_positions=16).to_dict()


def release_config(**over):
    qwen = {"vocab_size": VOCAB, "hidden_size": D, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
            "kv_channels": D // HEADS, "intermediate_size": INTER, "layer_norm_epsilon": 1e-6,
            "rotary_emb_base": 10000, "rotary_pct": 1.0, "seq_length": 64, "max_position_embeddings": 64,
            "no_bias": True, "tie_word_embeddings": False, "use_dynamic_ntk": True, "use_logn_attn": True,
            "bf16": False, "fp16": False, "fp32": False, "model_type": "qwen", "architectures": ["QWenLMHeadModel"],
            "auto_map": {"AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"}, "use_flash_attn": False}
    lora = {"peft_type": "LORA", "task_type": None, "inference_mode": False, "r": R, "target_modules": TARGETS,
            "lora_alpha": ALPHA, "lora_dropout": 0.05, "fan_in_fan_out": False, "bias": "none",
            "modules_to_save": None, "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
            "base_model_name_or_path": None, "revision": None}
    cfg = {"architectures": ["Blsp2Model"], "torch_dtype": "float32", "transformers_version": "4.32.0",
           "whisper_config": whisper_config(), "qwen_config": qwen, "conv_kernel_sizes": "5,5,5",
           "adapter_inner_dim": INNER, "adapter_hidden_layers": 0, "kd_temperature": 2, "lora_config": lora,
           "lora_scope": "audio", "adapter_type": "subsampler", "num_pre_cif_layers": 4, "num_post_cif_layers": 4,
           "num_emotions": 5}
    cfg.update(over)
    return cfg


class Subsampler(nn.Module):
    """The release's adapter (src/modeling_adapter.py Subsampler, adapter_hidden_layers=0), for its key names
    and as the oracle: three stride-2 convs + GLU over the whole input, bottleneck with residual, LayerNorm."""

    def __init__(self, d_in, inner, d_out, kernels=(5, 5, 5)):
        super().__init__()
        self.subsampler = nn.Module()
        mid = 2 * d_in  # Conv1dSubsampler(in_dim, 2 * in_dim, out_dim, kernels); GLU halves the channels
        self.subsampler.conv_layers = nn.ModuleList(
            nn.Conv1d(d_in if i == 0 else mid // 2, mid if i < len(kernels) - 1 else 2 * d_out, k, stride=2,
                      padding=k // 2) for i, k in enumerate(kernels))
        self.fc1 = nn.Linear(d_out, inner, bias=False)
        self.fc2 = nn.Linear(inner, d_out, bias=False)
        self.speech_ln = nn.LayerNorm(d_out, 1e-5)

    def forward(self, x):  # (B, T, d_in)
        x = x.transpose(1, 2)
        for conv in self.subsampler.conv_layers:
            x = F.glu(conv(x), dim=1)
        x = x.transpose(1, 2)
        return self.speech_ln(x + self.fc2(F.gelu(self.fc1(x))))


def qwen_tensors(g, lora=True):
    """Qwen-1 weights under the release's names, random; LoRA B non-zero so the delta shows."""
    p = "qwen_model.model." if lora else "qwen_model."
    rnd = lambda *s: torch.randn(*s, generator=g) * 0.2
    t = {p + "transformer.wte.weight": rnd(VOCAB, D), p + "transformer.ln_f.weight": 1 + rnd(D),
         p + "lm_head.weight": rnd(VOCAB, D)}
    shapes = {"attn.c_attn": (3 * D, D), "attn.c_proj": (D, D), "mlp.w1": (INTER // 2, D),
              "mlp.w2": (INTER // 2, D), "mlp.c_proj": (D, INTER // 2)}
    for i in range(LAYERS):
        h = f"{p}transformer.h.{i}."
        t[h + "ln_1.weight"], t[h + "ln_2.weight"] = 1 + rnd(D), 1 + rnd(D)
        for m, (o, n) in shapes.items():
            t[h + m + ".weight"] = rnd(o, n)
            if m == "attn.c_attn":
                t[h + m + ".bias"] = rnd(o)
            if lora:
                t[h + m + ".lora_A.default.weight"] = rnd(R, n)
                t[h + m + ".lora_B.default.weight"] = rnd(o, R)
    return t


def tiny_tiktoken():
    ranks = [bytes([b]) for b in range(256)] + [b"th", b"he", b" t", b"in", b"the", b" the"]
    return "".join(f"{base64.b64encode(tok).decode()} {i}\n" for i, tok in enumerate(ranks))


def make_release(folder, cfg=None, dtype=torch.float32, lora=True, seed=0):
    """Writes the release folder; returns its tensors by release key (the oracle's source)."""
    from transformers.models.whisper.modeling_whisper import WhisperEncoder as HFWhisperEncoder
    from transformers import WhisperConfig
    cfg = cfg or release_config(torch_dtype=str(dtype).split(".")[-1], **({} if lora else {"lora_config": {}}))
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    enc = HFWhisperEncoder(WhisperConfig(**cfg["whisper_config"]))
    sd = {"whisper_model." + k: v for k, v in enc.state_dict().items()}
    sd.update(qwen_tensors(g, lora))
    ad = Subsampler(D_ENC, INNER, D)
    sd.update({"adapter." + k: v for k, v in ad.state_dict().items()})
    sd["hidden2emotion.weight"] = torch.randn(5, D, generator=g)
    sd = {k: v.detach().to(dtype).clone().contiguous() for k, v in sd.items()}
    os.makedirs(folder, exist_ok=True)
    keys = list(sd)  # state-dict order, split in two like transformers' sharding does
    halves = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    wm = {}
    for name, ks in halves.items():
        torch.save({k: sd[k] for k in ks}, os.path.join(folder, name))
        wm.update({k: name for k in ks})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    with open(os.path.join(folder, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": wm}, f, indent=2)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    write_qwen1_tokenizer(folder)
    return sd


def write_qwen1_tokenizer(folder):
    """Qwen-1's tokenizer files, as the release and Qwen/Qwen-7B-Chat ship them."""
    with open(os.path.join(folder, "qwen.tiktoken"), "w") as f:
        f.write(tiny_tiktoken())
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 64, "tokenizer_class": "QWenTokenizer",
                   "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}}, f)
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump({"chat_format": "chatml", "eos_token_id": 262, "pad_token_id": 262,
                   "max_window_size": 6144, "max_new_tokens": 512, "do_sample": True, "top_k": 0, "top_p": 0.8}, f)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    sd = make_release(str(root / "blsp-emo"))
    out = release.convert(str(root / "blsp-emo"), str(root / "run"), log=lambda *a: None)
    return root, sd, out


def _files(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


def test_layout_no_pickle_and_config(converted):
    root, sd, out = converted
    files = _files(out)
    assert files == ["config.json", "llm/config.json", "llm/generation_config.json",
                     "llm/model-00001-of-00002.safetensors", "llm/model-00002-of-00002.safetensors",
                     "llm/model.json", "llm/model.safetensors.index.json", "llm/qwen.tiktoken", "llm/tokenizer.tiktoken",
                     "llm/tokenizer.tiktoken.json", "llm/tokenizer_config.json", "model.safetensors", "whisper/config.json",
                     "whisper/model.json", "whisper/model.safetensors"], files
    for f in files:  # torch pickles are zip files ("PK") or raw pickles (protocol byte 0x80)
        with open(os.path.join(out, f), "rb") as fh:
            head = fh.read(4)
        assert head[:2] != b"PK" and head[:1] != b"\x80", f
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["whisper"] == "whisper" and cfg["llm"] == "llm" and cfg["stage"] == "release"
    assert cfg["adapter"] == {"d_enc": D_ENC, "d_llm": D, "inner_dim": INNER, "kernel_size": 5, "n_convs": 3}
    assert cfg["lora"] == {"r": R, "alpha": ALPHA, "dropout": 0.05,
                           "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
    assert cfg["num_emotions"] == 5
    assert cfg["padded"] is True   # the release hears every clip padded to 30 s
    llm = json.load(open(os.path.join(out, "llm", "config.json")))
    assert llm["model_type"] == "qwen2" and llm["intermediate_size"] == INTER // 2 and llm["torch_dtype"] == "float32"
    ours = json.load(open(os.path.join(out, "llm", "model.json")))   # what model.py reads: Qwen-1 as a Qwen2
    assert (ours["dim"], ours["ffn_dim"], ours["qkv_bias"], ours["tie_embeddings"]) == (D, INTER // 2, True, False)
    assert json.load(open(os.path.join(out, "whisper", "model.json")))["d_model"] == D_ENC
    from safetensors.torch import load_file
    ours = load_file(os.path.join(out, "model.safetensors"))
    q = "qwen_model.model.transformer.h.1."
    assert torch.equal(ours["decoder.layers.1.self_attn.o_proj.lora_A"], sd[q + "attn.c_proj.lora_A.default.weight"])
    assert torch.equal(ours["decoder.layers.1.mlp.down_proj.lora_B"], sd[q + "mlp.c_proj.lora_B.default.weight"])
    assert torch.equal(ours["decoder.layers.0.mlp.gate_proj.lora_B"],
                       sd["qwen_model.model.transformer.h.0.mlp.w2.lora_B.default.weight"])
    # Qwen-1's fused q|k|v LoRA: A shared by the three, B split on its output axis
    A, B = sd[q + "attn.c_attn.lora_A.default.weight"], sd[q + "attn.c_attn.lora_B.default.weight"]
    for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
        assert torch.equal(ours[f"decoder.layers.1.self_attn.{name}.lora_A"], A)
        assert torch.equal(ours[f"decoder.layers.1.self_attn.{name}.lora_B"], B[j * D:(j + 1) * D])
    assert torch.equal(ours["emotion_head.weight"], sd["hidden2emotion.weight"])
    assert len([k for k in ours if ".lora_" in k]) == LAYERS * 7 * 2


def test_converting_twice_is_byte_identical_and_reads_each_shard_once(converted, monkeypatch):
    root, _, out = converted
    calls = []
    real_load = torch.load

    def spy(path, *a, **kw):
        assert kw.get("weights_only") is True and kw.get("mmap") is True, kw
        calls.append(os.path.basename(path))
        return real_load(path, *a, **kw)

    monkeypatch.setattr(torch, "load", spy)
    again = release.convert(str(root / "blsp-emo"), str(root / "run2"), log=lambda *a: None)
    assert sorted(calls) == ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    release.convert(str(root / "blsp-emo"), again, log=lambda *a: None)  # over an earlier conversion: replaced
    assert _files(out) == _files(again)
    for f in _files(out):
        with open(os.path.join(out, f), "rb") as a, open(os.path.join(again, f), "rb") as b:
            assert a.read() == b.read(), f


# ----------------------------------------------------------------------------- bad input: one line naming it

@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    src = tmp_path_factory.mktemp("pristine") / "blsp-emo"
    make_release(str(src))
    return src


def _copy(pristine, tmp_path):
    shutil.copytree(pristine, tmp_path / "src")
    return tmp_path / "src"


def _convert_fails(src, tmp_path):
    with pytest.raises(release.ReleaseError) as e:
        release.convert(str(src), str(tmp_path / "out"), log=lambda *a: None)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 400, msg
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    return msg


def test_a_missing_or_broken_config_is_named(tmp_path):
    """One reader (prepare.read_json) for the configs of a release, a Qwen-1 folder and a local HF folder."""
    import prepare
    with pytest.raises(release.ReleaseError, match=r"config.json: missing \(is .* the BLSP-Emo release folder\?\)$"):
        release.read_config(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(release.ReleaseError, match=r"config.json: not JSON"):
        release.convert_qwen(str(tmp_path), str(tmp_path / "out"))
    with pytest.raises(prepare.PrepareError, match=r"config.json: not JSON"):
        prepare.check_hf_folder(str(tmp_path), "llm")
    (tmp_path / "config.json").unlink()
    with pytest.raises(prepare.PrepareError, match=r"config.json: missing$"):
        prepare.check_hf_folder(str(tmp_path), "llm")


def test_missing_shard(pristine, tmp_path):
    src = _copy(pristine, tmp_path)
    os.remove(src / "pytorch_model-00002-of-00002.bin")
    msg = _convert_fails(src, tmp_path)
    assert "pytorch_model-00002-of-00002.bin" in msg and "missing" in msg


def test_wrong_shape(pristine, tmp_path):
    src = _copy(pristine, tmp_path)
    shard = src / "pytorch_model-00002-of-00002.bin"
    sd = torch.load(shard, weights_only=True)
    sd["hidden2emotion.weight"] = torch.zeros(5, D + 1)
    torch.save(sd, shard)
    msg = _convert_fails(src, tmp_path)
    assert "hidden2emotion.weight" in msg and f"(5, {D + 1})" in msg and f"(5, {D})" in msg


def test_index_names_a_key_the_shard_lacks(pristine, tmp_path):
    src = _copy(pristine, tmp_path)
    shard = src / "pytorch_model-00002-of-00002.bin"
    sd = torch.load(shard, weights_only=True)
    key = "qwen_model.model.transformer.h.1.mlp.w2.lora_B.default.weight"
    del sd[key]
    torch.save(sd, shard)
    msg = _convert_fails(src, tmp_path)
    assert key in msg and "pytorch_model-00002-of-00002.bin" in msg
    # and a key the config needs that the index does not name at all
    index = json.load(open(src / "pytorch_model.bin.index.json"))
    del index["weight_map"]["adapter.fc1.weight"]
    json.dump(index, open(src / "pytorch_model.bin.index.json", "w"))
    assert "adapter.fc1.weight" in _convert_fails(src, tmp_path)


@pytest.mark.parametrize("field,value", [("adapter_type", "cformer"), ("adapter_hidden_layers", 2),
                                         ("lora_scope", "global"), ("conv_kernel_sizes", "3,5,5"),
                                         ("num_emotions", 7)])
def test_unsupported_config(pristine, tmp_path, field, value):
    src = _copy(pristine, tmp_path)
    cfg = json.load(open(src / "config.json"))
    cfg[field] = value
    json.dump(cfg, open(src / "config.json", "w"))
    msg = _convert_fails(src, tmp_path)
    assert f"{field}={value!r}" in msg or f"{field}={value}" in msg, msg


def test_does_not_replace_a_foreign_folder(pristine, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(release.ReleaseError, match="not a converted release"):
        release.convert(str(pristine), str(tmp_path / "out"), log=lambda *a: None)
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


# ----------------------------------------------------------------------------- the converted run, against the oracle

def _qwen2_reference(sd):
    """transformers Qwen2 from the release's Qwen-1 tensors: c_attn split into q|k|v (with bias), w2 -> gate,
    w1 -> up, c_proj -> down; the LoRA delta B(A x) * alpha/r added by forward hooks where `mask` is 1."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=D, intermediate_size=INTER // 2, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=HEADS, rms_norm_eps=1e-6, rope_theta=10000.0,
                      max_position_embeddings=64, tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    ref = Qwen2ForCausalLM(cfg).eval()
    p = "qwen_model.model."
    new = {"model.embed_tokens.weight": sd[p + "transformer.wte.weight"], "lm_head.weight": sd[p + "lm_head.weight"],
           "model.norm.weight": sd[p + "transformer.ln_f.weight"]}
    mask, hooks = {}, []
    for i in range(LAYERS):
        h, o = f"{p}transformer.h.{i}.", f"model.layers.{i}."
        new[o + "input_layernorm.weight"] = sd[h + "ln_1.weight"]
        new[o + "post_attention_layernorm.weight"] = sd[h + "ln_2.weight"]
        W, b = sd[h + "attn.c_attn.weight"], sd[h + "attn.c_attn.bias"]
        A, B = sd[h + "attn.c_attn.lora_A.default.weight"], sd[h + "attn.c_attn.lora_B.default.weight"]
        layer = ref.model.layers[i]
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            rows = slice(j * D, (j + 1) * D)  # Qwen-1's c_attn is q|k|v stacked on the output axis
            new[o + f"self_attn.{name}.weight"], new[o + f"self_attn.{name}.bias"] = W[rows], b[rows]
            hooks.append((getattr(layer.self_attn, name), A, B[rows]))
        for mod, src in ((layer.self_attn.o_proj, "attn.c_proj"), (layer.mlp.gate_proj, "mlp.w2"),
                         (layer.mlp.up_proj, "mlp.w1"), (layer.mlp.down_proj, "mlp.c_proj")):
            name = [n for n, m in ref.named_modules() if m is mod][0]
            new[name + ".weight"] = sd[h + src + ".weight"]
            hooks.append((mod, sd[h + src + ".lora_A.default.weight"], sd[h + src + ".lora_B.default.weight"]))
    missing, unexpected = ref.load_state_dict(new, strict=False)
    assert not unexpected and not [k for k in missing if "rotary" not in k], (missing, unexpected)
    for mod, A, B in hooks:
        mod.register_forward_hook(
            lambda m, inp, out, A=A, B=B: out + (inp[0] @ A.T @ B.T) * (ALPHA / R) * mask["m"][..., None]
            if mask.get("m") is not None else out)
    return ref, mask


def test_converted_run_matches_the_reference(converted):
    """Encoder, adapter, emotion head and the LLM with partial LoRA, within 1e-5 in fp32."""
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder as HFWhisperEncoder
    import data
    from adapter import SpeechLM, partial_lora
    _, sd, out = converted
    lm = SpeechLM.from_run(out, device="cpu", dtype="fp32")
    g = torch.Generator().manual_seed(1)
    mel, n_mel = torch.randn(1, N_MELS, 2 * N_CTX, generator=g), 40  # padded mode: the release's 30 s window

    hf = HFWhisperEncoder(WhisperConfig(**whisper_config())).eval()
    hf.load_state_dict({k[len("whisper_model."):]: v for k, v in sd.items() if k.startswith("whisper_model.")})
    n_enc = (n_mel - 1) // 2 + 1
    with torch.no_grad():
        h_ref = hf(mel).last_hidden_state[:, :n_enc]  # the release truncates to output_lengths afterwards
        x, lens = lm.encoder(mel, lengths=torch.tensor([n_mel]), padded=True)
    assert lens.tolist() == [n_enc]
    torch.testing.assert_close(x[:, :n_enc], h_ref, atol=1e-5, rtol=0)

    ad = Subsampler(D_ENC, INNER, D).eval()
    ad.load_state_dict({k[len("adapter."):]: v for k, v in sd.items() if k.startswith("adapter.")})
    with torch.no_grad():
        sp_ref = ad(h_ref)
        sp, sp_len = lm.speech_embeds([x[0, :n_enc]])
        emo = lm.emotion_logits(sp, sp_len)
    assert sp.shape == sp_ref.shape == (1, 3, D) and sp_len.tolist() == [3]
    torch.testing.assert_close(sp, sp_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(emo, sp_ref.mean(1) @ sd["hidden2emotion.weight"].T, atol=1e-5, rtol=0)

    row = lm.tok.encode_chat([{"role": "system", "content": "the"},
                              {"role": "user", "content": ["in the", data.SPEECH]}])
    assert row.count(data.SPEECH) == 1 and max(row) < VOCAB, row
    with torch.no_grad():
        batch = lm.splice([row], [sp[0]])
        with partial_lora(lm.decoder, batch["speech_mask"], batch["valid"]):
            logits = lm.decoder(embeds=batch["embeds"], valid=batch["valid"])
        plain = lm.decoder(embeds=batch["embeds"], valid=batch["valid"])
    s = row.index(data.SPEECH)
    wte = sd["qwen_model.model.transformer.wte.weight"]
    emb_ref = torch.cat([wte[row[:s]], sp_ref[0], wte[row[s + 1:]]])[None]
    speech_mask = torch.zeros(1, emb_ref.shape[1])
    speech_mask[0, s:s + 3] = 1
    torch.testing.assert_close(batch["embeds"], emb_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(batch["speech_mask"].float(), speech_mask)

    ref, mask = _qwen2_reference(sd)
    with torch.no_grad():
        mask["m"] = speech_mask
        want = ref(inputs_embeds=emb_ref).logits
        mask["m"] = None
        want_plain = ref(inputs_embeds=emb_ref).logits
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(plain, want_plain, atol=1e-5, rtol=0)
    # the test is not vacuous: the LoRA moves the logits from the speech on, and only from there
    assert (logits - plain)[0, s:].abs().max() > 1e-2
    assert (logits - plain)[0, :s].abs().max() == 0


def test_converted_run_hears_a_clip_as_the_release_does(tmp_path):
    """End to end from the waveform, a 3.2 s clip: our converted run (padded, as its config says) against the
    release's own path assembled from transformers: WhisperFeatureExtractor(padding="max_length") features and
    attention mask, transformers' WhisperEncoder over the 30 s window, its output cut at the mask's length
    ((sum - 1) // 2 + 1, as the release's encoder cuts it), the release's subsampler, the emotion head, and the
    Qwen2 reference with the LoRA at the speech positions. The clip has 51,280 samples, not a multiple of 160:
    the mask counts 321 mel frames where n // 160 would give 320, and one adapter frame more (21, not 20)."""
    import numpy as np
    from transformers import WhisperConfig, WhisperFeatureExtractor
    from transformers.models.whisper.modeling_whisper import WhisperEncoder as HFWhisperEncoder
    import data
    import tiny
    from adapter import SpeechLM, partial_lora
    wc = WhisperConfig(num_mel_bins=80, d_model=D_ENC, encoder_layers=ENC_LAYERS, encoder_attention_heads=2,
                       encoder_ffn_dim=32, max_source_positions=1500, decoder_layers=1, decoder_attention_heads=2,
                       decoder_ffn_dim=32, max_target_positions=16).to_dict()   # the real 30 s window: 3000 frames
    sd = make_release(str(tmp_path / "src"), cfg=release_config(whisper_config=wc))
    lm = SpeechLM.from_run(release.convert(str(tmp_path / "src"), str(tmp_path / "run"), log=lambda *a: None),
                           device="cpu", dtype="fp32")
    clip = tiny.chirp(51280 / 16000, seed=5)
    assert clip.shape == (51280,)

    fe = WhisperFeatureExtractor(feature_size=80)
    inputs = fe(clip, sampling_rate=16000, padding="max_length", return_attention_mask=True, return_tensors="pt")
    hf = HFWhisperEncoder(WhisperConfig(**wc)).eval()
    hf.load_state_dict({k[len("whisper_model."):]: v for k, v in sd.items() if k.startswith("whisper_model.")})
    ad = Subsampler(D_ENC, INNER, D).eval()
    ad.load_state_dict({k[len("adapter."):]: v for k, v in sd.items() if k.startswith("adapter.")})
    with torch.no_grad():
        assert inputs.attention_mask.sum().item() == 321
        n_enc = int(hf._get_feat_extract_output_lengths(inputs.attention_mask.sum(-1)))
        sp_ref = ad(hf(inputs.input_features).last_hidden_state[:, :n_enc])
        emo_ref = sp_ref.mean(1) @ sd["hidden2emotion.weight"].T

        feats = lm.encode_audio([torch.from_numpy(clip)])   # no mode given: the run's own
        sp, sp_len = lm.speech_embeds(feats)
        emo = lm.emotion_logits(sp, sp_len)
        real = lm.encode_audio([torch.from_numpy(clip)], padded=False)
    assert feats[0].shape[0] == n_enc == 161 and sp.shape == sp_ref.shape == (1, 21, D)
    assert real[0].shape[0] == 160   # real-frames mode counts n // 160: another length, other features

    row = lm.tok.encode_chat([{"role": "system", "content": "the"},
                              {"role": "user", "content": ["in the", data.SPEECH]}])
    s = row.index(data.SPEECH)
    wte = sd["qwen_model.model.transformer.wte.weight"]
    emb_ref = torch.cat([wte[row[:s]], sp_ref[0], wte[row[s + 1:]]])[None]
    ref, mask = _qwen2_reference(sd)
    mask["m"] = torch.zeros(1, emb_ref.shape[1])
    mask["m"][0, s:s + sp_ref.shape[1]] = 1
    with torch.no_grad():
        batch = lm.splice([row], [sp[0]])
        with partial_lora(lm.decoder, batch["speech_mask"], batch["valid"]):
            logits = lm.decoder(embeds=batch["embeds"], valid=batch["valid"])
        want = ref(inputs_embeds=emb_ref).logits
    diffs = {"speech embeddings": (sp - sp_ref).abs().max().item(),
             "emotion logits": (emo - emo_ref).abs().max().item(), "LLM logits": (logits - want).abs().max().item()}
    print("ours vs the release's path, max |diff|: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    # fp32 throughout; the log-mels differ by rounding only (numpy's FFT against torch's): measured 4e-6 at most
    assert max(diffs.values()) < 2e-5, diffs
    assert want.abs().max() > 1 and np.isfinite(logits.numpy()).all()


def test_release_without_lora_keeps_bf16(tmp_path):
    """A stage-1 style release (lora_config {}: keys under qwen_model. directly), stored in bf16."""
    from safetensors import safe_open
    from adapter import SpeechLM
    make_release(str(tmp_path / "src"), lora=False, dtype=torch.bfloat16)
    lines = []
    out = release.convert(str(tmp_path / "src"), str(tmp_path / "run"), log=lines.append)
    assert "M parameters" in lines[0] and "MB of weights as stored (bfloat16)" in lines[0]
    assert "peak memory" in lines[0]
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["lora"] is None
    assert json.load(open(os.path.join(out, "llm", "config.json")))["torch_dtype"] == "bfloat16"
    # here the whisper tensors span both input shards: written as two safetensors shards + an index
    index = json.load(open(os.path.join(out, "whisper", "model.safetensors.index.json")))["weight_map"]
    with safe_open(os.path.join(out, "whisper", index["model.encoder.conv1.weight"]), "pt") as f:
        assert f.get_tensor("model.encoder.conv1.weight").dtype == torch.bfloat16
    lm = SpeechLM.from_run(out, device="cpu")
    assert not any(".lora_" in n for n, _ in lm.named_parameters()) and lm.decoder.embed_tokens.weight.dtype == torch.bfloat16


def test_single_file_release_with_tied_storage(pristine, tmp_path, monkeypatch, capsys):
    """A lone pytorch_model.bin (no index) is read once; tensors sharing storage in the pickle still convert."""
    src = tmp_path / "src"
    src.mkdir()
    for f in ("config.json", "qwen.tiktoken"):
        (src / f).write_bytes((pristine / f).read_bytes())
    sd = {}
    for shard in ("pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"):
        sd.update(torch.load(pristine / shard, weights_only=True))
    sd["qwen_model.model.lm_head.weight"] = sd["qwen_model.model.transformer.wte.weight"]  # one storage
    sd["qwen_model.model.transformer.h.0.attn.rotary_emb.inv_freq"] = torch.ones(4)  # old Qwen-1 buffer: skipped
    torch.save(sd, src / "pytorch_model.bin")
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda p, *a, **kw: calls.append(p) or real_load(p, *a, **kw))
    assert release.main([str(src), str(tmp_path / "run")]) == 0
    assert len(calls) == 1 and "chat.py" in capsys.readouterr().out and not (tmp_path / "run.partial").exists()
    from safetensors.torch import load_file
    llm = load_file(str(tmp_path / "run" / "llm" / "model.safetensors"))
    assert torch.equal(llm["lm_head.weight"], sd["qwen_model.model.transformer.wte.weight"])


# ----------------------------------------------------------------------------- a plain Qwen-1 folder, through prepare.py

def make_qwen1(folder, fmt="safetensors", seed=3):
    """A Qwen-1 folder as `huggingface-cli download Qwen/Qwen-7B-Chat` leaves it (tiny): config.json with
    model_type "qwen", the weights under Qwen-1's own names (no prefix, no LoRA) in two shards + an index
    (safetensors, or an older revision's pickles), Qwen-1's tokenizer files. Returns the tensors under the
    release's names, for _qwen2_reference (whose LoRA hooks stay off without a mask)."""
    from safetensors.torch import save_file
    sd = qwen_tensors(torch.Generator().manual_seed(seed))
    plain = {k[len("qwen_model.model."):]: v.contiguous() for k, v in sd.items() if ".lora_" not in k}
    os.makedirs(folder)
    keys, wm = list(plain), {}
    stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    for i, ks in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"{stem}-{i + 1:05d}-of-00002.{ext}"
        part = {k: plain[k] for k in ks}
        if fmt == "safetensors":
            save_file(part, os.path.join(folder, name), metadata={"format": "pt"})
        else:
            torch.save(part, os.path.join(folder, name))
        wm.update({k: name for k in ks})
    with open(os.path.join(folder, f"{stem}.{ext}.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(v.numel() * 4 for v in plain.values())}, "weight_map": wm}, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(dict(release_config()["qwen_config"], torch_dtype="float32"), f, indent=2)
    with open(os.path.join(folder, "modeling_qwen.py"), "w") as f:   # the remote code it ships: not read
        f.write("raise RuntimeError('not ours to run')\n")
    write_qwen1_tokenizer(folder)
    return sd


@pytest.fixture
def whisper_folder(converted, tmp_path):
    """prepare.main wants a Whisper too: the release conversion's, a plain Hugging Face Whisper folder."""
    shutil.copytree(os.path.join(converted[2], "whisper"), tmp_path / "whisper")
    return tmp_path / "whisper"


def _prepare(src, whisper, out):
    import prepare
    prepare.main([f"--whisper={whisper}", f"--llm={src}", f"--out={out}", "--quiet", "--no-speech"])


def test_prepare_converts_a_qwen1_folder_once(converted, whisper_folder, tmp_path, monkeypatch):
    """The paper's recipe, `prepare.py --llm=PATH/Qwen-7B-Chat`: converted once into checkpoints/Qwen-7B-Chat in
    Qwen2's names, which model.py and tokenizer.py read, with the Qwen-1 weights' logits (fp32, within 1e-5)."""
    from model import Decoder
    from tokenizer import Tokenizer
    src, out = tmp_path / "hub" / "Qwen-7B-Chat", tmp_path / "checkpoints"
    sd = make_qwen1(str(src))
    before = _files(src)
    calls = []
    real = release.convert_qwen
    monkeypatch.setattr(release, "convert_qwen", lambda *a, **kw: calls.append(a) or real(*a, **kw))
    _prepare(src, whisper_folder, out)
    dest = out / "Qwen-7B-Chat"
    assert len(calls) == 1 and not os.path.islink(dest) and _files(src) == before   # the download is left as it is
    assert _files(dest) == ["config.json", "generation_config.json", "model-00001-of-00002.safetensors",
                            "model-00002-of-00002.safetensors", "model.json", "model.safetensors.index.json",
                            "qwen.tiktoken", "source.json", "tokenizer.tiktoken", "tokenizer.tiktoken.json",
                            "tokenizer_config.json"], _files(dest)
    assert json.load(open(dest / "config.json"))["model_type"] == "qwen2"

    dec, tok = Decoder.from_pretrained(dest, dtype="fp32", device="cpu"), Tokenizer.from_pretrained(dest)
    row = tok.encode_chat([{"role": "system", "content": "the"}, {"role": "user", "content": "in the then"}])
    assert max(row) < VOCAB and row == Tokenizer.from_pretrained(os.path.join(converted[2], "llm")).encode_chat(
        [{"role": "system", "content": "the"}, {"role": "user", "content": "in the then"}])   # Qwen-1's chatml
    ref, _ = _qwen2_reference(sd)
    with torch.no_grad():
        got, want = dec(torch.tensor([row])), ref(torch.tensor([row])).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert want.abs().max() > 1

    _prepare(src, whisper_folder, out)   # a rerun: the source's files are as recorded, nothing is converted
    assert len(calls) == 1
    os.utime(src / "generation_config.json", ns=(0, 0))   # a re-download: converted again, in place
    _prepare(src, whisper_folder, out)
    assert len(calls) == 2 and sorted(os.listdir(out)) == ["Qwen-7B-Chat", "whisper"]


def test_pickled_qwen1_shards_convert_to_the_same_bytes(tmp_path):
    """An older Qwen-7B-Chat revision ships pytorch_model-*.bin: the same tensors give the same files."""
    import prepare
    for fmt in ("safetensors", "bin"):
        make_qwen1(str(tmp_path / fmt / "Qwen-7B-Chat"), fmt)
        prepare.convert_qwen1(str(tmp_path / fmt / "Qwen-7B-Chat"), str(tmp_path / fmt / "out"))
    a, b = tmp_path / "safetensors" / "out" / "Qwen-7B-Chat", tmp_path / "bin" / "out" / "Qwen-7B-Chat"
    assert _files(a) == _files(b)
    for f in _files(a):
        if f != "source.json":   # it names the source's files
            assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_broken_qwen1_folder_names_the_tensor(whisper_folder, tmp_path):
    from safetensors.torch import load_file, save_file
    src, out = tmp_path / "Qwen-7B-Chat", tmp_path / "checkpoints"
    make_qwen1(str(src))
    key = "transformer.h.1.mlp.w2.weight"
    index = json.load(open(src / "model.safetensors.index.json"))
    shard = src / index["weight_map"][key]
    save_file({k: v for k, v in load_file(shard).items() if k != key}, shard, metadata={"format": "pt"})
    with pytest.raises(SystemExit, match=rf"^error: {re.escape(str(shard))}: has no {key}, which "
                                         r"model.safetensors.index.json says it holds$"):
        _prepare(src, whisper_folder, out)
    del index["weight_map"][key]   # and a download whose index lacks it: refused before any shard is read
    json.dump(index, open(src / "model.safetensors.index.json", "w"))
    with pytest.raises(SystemExit, match=rf"model.safetensors.index.json: has no {key} \(the config needs it\)$"):
        _prepare(src, whisper_folder, out)
    assert sorted(os.listdir(out)) == ["whisper"]   # nothing half-written left behind
    (src / "qwen.tiktoken").unlink()
    with pytest.raises(SystemExit, match=r"Qwen-7B-Chat/qwen.tiktoken: missing \(the Qwen-1 tokenizer\)$"):
        _prepare(src, whisper_folder, out)
    # a folder of the user's where the conversion would go is not replaced
    (out / "Qwen-7B-Chat").mkdir()
    (out / "Qwen-7B-Chat" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match=r"checkpoints/Qwen-7B-Chat: already exists; the conversion goes there"):
        _prepare(src, whisper_folder, out)
    assert (out / "Qwen-7B-Chat" / "notes.txt").read_text() == "mine"
