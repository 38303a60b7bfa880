# cache.py: what the training stages keep from the frozen networks: encoder features (a tiny random encoder)
# and the targets' clean-up (loops cut, refusals, empty targets and, as the release does, examples over a text
# length and clips out of a duration range dropped and counted), on hand-written records.
import os
from types import SimpleNamespace

import soundfile as sf
import torch

import cache
from data import EMOTION_SYSTEM_PROMPT, N_SAMPLES, SAMPLE_RATE, load_audio, log_mel
from adapter import SpeechLM
from model import WhisperConfig, WhisperEncoder


def test_encode_clips_caches_each_clip_alone_and_skips_bad_ones(tmp_path, capsys):
    torch.manual_seed(0)
    enc = WhisperEncoder(WhisperConfig(n_mels=80, d_model=16, n_heads=2, n_layers=1, ffn_dim=32)).eval()
    clips = [str(tmp_path / f"{s}s.wav") for s in (0.7, 2.3, 31)]
    for path, seconds in zip(clips, (0.7, 2.3, 31)):
        sf.write(path, 0.1 * torch.randn(int(seconds * SAMPLE_RATE)).numpy(), SAMPLE_RATE)
    paths = clips[:1] + [str(tmp_path / "missing.wav")] + clips[1:]
    encode = SpeechLM(enc, None, None, None).encode_audio   # real frames: the run's config does not say padded
    feats = cache.encode_clips(encode, paths, str(tmp_path / "feats"), "enc", batch_size=2)
    err = capsys.readouterr().err
    assert feats[1] is None and "missing.wav: no such audio file" in err and "31.0 s is longer" in err
    feats = feats[:1] + feats[2:]
    for f, path in zip(feats, clips):   # the two short ones batched, yet each its own; the long one cut to 30 s
        mel = log_mel(load_audio(path)[:N_SAMPLES], pad_to_30s=False)
        with torch.no_grad():
            want = enc(mel[None], lengths=torch.tensor([mel.shape[-1]]))[0][0]
        assert f.dtype == torch.float16 and torch.allclose(f.float(), want, rtol=1e-3, atol=2e-3)
    again = cache.encode_clips(None, paths, str(tmp_path / "feats"), "enc")   # read back: no encoder runs
    assert again[1] is None and all(torch.equal(a, b) for a, b in zip(again[:1] + again[2:], feats))


def test_encode_clips_a_moved_clone_reads_its_cache(tmp_path, monkeypatch):
    # manifests name clips relative to the clone, as the cache is: a clone moved elsewhere re-encodes nothing
    enc = WhisperEncoder(WhisperConfig(n_mels=80, d_model=16, n_heads=2, n_layers=1, ffn_dim=32)).eval()
    (tmp_path / "a" / "speech").mkdir(parents=True)
    sf.write(tmp_path / "a" / "speech" / "x.wav", 0.1 * torch.randn(SAMPLE_RATE).numpy(), SAMPLE_RATE)
    monkeypatch.chdir(tmp_path / "a")
    feats = cache.encode_clips(SpeechLM(enc, None, None, None).encode_audio, ["speech/x.wav"], ".cache", "enc")
    os.rename(tmp_path / "a", tmp_path / "b")   # mv keeps each file's size and mtime
    monkeypatch.chdir(tmp_path / "b")
    again = cache.encode_clips(None, ["speech/x.wav"], ".cache", "enc")   # None: an encoder call would fail
    assert torch.equal(again[0], feats[0])
    os.utime("speech/x.wav", ns=(0, 0))   # the file changed: encoded again
    assert cache.encode_clips(lambda clips: [torch.ones(3, 16)], ["speech/x.wav"], ".cache", "enc")[0].sum() == 48


def test_encode_clips_skip_a_clip_under_one_mel_frame(tmp_path, capsys):
    sf.write(tmp_path / "3ms.wav", 0.1 * torch.randn(48).numpy(), SAMPLE_RATE)   # a run warns and goes on
    assert cache.encode_clips(None, [str(tmp_path / "3ms.wav")], str(tmp_path / "feats"), "enc") == [None]
    assert "3ms.wav: 3.0 ms is shorter than one 10 ms mel frame; skipped" in capsys.readouterr().err


def test_trim_repeats_cuts_at_the_first_repeated_sentence():
    looped = "I'm sorry for your loss. I'm sure you're not alone. I'm sure you're not alone. I'm sure"
    assert cache.trim_repeats(looped) == ("I'm sorry for your loss. I'm sure you're not alone.", True)
    # case and the kind of ending do not hide a repeat; new sentences are kept whole
    assert cache.trim_repeats("Great news! great news! Really.") == ("Great news!", True)
    assert cache.trim_repeats("Hello there! How are you? Fine.") == ("Hello there! How are you? Fine.", False)


def test_training_items_cut_loops_and_count_what_they_drop(capsys):
    rows = [dict(text=f"s{i}", target_key=f"k{i}") for i in range(6)]
    targets = {"k0": dict(target="A. B. A. B.", truncated=True), "k1": dict(target="Fine.", truncated=True),
               "k2": dict(target="I'm sorry, but I cannot do that.", truncated=False),
               "k3": dict(target="", truncated=False),
               "k5": dict(target="I’m sorry, but I can’t.", truncated=False),   # curly apostrophes
               "k4": dict(target="I'm sorry for your loss, but as a language AI, I have no ability", truncated=True)}
    items = cache.training_items(rows, targets, lambda row, t: dict(seen=(t["target"], t["truncated"])), 1, "m.jsonl")
    # a cut loop ends where it is cut (not truncated: the model learns to stop); an uncut one keeps its flag
    assert [it["seen"] for it in items] == [("A. B.", False), ("Fine.", True)]
    assert [it["target"] for it in items] == ["A. B.", "Fine."]
    out = capsys.readouterr().out
    assert "2 items (1 targets cut" in out and "'unreadable audio': 1, 'refusal': 3, 'empty target': 1" in out


def test_training_items_drop_examples_over_max_text_tokens(capsys):
    # the release drops an example whose text side (prompt + transcript + target) is over max_length tokens:
    # here the teacher example has 3 + len(target) ids; with max 5 the 3-word target (6 ids) goes, 2 words stay
    rows = [dict(text=f"s{i}", target_key=f"k{i}") for i in range(3)]
    targets = {f"k{i}": dict(target=t, truncated=False) for i, t in enumerate(["a b", "a b c", "a"])}
    make = lambda row, t: dict(teacher=([0, 0, 0] + t["target"].split(), None))   # noqa: E731
    items = cache.training_items(rows, targets, make, 0, "m.jsonl", max_text_tokens=5)
    assert [it["target"] for it in items] == ["a b", "a"]
    assert "'over 5 text tokens': 1" in capsys.readouterr().out
    assert len(cache.training_items(rows, targets, make, 0, "m.jsonl")) == 3   # 0: no limit


def test_drop_by_duration_reads_the_header_and_counts(tmp_path, capsys):
    rows = []
    for name, seconds in (("a", 0.99), ("b", 1.0), ("c", 2.5), ("d", 30.5)):
        sf.write(str(tmp_path / f"{name}.wav"), 0.1 * torch.randn(int(seconds * SAMPLE_RATE)).numpy(), SAMPLE_RATE)
        rows.append({"audio": str(tmp_path / f"{name}.wav")})
    (tmp_path / "bad.wav").write_bytes(b"not audio")
    rows += [{"audio": str(tmp_path / "bad.wav")}, {"audio": str(tmp_path / "missing.wav")}]
    kept = cache.drop_by_duration(rows, 1.0, 30.0, "m.jsonl")
    # 1.0 s is not under 1 s (the release drops duration < min); unreadable files are left to with_features
    assert [os.path.basename(r["audio"]) for r in kept] == ["b.wav", "c.wav", "bad.wav", "missing.wav"]
    assert "m.jsonl: 4 of 6 clips kept; dropped 1 under 1.0 s, 1 over 30.0 s" in capsys.readouterr().out
    assert cache.drop_by_duration(rows, 0.0, 0.0, "m.jsonl") is rows   # no bounds: nothing read


def test_with_features_encode_as_the_run_hears(tmp_path, monkeypatch):
    # the run's config says padded (a converted release) or not; unset means real frames; an explicit value wins.
    # The mode is part of the cache key, so features of one mode are never read back for the other
    seen = []
    monkeypatch.setattr(cache, "encode_clips", lambda encode, paths, cache_dir, enc_id:
                        seen.append((enc_id, encode(None))) or [torch.zeros(1, 2)] * len(paths))

    class Stub(SimpleNamespace):   # SpeechLM's own rule for how a run hears, without its networks
        padded, tone_layer = SpeechLM.padded, SpeechLM.tone_layer

        def encode_audio(self, clips, padded):
            return padded
    model = Stub(config={})
    for config_padded, explicit in ((None, None), (True, None), (False, None), (True, False)):
        model.config = {"whisper": str(tmp_path), **({} if config_padded is None else {"padded": config_padded})}
        kept, n_bad = cache.with_features(model, [{"audio": "x.wav"}], explicit)
        assert n_bad == 0 and kept[0]["feats"].shape == (1, 2)
    assert [p for _, p in seen] == [False, True, False, False]
    assert seen[0][0] == seen[2][0] != seen[1][0] == cache.encoder_id(str(tmp_path), True)
    # the tone layer widens the features: never read back for a run without it, nor one without for it
    model.config = {"whisper": str(tmp_path), "tone_layer": 1}
    cache.with_features(model, [{"audio": "x.wav"}])
    assert seen[-1][0] == cache.encoder_id(str(tmp_path), False, 1) not in (seen[0][0], seen[1][0])


def test_stage2_teacher_is_told_the_feeling_first():
    # "I feel surprise." is not English; the release's continuation prompt stays behind paper=True
    assert [m["content"] for m in cache.emotion_target_messages("It rains.", "surprise")] == \
        [EMOTION_SYSTEM_PROMPT, "I feel surprised. It rains."]
    assert cache.emotion_target_messages("It rains.", "neutral")[1]["content"] == "I feel calm. It rains."
    assert cache.emotion_target_messages("It rains.", "sad", paper=True)[1]["content"].endswith("'sad' emotion tone in a coherent style: It rains.")
