# model.py against transformers as the oracle: tiny random models in the published layouts are saved
# with save_pretrained (safetensors), loaded with our code and compared (fp32, CPU).
import contextlib
import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

import convert  # noqa: E402
from chat import sampler  # noqa: E402
from model import (Decoder, DecoderConfig, KVCache, WhisperConfig, WhisperEncoder, read_config,  # noqa: E402
                   pick_device, pick_dtype, rope_inv_freq)

TOL = 1e-4
VOCAB = 101


def save(hf, folder, kind, **kw):
    """save_pretrained, then what prepare.py does to a folder: model.json from its config.json."""
    hf.save_pretrained(folder, **kw)
    convert.write_config(folder, kind)


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


@torch.no_grad()
def randomize(model):
    # transformers' init (std 0.02, norms 1, biases 0) gives near-uniform attention and logits near 0:
    # larger weights make every parameter, norms and biases included, move the outputs visibly
    for name, p in model.named_parameters():
        if "norm" in name:
            p.copy_(1 + 0.2 * torch.randn_like(p))
        else:
            p.normal_(0, 0.1 if name.endswith("bias") else 1.5 / p.shape[-1] ** 0.5)


# ----------------------------------------------------------------------------- Whisper

def hf_whisper(n_mels):
    cfg = transformers.WhisperConfig(
        num_mel_bins=n_mels, d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
        decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64, vocab_size=100, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, decoder_start_token_id=3, begin_suppress_tokens=None, suppress_tokens=None)
    torch.manual_seed(n_mels)
    model = transformers.WhisperForConditionalGeneration(cfg).eval()
    randomize(model)
    return model


@pytest.fixture(scope="module")
def whisper80(tmp_path_factory):
    hf = hf_whisper(80)
    folder = tmp_path_factory.mktemp("whisper80")
    save(hf, folder, "whisper")                     # full model: keys model.encoder.* and model.decoder.*
    return hf, WhisperEncoder.from_pretrained(folder, device="cpu"), folder


@pytest.mark.parametrize("n_mels", [80, 128])
def test_whisper_padded_matches_transformers(n_mels, whisper80, tmp_path):
    if n_mels == 80:
        hf, ours, _ = whisper80
    else:                                           # large-v3 style: an encoder-only file, keys encoder.*
        hf = hf_whisper(128)
        sd = {k[len("model."):]: v.contiguous() for k, v in hf.state_dict().items() if k.startswith("model.encoder.")}
        save_file(sd, tmp_path / "model.safetensors")
        hf.config.to_json_file(tmp_path / "config.json")
        convert.write_config(tmp_path, "whisper")
        ours = WhisperEncoder.from_pretrained(tmp_path, device="cpu")
    assert ours.cfg.n_mels == n_mels and ours.embed_positions.weight.shape == (1500, 32)
    mel = torch.randn(2, n_mels, 3000)
    with torch.no_grad():
        want = hf.model.encoder(mel).last_hidden_state
        got, lengths = ours(mel, [3000, 3000], padded=True)
    assert got.shape == (2, 1500, 32) and lengths.tolist() == [1500, 1500]
    assert max_diff(got, want) < TOL


def test_whisper_real_frames_batch_equals_each_clip_alone(whisper80):
    _, enc, _ = whisper80
    lengths = [300, 217, 51]
    clips = [torch.randn(80, n) for n in lengths]
    batch = torch.randn(3, 80, 300) * 5             # junk past each clip's end: must not matter
    for i, c in enumerate(clips):
        batch[i, :, :c.shape[1]] = c
    with torch.no_grad():
        out, out_len = enc(batch, torch.tensor(lengths))
        assert out.shape == (3, 150, 32) and out_len.tolist() == [150, 109, 26]
        for i, c in enumerate(clips):
            alone, n = enc(c[None], [c.shape[1]])
            assert n.tolist() == [out_len[i].item()]
            assert max_diff(out[i, :n[0]], alone[0]) < 1e-5
        # padded mode ignores lengths (the reference attends over padding) but still reports them
        full, full_len = enc(torch.randn(1, 80, 3000), torch.tensor([400]), padded=True)
        assert full.shape == (1, 1500, 32) and full_len.tolist() == [200]
        # real frames: a short clip beside one that fills the whole 30 s window is still masked
        both = torch.randn(2, 80, 3000) * 5
        both[1, :, :51] = clips[2]
        out, out_len = enc(both, torch.tensor([3000, 51]))
        assert out_len.tolist() == [1500, 26] and max_diff(out[1, :26], enc(clips[2][None], [51])[0][0]) < 1e-5
    with pytest.raises(RuntimeError, match="80"):   # conv1 names the channels it expects
        enc(torch.randn(1, 128, 100), [100])


def test_whisper_sharded_checkpoint(whisper80, tmp_path):
    hf, ours, _ = whisper80
    save(hf, tmp_path, "whisper", max_shard_size="30KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    sharded = WhisperEncoder.from_pretrained(tmp_path, device="cpu")
    for (n, a), (_, b) in zip(ours.state_dict().items(), sharded.state_dict().items()):
        assert torch.equal(a, b), n


# ----------------------------------------------------------------------------- decoder

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}


def hf_decoder(kind, **over):
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None, rms_norm_eps=1e-5)
    common.update(over)
    torch.manual_seed(1)
    if kind == "qwen2":      # untied, q/k/v bias, GQA
        cfg = transformers.Qwen2Config(**{"tie_word_embeddings": False, "rope_theta": 1e4, **common})
        model = transformers.Qwen2ForCausalLM(cfg)
    else:                    # tied, llama3 rope scaling, GQA
        cfg = transformers.LlamaConfig(**{"tie_word_embeddings": True, "rope_scaling": dict(LLAMA3_ROPE),
                                          "rope_theta": 5e5, **common})
        model = transformers.LlamaForCausalLM(cfg)
    randomize(model)
    return model.eval()


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def pair(request, tmp_path_factory):
    hf = hf_decoder(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    save(hf, folder, "llm")
    return hf, Decoder.from_pretrained(folder, device="cpu"), folder


def hf_greedy(hf, ids, n, mask=None):
    out = hf.generate(ids, attention_mask=torch.ones_like(ids) if mask is None else mask, max_new_tokens=n,
                      min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:].tolist()


def test_config_and_weights(pair):
    hf, ours, _ = pair
    cfg = ours.cfg
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim, cfg.vocab_size) == (32, 2, 4, 2, 48, VOCAB)
    assert cfg.norm_eps == 1e-5 and ours.embed_tokens.weight.dtype == torch.float32
    if not cfg.qkv_bias:   # the llama one
        assert cfg.tie_embeddings and ours.lm_head.weight is ours.embed_tokens.weight
        assert cfg.rope_theta == 5e5 and cfg.rope_scaling["rope_type"] == "llama3"
        plain = rope_inv_freq(DecoderConfig(**{**cfg.__dict__, "rope_scaling": None}))
        assert not torch.allclose(ours.inv_freq, plain)      # the scaling really changes the frequencies
        assert max_diff(ours.inv_freq, hf.model.rotary_emb.inv_freq) < 1e-9
    else:
        assert not cfg.tie_embeddings and ours.lm_head.weight is not ours.embed_tokens.weight


def test_logits_match_transformers(pair):
    hf, ours, _ = pair
    tokens = torch.randint(0, VOCAB, (2, 40))
    with torch.no_grad():
        want = hf(tokens).logits
        got = ours(tokens)
        assert max_diff(got, want) < TOL
        assert max_diff(ours(embeds=ours.embed_tokens(tokens)), want) < TOL
        # padding, left in row 0 and right in row 1: positions count real tokens only
        valid = torch.ones(2, 40, dtype=torch.bool)
        valid[0, :7] = False
        valid[1, 30:] = False
        pos = (valid.cumsum(1) - 1).clamp(min=0)
        want = hf(tokens, attention_mask=valid.long(), position_ids=pos).logits
        got = ours(tokens, valid=valid)
        assert not got.isnan().any()
        assert max_diff(got[valid], want[valid]) < TOL
        assert max_diff(ours(tokens, valid=valid, logits_at=valid), want[valid]) < TOL
        # the padding is never computed: the layers see the 63 real positions, not 80
        seen = []
        h = ours.layers[0].mlp.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
        ours(tokens, valid=valid)
        h.remove()
        assert seen == [63]
        # logits_at: an index along the sequence
        full = ours(tokens)
        assert max_diff(ours(tokens, logits_at=-1), full[:, -1]) < 1e-6


def test_greedy_generate_matches_transformers(pair):
    hf, ours, _ = pair
    prompt = torch.randint(0, VOCAB, (1, 9))
    got = ours.generate(prompt, max_new_tokens=20)
    want = hf_greedy(hf, prompt, 20)
    assert len(got[0]) == 20 and got == want
    assert ours.generate(embeds=ours.embed_tokens(prompt), max_new_tokens=20) == want    # the speech path


def test_cached_decoding_equals_uncached(pair):
    _, ours, _ = pair
    tokens = torch.randint(0, VOCAB, (2, 30))
    valid = torch.ones(2, 30, dtype=torch.bool)
    valid[1, :5] = False                              # left padding carried through the cache
    with torch.no_grad():
        full = ours(tokens, valid=valid)
        cache = KVCache(ours.cfg, 2, 32, "cpu", torch.float32)
        steps = [ours(tokens[:, :12], valid=valid[:, :12], cache=cache)]
        steps += [ours(tokens[:, i:i + 1], cache=cache) for i in range(12, 20)]
        steps.append(ours(tokens[:, 20:], cache=cache))
    assert cache.len == 30 and cache.valid[:, :30].sum(1).tolist() == [30, 25]
    got = torch.cat(steps, 1)
    assert max_diff(got[valid], full[valid]) < TOL
    with pytest.raises(RuntimeError):   # past the preallocated length
        ours(tokens[:, :3], cache=cache)


def test_left_padded_batch_generate_equals_single(pair):
    hf, ours, _ = pair
    prompts = [torch.randint(0, VOCAB, (n,)) for n in (11, 6, 9)]
    batch = torch.zeros(3, 11, dtype=torch.long)
    valid = torch.zeros(3, 11, dtype=torch.bool)
    for i, p in enumerate(prompts):
        batch[i, 11 - len(p):] = p
        valid[i, 11 - len(p):] = True
    got = ours.generate(batch, valid=valid, max_new_tokens=12)
    for i, p in enumerate(prompts):
        single = ours.generate(p[None], max_new_tokens=12)
        assert got[i] == single[0] == hf_greedy(hf, p[None], 12)[0]


@pytest.mark.filterwarnings("ignore:Passing `repetition_penalty` with `inputs_embeds`")   # it says what we test
def test_repetition_penalty_matches_transformers_from_embeddings(pair):
    """The penalty counts the reply's own ids, as transformers' does when the prompt is given as embeddings
    (how the release and SpeechLM prompt with speech): equal greedy ids, and not the unpenalized ones."""
    hf, ours, _ = pair
    prompt = torch.randint(0, VOCAB, (2, 7))
    embeds = ours.embed_tokens(prompt).detach()
    plain = ours.generate(embeds=embeds, max_new_tokens=16)
    assert any(len(set(row)) < len(row) for row in plain)   # greedy repeats itself here: the penalty has work
    got = ours.generate(embeds=embeds, max_new_tokens=16, pick=sampler(repetition_penalty=1.8))
    ref = hf.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(prompt), max_new_tokens=16,
                      min_new_tokens=16, do_sample=False, pad_token_id=0, repetition_penalty=1.8)
    assert got == ref.tolist()
    assert got != plain


def test_stop_ids_sampling_and_streaming(pair):
    _, ours, _ = pair
    prompt = torch.randint(0, VOCAB, (2, 5))
    greedy = ours.generate(prompt, max_new_tokens=10)
    stop = greedy[0][4]
    cut = greedy[0].index(stop)
    seen = []
    got = ours.generate(prompt, max_new_tokens=10, stop_ids=[stop], on_token=lambda ids: seen.append(ids.tolist()))
    assert got[0] == greedy[0][:cut]
    assert seen[cut][0] == -1 and all(s[0] == -1 for s in seen[cut:])
    assert [s[1] for s in seen if s[1] >= 0] == got[1]
    # sampling: seeded runs repeat, top_k=1 and a tiny top_p are greedy
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    a = ours.generate(prompt, max_new_tokens=10, pick=sampler(1.0, generator=g()))
    assert a == ours.generate(prompt, max_new_tokens=10, pick=sampler(1.0, generator=g()))
    assert a != greedy   # it samples
    assert ours.generate(prompt, max_new_tokens=10, pick=sampler(0.7, top_k=1, generator=g())) == greedy
    assert ours.generate(prompt, max_new_tokens=10, pick=sampler(0.7, top_p=1e-6, generator=g())) == greedy
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    gen = g()
    assert {sampler(1.0, top_k=2, generator=gen)(logits).item() for _ in range(50)} == {2, 3}
    assert {sampler(1.0, top_p=0.9, generator=gen)(logits).item() for _ in range(50)} == {1, 2, 3}
    assert sampler()(logits).tolist() == [3]


def test_prompt_scope_covers_the_prompt_only(pair):
    """generate reads the prompt inside prompt_scope (SpeechLM's partial LoRA) and each new token outside it."""
    _, ours, _ = pair
    inside, seen = [False], []

    @contextlib.contextmanager
    def scope():
        inside[0] = True
        yield
        inside[0] = False
    # the attention sees (positions computed, dim): one row here
    h = ours.layers[0].self_attn.register_forward_hook(lambda m, args, out: seen.append((args[0].shape[0], inside[0])))
    ours.generate(torch.randint(0, VOCAB, (1, 4)), prompt_scope=scope(), max_new_tokens=3, stop_ids=[])
    h.remove()
    assert seen == [(4, True), (1, False), (1, False)]


def test_sharded_checkpoint_and_dtype(pair, tmp_path):
    hf, ours, _ = pair
    save(hf, tmp_path, "llm", max_shard_size="20KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    sharded = Decoder.from_pretrained(tmp_path, device="cpu")
    tokens = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        assert torch.equal(sharded(tokens), ours(tokens))
    half = Decoder.from_pretrained(tmp_path, dtype="bf16", device="cpu")
    assert half.embed_tokens.weight.dtype == torch.bfloat16 and half.inv_freq.dtype == torch.float32
    with torch.no_grad():
        assert max_diff(half(tokens), ours(tokens)) < 0.5


# ----------------------------------------------------------------------------- Qwen-1 layout

def test_qwen1_folder_points_at_the_release_converter(tmp_path):
    """Qwen-1 (the release's LLM, the paper's Qwen-7B-Chat) is converted to Qwen2's names once, by scripts/release.py
    (tests/test_release.py checks it against transformers' Qwen2, also through prepare.py --llm=PATH); model.py
    reads only Llama and Qwen2 folders."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen", "vocab_size": VOCAB, "hidden_size": 32,
                                                      "num_hidden_layers": 2, "num_attention_heads": 4}))
    with pytest.raises(convert.FormatError, match=re.escape(str(tmp_path / "config.json")) +
                       ": model_type 'qwen' is not supported.*scripts/release.py"):
        convert.write_config(tmp_path, "llm")
    assert not (tmp_path / "model.json").exists()


# ----------------------------------------------------------------------------- bad checkpoints

@pytest.mark.parametrize("fault", ["missing", "unexpected", "shape"])
def test_bad_checkpoint_names_the_key(fault, pair, tmp_path):
    _, _, folder = pair
    sd = load_file(os.path.join(folder, "model.safetensors"))
    key = "model.layers.1.self_attn.k_proj.weight"
    if fault == "missing":
        del sd[key]
    elif fault == "unexpected":
        key = "model.layers.1.mlp.extra.weight"
        sd[key] = torch.zeros(2)
    else:
        sd[key] = sd[key][:-1]
    save_file(sd, tmp_path / "model.safetensors")
    shutil.copy(folder / "model.json", tmp_path)
    with pytest.raises(ValueError, match=re.escape(key.removeprefix("model."))) as err:   # our name: HF's, unprefixed
        Decoder.from_pretrained(tmp_path, device="cpu")
    assert str(tmp_path) in str(err.value)


def test_bad_whisper_checkpoint_names_the_key(whisper80, tmp_path):
    _, _, folder = whisper80
    sd = load_file(os.path.join(folder, "model.safetensors"))
    key = "model.encoder.layers.0.fc1.bias"
    del sd[key]
    save_file(sd, tmp_path / "model.safetensors")
    shutil.copy(folder / "model.json", tmp_path)
    with pytest.raises(ValueError, match=re.escape(key.removeprefix("model.encoder."))):
        WhisperEncoder.from_pretrained(tmp_path, device="cpu")


def test_folder_without_model_json_names_the_prepare_command(pair, whisper80, tmp_path):
    for cls, (_, ours, folder), flag in ((Decoder, pair, "llm"), (WhisperEncoder, whisper80, "whisper")):
        dest = tmp_path / flag
        dest.mkdir()
        shutil.copy(folder / "config.json", dest)                      # a Hugging Face folder, never prepared
        (dest / "model.safetensors").symlink_to(folder / "model.safetensors")
        with pytest.raises(FileNotFoundError, match=re.escape(
                f"{dest / 'model.json'}: missing; run `python scripts/prepare.py --{flag}={dest}` first")):
            cls.from_pretrained(dest, device="cpu")
        convert.write_config(dest, flag)
        assert cls.from_pretrained(dest, device="cpu").cfg == ours.cfg


def test_hf_config_translation(tmp_path):
    llama = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
             "num_attention_heads": 2, "intermediate_size": 16}
    with pytest.raises(ValueError, match="gpt2"):
        convert.decoder_config_from_hf(dict(llama, model_type="gpt2"))
    for bad, msg in (({"attention_bias": True}, "attention_bias"), ({"head_dim": 8}, "head_dim 8"),
                     ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope type 'yarn'")):
        with pytest.raises(ValueError, match=msg):
            convert.decoder_config_from_hf(dict(llama, **bad))
    cfg = convert.decoder_config_from_hf(dict(llama, rope_theta=5e5, rope_scaling=dict(LLAMA3_ROPE)))
    assert cfg.rope_theta == 5e5 and cfg.rope_scaling["factor"] == 8.0
    # transformers 5 writes theta and the scaling into one rope_parameters entry
    cfg5 = convert.decoder_config_from_hf(dict(llama, rope_parameters={"rope_theta": 5e5, **LLAMA3_ROPE}))
    assert cfg5.rope_theta == 5e5 and cfg5.rope_scaling["rope_type"] == "llama3"
    assert torch.equal(rope_inv_freq(cfg5), rope_inv_freq(cfg))
    whisper = {"num_mel_bins": 128, "max_source_positions": 1500, "d_model": 1280, "encoder_attention_heads": 20,
               "encoder_layers": 32, "encoder_ffn_dim": 5120}
    assert convert.whisper_config_from_hf(whisper) == WhisperConfig(128, 1500, 1280, 20, 32, 5120)
    with pytest.raises(ValueError, match="gelu"):
        convert.whisper_config_from_hf(dict(whisper, scale_embedding=True))
    # written as model.json, read back field for field; a config.json that lacks a field names it
    (tmp_path / "config.json").write_text(json.dumps(dict(llama, rope_parameters={"rope_theta": 5e5, **LLAMA3_ROPE})))
    assert convert.write_config(tmp_path, "llm") == read_config(DecoderConfig, tmp_path, "llm") == cfg5
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in llama.items() if k != "vocab_size"}))
    with pytest.raises(convert.FormatError, match=re.escape(f"{tmp_path / 'config.json'}: no vocab_size")):
        convert.write_config(tmp_path, "llm")


def test_dtype_and_device_helpers(monkeypatch):
    assert pick_dtype("bf16", "cpu") is torch.bfloat16 and pick_dtype("fp32", "cpu") is torch.float32
    assert pick_dtype(None, "cpu") is None and pick_dtype(torch.float16, "cpu") is torch.float16
    with pytest.raises(ValueError, match="fp8"):
        pick_dtype("fp8", "cpu")
    assert pick_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)     # no device named: a GPU if there is one
    assert pick_device() == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert pick_device() == torch.device("cpu")


# ----------------------------------------------------------------------------- the dtype pick

@pytest.mark.parametrize("t_fp32, t_bf16, want", [
    (3.2, 0.8, torch.bfloat16),    # a CPU with AVX512-BF16: 4x faster
    (2.9, 17.5, torch.float32),    # an AVX2-only CPU emulates bf16: 6x slower
    (1.0, 0.9, torch.float32),     # within timing noise: stay in fp32
])
def test_bf16_wins_only_by_a_clear_margin(t_fp32, t_bf16, want, monkeypatch):
    import model
    monkeypatch.setattr(model, "_matmul_time", lambda dtype, device: t_fp32 if dtype == torch.float32 else t_bf16)
    assert model.pick_dtype("auto", "cpu") is want


def test_auto_dtype_is_fp32_on_a_cpu_without_native_bf16():
    # Both of torch's CPU back ends capped at AVX2 behave as an AVX2-only machine does: the pick is fp32
    # and the log says why. An explicit dtype is taken as given, "auto" or not.
    import subprocess
    import sys
    code = ("import torch, model; d = model.pick_dtype('auto', 'cpu'); "
            "assert d == torch.float32, d; assert model.pick_dtype('bf16', 'cpu') == torch.bfloat16; "
            "assert model.pick_dtype(None, 'cpu') is None")
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr
    assert re.search(r"dtype: fp32 \(a bf16 matmul takes \d+\.\d+x the fp32 time on this AVX2 CPU\)", r.stderr), r.stderr
