# data.py against oracles: transformers' WhisperFeatureExtractor (log-mel), the `tokenizers` library (BPE ids,
# trained here in the Qwen2 and SmolLM2 file layouts), transformers' chat template (ChatML ids).
import base64
import json
import math
import random

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as AF

import cache
import convert
import data
from cache import make_example
from data import SPEECH, AudioError, load_audio, log_mel, log_mel_batch
from tokenizer import Tokenizer

# ----------------------------------------------------------------------------------------------- audio


def chirp_noise(seconds, seed=0):
    # a 100 Hz -> 6 kHz chirp with an amplitude envelope and noise: energy in every mel band, a real dynamic range
    t = np.arange(int(seconds * 16000)) / 16000
    f0, f1 = 100.0, 6000.0
    phase = 2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * seconds))
    env = 0.5 + 0.4 * np.sin(2 * np.pi * 0.7 * t)
    x = env * np.sin(phase) + 0.05 * np.random.default_rng(seed).standard_normal(len(t))
    return (0.3 * x).astype(np.float32)


@pytest.fixture(scope="module")
def hf_fe():
    from transformers import WhisperFeatureExtractor
    return {n: WhisperFeatureExtractor(feature_size=n) for n in (80, 128)}


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_matches_whisper_feature_extractor(hf_fe, n_mels):
    fe = hf_fe[n_mels]
    long, short = chirp_noise(31.0, 1), chirp_noise(7.3, 2)  # one trimmed to 30 s, one padded
    ref = fe([long, short], sampling_rate=16000, return_tensors="np")["input_features"]  # (2, n_mels, 3000)
    assert ref.shape == (2, n_mels, 3000)
    for i, x in enumerate([long, short]):
        ours = log_mel(torch.from_numpy(x), n_mels=n_mels)
        assert ours.shape == (n_mels, 3000)
        assert np.abs(ours.numpy() - ref[i]).max() < 1e-4
    # batched (B, N): the floor is per clip, so the batch equals the clips alone
    padded = torch.stack([torch.from_numpy(x[:480000]) for x in [long, np.pad(short, (0, 480000 - len(short)))]])
    assert np.abs(log_mel(padded, n_mels=n_mels).numpy() - ref).max() < 1e-4
    mel, lengths = log_mel_batch([torch.from_numpy(long), torch.from_numpy(short)], n_mels)
    assert np.abs(mel.numpy() - ref).max() < 1e-4
    assert lengths.tolist() == [3000, len(short) // 160]


@pytest.mark.parametrize("n", [160, 161, 319, 48077, 51280, 479999, 480000, 500000])
def test_padded_frames_are_counted_as_the_feature_extractors_mask(hf_fe, n):
    # padded mode keeps the frames the release keeps: its attention mask (one per sample, read every 160th)
    # summed, ceil(n / 160) up to 3000; real-frames mode has n // 160, one fewer when 160 does not divide n
    x = chirp_noise(n / 16000, 4)[:n]
    mask = hf_fe[80](x, sampling_rate=16000, padding="max_length", return_attention_mask=True,
                     return_tensors="np")["attention_mask"]
    assert log_mel_batch([torch.from_numpy(x)])[1].tolist() == [int(mask.sum())]
    assert log_mel_batch([torch.from_numpy(x)], pad_to_30s=False)[1].tolist() == [min(n, 480000) // 160]


@pytest.mark.parametrize("n", [400, 1000, 48077, 160000, 479500, 479600, 479601, 480000, 500000])
def test_log_mel_padded_at_every_length(hf_fe, n):
    # short clips skip the FFT of their all-silent frames: the same values as the reference's full
    # computation at every length, the boundaries of that shortcut (n + 400 = 480000) included
    x = chirp_noise(n / 16000, 3)[:n]
    ref = hf_fe[80](x, sampling_rate=16000, return_tensors="np")["input_features"][0]
    assert np.abs(log_mel(torch.from_numpy(x)).numpy() - ref).max() < 1e-4


def test_log_mel_real_frames(hf_fe):
    # Real-frames mode is the same definition on the unpadded clip: T = N // 160 frames, the last frame whose
    # window runs past the end is reflect-padded (torch.stft center=True) and the floor is max-8 over the clip.
    # Oracle 1: HF computes exactly that when asked not to pad ("longest" with a single clip).
    x = chirp_noise(7.3, 2)
    ours = log_mel(torch.from_numpy(x), pad_to_30s=False)
    assert ours.shape == (80, len(x) // data.HOP_LENGTH) == (80, 730)
    ref = hf_fe[80](x, sampling_rate=16000, padding="longest", return_tensors="np")["input_features"][0]
    assert ref.shape == ours.shape
    assert np.abs(ours.numpy() - ref).max() < 1e-4
    # Oracle 2: padded mode agrees on every frame whose 400-sample window lies inside the clip
    # (frame t spans samples [160t - 200, 160t + 200)); only the last one or two frames differ.
    inside = (len(x) - 200) // 160 + 1
    padded = log_mel(torch.from_numpy(x))
    assert np.abs(ours[:, :inside].numpy() - padded[:, :inside].numpy()).max() < 1e-4
    # a batch of unequal clips gives each clip's own features, right-padded with 0
    y = chirp_noise(3.1, 3)
    mel, lengths = log_mel_batch([torch.from_numpy(x), torch.from_numpy(y)], pad_to_30s=False)
    assert mel.shape == (2, 80, 730) and lengths.tolist() == [730, 310]
    assert torch.equal(mel[0], ours)
    assert torch.equal(mel[1, :, :310], log_mel(torch.from_numpy(y), pad_to_30s=False))
    assert mel[1, :, 310:].abs().max() == 0


def write(path, x, sr, **kw):
    sf.write(str(path), x, sr, **kw)
    return path


@pytest.mark.parametrize("sr,fmt", [(8000, "wav"), (44100, "flac"), (22050, "ogg"), (48000, "mp3"), (16000, "wav")])
def test_load_audio_resamples_to_16k_mono(tmp_path, sr, fmt):
    n = int(1.37 * sr)
    t = np.arange(n) / sr
    stereo = np.stack([0.5 * np.sin(2 * np.pi * 440 * t), 0.2 * np.sin(2 * np.pi * 660 * t)], 1).astype(np.float32)
    subtype = {"wav": "FLOAT", "flac": "PCM_24", "ogg": "VORBIS", "mp3": "MPEG_LAYER_III"}[fmt]
    path = write(tmp_path / f"a.{fmt}", stereo, sr, subtype=subtype)
    audio = load_audio(path)
    assert audio.dtype == torch.float32 and audio.dim() == 1
    assert len(audio) == math.ceil(n * 16000 / sr)
    # expected: what the file decodes to, channel-averaged, resampled by torchaudio
    decoded, _ = sf.read(str(path), dtype="float32", always_2d=True)
    ref = torch.from_numpy(decoded).mean(1)
    ref = ref if sr == 16000 else AF.resample(ref, sr, 16000)
    assert torch.allclose(audio, ref, atol=1e-6)
    if fmt in ("wav", "flac"):  # lossless: the mixdown of the written signal itself, resampled
        mono = torch.from_numpy(stereo).mean(1)
        mono = mono if sr == 16000 else AF.resample(mono, sr, 16000)
        assert (audio - mono).abs().max() < (1e-7 if sr == 16000 or fmt == "wav" else 1e-5)


def test_load_audio_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.wav"
    with pytest.raises(AudioError, match="nope.wav"):
        load_audio(missing)
    text = tmp_path / "notes.wav"
    text.write_text("this is not audio\n" * 20)
    with pytest.raises(AudioError, match="notes.wav.*not a readable audio file"):
        load_audio(text)
    empty = write(tmp_path / "empty.wav", np.zeros((0, 1), np.float32), 16000)
    with pytest.raises(AudioError, match="empty.wav.*0 samples"):
        load_audio(empty)
    assert issubclass(AudioError, ValueError)


# ----------------------------------------------------------------------------------------------- text

WORDS = ["the", "The", "speech", "model", "hello", "world", "don't", "I'LL", "we've", "she's", "they'd",
         "naïve", "café", "cafe\u0301", "Straße", "über", "東京", "你好", "世界", "模型", "こんにちは", "안녕하세요",
         "Привет", "мир", "مرحبا", "שלום", "🙂", "👍🏽", "🤖", "🇯🇵", "∑x²", "3.14159", "12345", "2024-06-05",
         "1,000,000", "x=42;", "$9.99", "#tag", "@user", "foo_bar", "CamelCase", "http://a.b/c?d=e", "...", "!!",
         "¿qué?", "½", "٣٤", "Ⅻ", "\u00a0", "\u3000"]
SEPS = [" ", " ", " ", "", "  ", "   ", "\n", "\n\n", "\r\n", "\t", " \n ", ", ", ". "]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SMOLLM2_MISSING = {0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, 0xC0, 0xC1, 0xF1, 0xF2, *range(0xF5, 0x100)}


def random_texts(n, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(1, 10)
        s = "".join(rng.choice(WORDS) + rng.choice(SEPS) for _ in range(k))
        if rng.random() < 0.3:
            s = " " * rng.randint(0, 3) + s
        out.append(s.rstrip() if rng.random() < 0.5 else s)
    return out


def edge_texts():
    return ["", " ", "  ", "\n", "a", " a", "a ", "hello  world", "x   1", "a 1b", "  12 345 ", "1's",
            "it's 5 o'clock", "I'M HERE", "tab\there", "line\r\nbreak", "   \n\n  x", "end   ", "🙂🙂🙂",
            "中文和English混合123", "<|im_start|>user\nhi<|im_end|>\n", "a<|endoftext|>b", "<|im_end|><|im_end|>",
            "ctrl\x04\x1d\x7f", "€100 ±5 ©", "\U00040000 rare plane", "ﬁ ℌ ① ｶ"]  # bytes smollm2's vocab lacks


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def train_bpe(folder, layout):
    """Train a ~1000-token byte-level BPE with `tokenizers` and save it the way the real checkpoints are saved.
    qwen2: Split(Qwen regex) + ByteLevel(no regex), NFC, specials appended after the vocab (ids = ranks).
    smollm2: Digits(individual) + ByteLevel(regex), specials at ids 0..2 (ids != ranks: exercises the remap), and
    without the 21 byte tokens the real SmolLM2 lacks (HF drops such bytes; so do we)."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    tk = HFTokenizer(models.BPE())
    if layout == "qwen2":
        tk.normalizer = normalizers.NFC()
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(convert.QWEN_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        specials_first = []
    else:
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
        specials_first = SPECIALS
    tk.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if layout == "smollm2":
        alphabet = [c for c in alphabet if convert.byte_decoder()[c] not in SMOLLM2_MISSING]
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=specials_first, show_progress=False,
                                  initial_alphabet=alphabet)
    tk.train_from_iterator(random_texts(3000, seed=123), trainer=trainer)
    if layout == "qwen2":
        tk.add_special_tokens(SPECIALS)
    folder.mkdir(parents=True, exist_ok=True)
    tk.save(str(folder / "tokenizer.json"))
    tk.model.save(str(folder))  # vocab.json + merges.txt
    decoder = {str(tk.token_to_id(s)): {"content": s, "special": True} for s in SPECIALS}
    cfg = {"added_tokens_decoder": decoder, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
           "chat_template": CHATML, "tokenizer_class": "Qwen2Tokenizer" if layout == "qwen2" else "GPT2Tokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2" if layout == "qwen2" else "llama"}))
    return tk


@pytest.fixture(scope="module", params=["qwen2", "smollm2"])
def trained(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    return request.param, folder, train_bpe(folder, request.param)


def prepared(folder):
    """What prepare.py does to a checkpoint folder, then what the scripts do with it."""
    convert.write_tokenizer(folder)
    return Tokenizer.from_pretrained(folder)


def test_bpe_ids_equal_hf(trained, tmp_path):
    layout, folder, hf = trained
    texts = random_texts(400, seed=7) + edge_texts()
    ours = prepared(folder)
    # the same vocab from vocab.json + merges.txt alone: the pre-tokenizer comes from the family
    only = tmp_path / "vm"
    only.mkdir()
    for f in ["vocab.json", "merges.txt", "tokenizer_config.json", "config.json"]:
        (only / f).write_bytes((folder / f).read_bytes())
    ours_vm = prepared(only)
    bad = []
    for s in texts:
        ref = hf.encode(s, add_special_tokens=False).ids
        if ours.encode(s, allowed_special=True) != ref or ours_vm.encode(s, allowed_special=True) != ref:
            bad.append(s)
        decoded = ours.decode(ours.encode(s, allowed_special=True))
        assert decoded == hf.decode(hf.encode(s).ids, skip_special_tokens=False)
        if layout == "qwen2":  # every byte in the vocab: a lossless round trip, modulo NFC
            assert decoded == hf.normalizer.normalize_str(s)
    assert not bad, f"{len(bad)}/{len(texts)} strings differ from HF, e.g. {bad[:3]!r}"
    if layout == "smollm2":  # the byte-drop path is live: the vocab lacks SmolLM2's 21 bytes
        assert None in ours._ids and len(set(range(256)) - {b[0] for b in ours._bytes.values() if len(b) == 1}) == 21
    if layout == "smollm2":  # vocab.json + merges.txt and nothing else: the <|...|> tokens in the vocab are special
        (only / "tokenizer_config.json").unlink()
        bare = prepared(only)
        assert [bare.token_id(t) for t in SPECIALS] == [0, 1, 2] and bare.template == "chatml"
        assert all(bare.encode(s, allowed_special=True) == hf.encode(s).ids for s in texts[:50])
    # allowed_special=False: special-token text is plain text (no special id) and still round-trips
    s = "<|im_start|>user\nhi<|im_end|>"
    plain = ours.encode(s)
    assert not set(plain) & {ours.token_id(t) for t in SPECIALS} and ours.decode(plain) == s
    assert ours.encode(s, allowed_special=True)[0] == ours.token_id("<|im_start|>") == hf.token_to_id("<|im_start|>")


def test_chat_template_and_example(trained):
    layout, folder, _ = trained
    from transformers import PreTrainedTokenizerFast
    hf = PreTrainedTokenizerFast.from_pretrained(str(folder))
    tok = prepared(folder)
    assert tok.template == "chatml"
    im_end, eot = tok.token_id("<|im_end|>"), tok.token_id("<|endoftext|>")
    assert tok.eos_ids == [im_end, eot] and tok.pad_id == eot
    conv = [{"role": "system", "content": data.SYSTEM_PROMPT},
            {"role": "user", "content": "Continue the following sentence in a coherent style: 東京 is big."},
            {"role": "assistant", "content": "It has 14 million people 🙂"},
            {"role": "user", "content": "And\n\nthen?"}]
    literal = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nContinue the "
               "following sentence in a coherent style: 東京 is big.<|im_end|>\n<|im_start|>assistant\nIt has 14 "
               "million people 🙂<|im_end|>\n<|im_start|>user\nAnd\n\nthen?<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.encode_chat(conv)
    assert ids == tok.encode(literal, allowed_special=True)
    assert ids == list(hf.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=False))
    assert tok.encode_chat(conv, add_generation_prompt=False) == tok.encode(literal[:-len("<|im_start|>assistant\n")], allowed_special=True)

    # speech slot: one SPEECH id where the speech goes, the text around it encoded as before
    instr = "Continue the following sentence in a coherent style: "
    ids, labels = make_example(tok, data.SYSTEM_PROMPT, [instr, SPEECH], "The sky was blue.")
    assert ids.count(SPEECH) == 1 and len(ids) == len(labels)
    k = ids.index(SPEECH)
    head = f"<|im_start|>system\n{data.SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{instr}"
    assert ids[:k] == tok.encode(head, allowed_special=True)
    target = tok.encode("The sky was blue.")
    closing = tok.encode("<|im_end|>\n<|endoftext|>", allowed_special=True)
    assert ids[k + 1:] == tok.encode("<|im_end|>\n<|im_start|>assistant\n", allowed_special=True) + target + closing
    supervised = [i for i, l in enumerate(labels) if l != -100]
    assert supervised == list(range(len(ids) - len(target) - len(closing), len(ids)))
    assert [labels[i] for i in supervised] == [ids[i] for i in supervised] == target + closing
    ids_t, labels_t = make_example(tok, data.SYSTEM_PROMPT, [instr, SPEECH], "The sky was blue.", truncated=True)
    assert ids_t == ids[: -len(closing)] and labels_t == labels[: -len(closing)]
    assert [l for l in labels_t if l != -100] == target


def rank_file(path, hf):
    # a tiktoken rank file (base64 token, rank) holding the trained vocab's byte tokens in merge order
    dec = convert.byte_decoder()
    vocab = hf.get_vocab()
    merges = json.loads(hf.to_str())["model"]["merges"]
    singles = sorted(((i, bytes([dec[s]])) for s, i in vocab.items() if len(s) == 1 and s in dec), key=lambda t: t[0])
    toks = [b for _, b in singles] + [bytes(dec[c] for c in "".join(m if isinstance(m, list) else m.split(" "))) for m in merges]
    path.write_text("".join(f"{base64.b64encode(b).decode()} {r}\n" for r, b in enumerate(toks)))
    return len(toks)


def hf_piece(hf, i):
    s = hf.id_to_token(i)
    return s.encode() if s in SPECIALS else bytes(convert.byte_decoder()[c] for c in s)


@pytest.fixture(scope="module")
def qwen2_hf(tmp_path_factory):
    return train_bpe(tmp_path_factory.mktemp("q2"), "qwen2")


def test_qwen1_tiktoken(qwen2_hf, tmp_path):
    n = rank_file(tmp_path / "qwen.tiktoken", qwen2_hf)
    tok = prepared(tmp_path)
    assert tok.template == "chatml" and tok.nfc
    assert [tok.token_id(s) for s in ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|extra_204|>"]] == [n, n + 1, n + 2, n + 207]
    assert tok.eos_ids == [n + 2, n]
    texts = random_texts(200, seed=11) + edge_texts()
    for s in texts:
        ids = tok.encode(s, allowed_special=True)
        assert tok.decode(ids) == qwen2_hf.normalizer.normalize_str(s)
        # same vocab, same regex, NFC: the same pieces as the HF tokenizer, token by token
        ref = qwen2_hf.encode(s, add_special_tokens=False).ids
        assert [tok._bytes[i] for i in ids] == [hf_piece(qwen2_hf, i) for i in ref]
    conv = [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"}]
    assert tok.encode_chat(conv) == tok.encode("<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                                               "<|im_start|>assistant\n", allowed_special=True)


def test_llama3_tokenizer_model(qwen2_hf, tmp_path):
    n = rank_file(tmp_path / "tokenizer.model", qwen2_hf)
    tok = prepared(tmp_path)
    assert tok.template == "llama3" and not tok.nfc
    assert tok.token_id("<|begin_of_text|>") == n and tok.token_id("<|eot_id|>") == n + 9
    assert tok.token_id("<|reserved_special_token_250|>") == n + 255
    assert tok.eos_ids == [n + 9, n + 1]
    for s in random_texts(200, seed=13) + edge_texts():
        assert tok.decode(tok.encode(s)) == s
    assert tok.encode("12345") == tok.encode("123") + tok.encode("45")  # llama-3 groups digits by three
    conv = [{"role": "system", "content": "sys"}, {"role": "user", "content": ["say ", SPEECH]}]
    ids = tok.encode_chat(conv)
    k = ids.index(SPEECH)
    lit = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nsys<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nsay "
    assert ids[:k] == tok.encode(lit, allowed_special=True)
    assert ids[k + 1:] == tok.encode("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", allowed_special=True)
    _, labels = make_example(tok, "sys", ["say ", SPEECH], "ok")
    assert [l for l in labels if l != -100] == tok.encode("ok") + [n + 9]


def test_tokenizer_errors(tmp_path):
    # a folder never prepared (a raw hub download): the error says what to run
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/tokenizer.tiktoken: missing; run `python scripts/prepare.py --llm={tmp_path}`"):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(convert.FormatError, match=f"{tmp_path}: no tokenizer.json"):
        convert.write_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"\x12\x05hello world extra\n")
    with pytest.raises(convert.FormatError, match="tokenizer.model:1"):
        convert.write_tokenizer(tmp_path)


# ----------------------------------------------------------------------------------------------- batches, manifests


def test_pad_batch():
    rows = [[5, SPEECH, 6], [7]]
    ids, labels, valid = data.pad_batch(rows, pad_id=0, labels=[[-100, -100, 6], [7]])
    assert ids.tolist() == [[5, -1, 6], [7, 0, 0]] and valid.tolist() == [[True] * 3, [True, False, False]]
    assert labels.tolist() == [[-100, -100, 6], [7, -100, -100]]
    ids, labels, valid = data.pad_batch(rows, pad_id=9, side="left")
    assert ids.tolist() == [[5, -1, 6], [9, 9, 7]] and valid.tolist() == [[True] * 3, [False, False, True]]
    assert labels is None


def test_read_manifest(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"audio": "a.wav", "text": "hi", "emotion": "sad"}\n\n{"audio": "b.wav"}\n')
    rows = cache.read_manifest(p)
    assert rows == [{"audio": "a.wav", "text": "hi", "emotion": "sad"}, {"audio": "b.wav"}]
    assert data.EMOTIONS.index(rows[0]["emotion"]) == 3
    p.write_text('{"audio": "a.wav"}\n\n{"audio": b.wav}\n')
    with pytest.raises(ValueError, match=r"m.jsonl:3"):
        cache.read_manifest(p)
    p.write_text('["a.wav"]\n')
    with pytest.raises(ValueError, match=r"m.jsonl:1: expected a JSON object"):
        cache.read_manifest(p)

