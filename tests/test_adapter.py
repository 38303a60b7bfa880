# adapter.py: the subsampler adapter, partial LoRA, emotion head, losses, prompt splicing, SpeechLM and its
# run folders. Tiny random networks on CPU; the run-folder test writes tiny Hugging Face folders with
# transformers' save_pretrained and a tiny byte-level BPE trained with `tokenizers` (oracles, test-only).
import json
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import adapter
import cache
import convert
import data
import tiny
from tokenizer import Tokenizer
from adapter import Adapter, LoRALinear, SpeechLM, add_lora, kl_loss, partial_lora
from model import Decoder, DecoderConfig, WhisperConfig, WhisperEncoder
from trainer import save_run

IGNORE = data.IGNORE
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
INSTRUCTION = "Continue the following sentence in a coherent style: "


def ceil8(n):
    return -(-n // 8)


# ----------------------------------------------------------------------------- adapter

def test_adapter_shapes_and_lengths():
    a = Adapter(16, 24, inner_dim=8).eval()
    with torch.no_grad():
        for L in list(range(1, 41)) + [63, 64, 65, 100, 1499, 1500]:
            y, n = a(torch.randn(1, L, 16), torch.tensor([L]))
            want = (((L - 1) // 2 + 1 - 1) // 2 + 1 - 1) // 2 + 1      # (L-1)//2+1, three times
            assert want == ceil8(L) and y.shape == (1, want, 24) and n.tolist() == [want]
        lengths = torch.tensor([1, 7, 8, 9, 17, 100])
        y, n = a(torch.randn(6, 100, 16), lengths)
    assert y.shape == (6, 13, 24) and n.tolist() == [1, 1, 1, 2, 3, 13]
    assert a.out_lengths(lengths).tolist() == n.tolist()


def test_adapter_padding_never_leaks():
    torch.manual_seed(1)
    a = Adapter(16, 24, inner_dim=8).eval()
    lengths = [5, 17, 33, 40]
    feats = [torch.randn(n, 16) for n in lengths]
    with torch.no_grad():
        alone = [a(f[None], torch.tensor([len(f)]))[0][0] for f in feats]
        for T in (40, 81):   # batch padded to the longest, then with extra padding; padding is garbage, not 0
            x = torch.randn(4, T, 16) * 1e3
            for b, f in enumerate(feats):
                x[b, :len(f)] = f
            y, n = a(x, torch.tensor(lengths))
            for b in range(4):
                assert torch.allclose(y[b, :n[b]], alone[b], atol=1e-5), (T, b)
                assert (y[b, n[b]:] == 0).all()


def test_adapter_equals_release_forward_on_unpadded_input():
    # the release's Subsampler.forward, written out: conv -> GLU (x3), fc1 -> GELU -> fc2 + residual, LayerNorm
    torch.manual_seed(2)
    a = Adapter(16, 24, inner_dim=8).eval()
    x = torch.randn(3, 37, 16)
    with torch.no_grad():
        h = x.transpose(1, 2)
        for conv in a.conv_layers:
            h = F.glu(conv(h), dim=1)
        h = h.transpose(1, 2)
        ref = F.layer_norm(a.fc2(nn.GELU()(a.fc1(h))) + h, (24,), a.speech_ln.weight, a.speech_ln.bias, 1e-5)
        ours, _ = a(x, torch.tensor([37, 37, 37]))
    assert torch.allclose(ours, ref, atol=1e-6)


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_adapter_parameter_count():
    def formula(d_enc, d_llm, inner, k, n):
        conv = (n - 1) * (d_enc * 2 * d_enc * k + 2 * d_enc) + d_enc * 2 * d_llm * k + 2 * d_llm
        return conv + 2 * d_llm * inner + 2 * d_llm      # fc1, fc2 without bias; LayerNorm weight + bias
    assert n_params(Adapter(16, 24, inner_dim=8)) == formula(16, 24, 8, 5, 3) == 9504
    assert n_params(Adapter(16, 24, 8, kernel_size=3, n_convs=2)) == formula(16, 24, 8, 3, 2)
    with torch.device("meta"):   # the release's pair: whisper-large-v2 (1280) -> Qwen-7B (4096)
        assert n_params(Adapter(1280, 4096)) == formula(1280, 4096, 512, 5, 3) == 89_412_608
    names = [n for n, _ in Adapter(16, 24).named_parameters()]   # the release's names, minus "subsampler."
    assert names == [f"conv_layers.{i}.{p}" for i in range(3) for p in ("weight", "bias")] + [
        "fc1.weight", "fc2.weight", "speech_ln.weight", "speech_ln.bias"]


# ----------------------------------------------------------------------------- losses, pooling

def test_kl_loss():
    s = torch.tensor([[0.0, 1.0, 2.0], [1.0, -1.0, 0.5]])
    t = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    assert kl_loss(s, s).item() == pytest.approx(0.0, abs=1e-7)

    def softmax(v):
        e = [math.exp(x / 2.0) for x in v]
        return [x / sum(e) for x in e]
    hand = sum(sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(softmax(tr), softmax(sr)))
               for sr, tr in zip(s.tolist(), t.tolist())) / 2          # mean over positions, no T^2
    assert kl_loss(s, t).item() == pytest.approx(hand, rel=1e-5)
    assert hand == pytest.approx((0.38703 + 0.25924) / 2, abs=1e-5)   # per row, by numpy
    ref = F.kl_div(F.log_softmax(s / 2, -1), F.softmax(t / 2, -1), reduction="batchmean")  # the release's call
    assert kl_loss(s, t).item() == pytest.approx(ref.item(), rel=1e-6)
    s2 = torch.randn(6, 7, requires_grad=True)
    kl_loss(s2, torch.randn(6, 7)).backward()
    assert s2.grad.abs().sum() > 0
    empty = torch.zeros(0, 7, requires_grad=True)
    assert kl_loss(empty, torch.zeros(0, 7)).item() == 0.0   # no response positions: 0, not a NaN
    with pytest.raises(RuntimeError, match="must match"):   # the response positions must line up
        kl_loss(torch.zeros(3, 5), torch.zeros(4, 5))


# ----------------------------------------------------------------------------- LoRA

def tiny_decoder(vocab=64, seed=0):
    torch.manual_seed(seed)
    cfg = DecoderConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, qkv_bias=True)
    dec = Decoder(cfg).eval()
    with torch.no_grad():
        for p in dec.parameters():
            p.add_(torch.randn_like(p) * 0.02)   # norms away from 1, biases away from 0
    return dec


def randomize_lora(dec, seed=5, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in dec.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * scale)


def test_lora_structure():
    dec = add_lora(tiny_decoder(), r=4, alpha=8)
    names = [n for n, _ in dec.named_parameters() if "lora" in n]
    assert len(names) == 2 * 7 * 2
    assert "layers.1.self_attn.q_proj.lora_A" in names and "layers.0.mlp.down_proj.lora_B" in names
    m = dec.layers[0].self_attn.k_proj
    assert m.lora_A.shape == (4, 32) and m.lora_B.shape == (16, 4) and (m.lora_B == 0).all() and m.scale == 2.0
    assert m.bias is not None and "layers.0.self_attn.k_proj.weight" in dict(dec.named_parameters())
    with pytest.raises(ValueError, match="no nn.Linear"):
        add_lora(tiny_decoder(), targets=("wqkv",))


def test_lora_zero_init_and_partial_mask():
    base = tiny_decoder()
    tokens = torch.randint(0, 64, (2, 12))
    ones, zeros = torch.ones(2, 12), torch.zeros(2, 12)
    with torch.no_grad():
        ref = base(tokens)
        dec = add_lora(tiny_decoder(), r=4, alpha=8).eval()
        with partial_lora(dec, ones):
            assert torch.equal(dec(tokens), ref)                             # B = 0: no change at all
        randomize_lora(dec)
        with partial_lora(dec, zeros):
            assert torch.equal(dec(tokens), ref)                             # mask 0 everywhere = base
        assert torch.equal(dec(tokens), ref)                                 # outside partial_lora = base
        with partial_lora(dec, ones):
            full = dec(tokens)
        assert (full - ref).abs().max() > 1e-2                               # the delta is really there
        speech = zeros.bool()
        speech[:, 5:9] = True                                                # a speech slot at 5..8
        with partial_lora(dec, speech):
            part = dec(tokens)
        assert torch.equal(part[:, :5], ref[:, :5])                          # before the slot: the base model
        assert (part[:, 5:] - ref[:, 5:]).abs().amax(dim=(0, 2)).min() > 1e-3   # the slot and all after it change
        assert torch.equal(dec(tokens), ref)                                 # and off again after the block
        # with padding the decoder computes the real positions only: partial_lora is told the same valid
        valid = torch.ones(2, 12, dtype=torch.bool)
        valid[1, 9:] = False
        with partial_lora(dec, speech, valid):
            padded = dec(tokens, valid=valid)
        assert torch.allclose(padded[0], part[0], atol=1e-6) and torch.allclose(padded[1, :9], part[1, :9], atol=1e-6)
        with pytest.raises(ValueError, match="partial_lora marked 24 positions, the decoder computes 21"):
            with partial_lora(dec, speech):
                dec(tokens, valid=valid)


# ----------------------------------------------------------------------------- tokenizer, SpeechLM

def train_tok(folder):
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=330, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = [INSTRUCTION, data.SYSTEM_PROMPT, data.EMOTION_SYSTEM_PROMPT, "hello world. the cat sat on the mat.",
            "system\n", "user\n", "assistant\n"] * 20
    tk.train_from_iterator(text, trainer=trainer)
    os.makedirs(folder, exist_ok=True)
    tk.save(os.path.join(folder, "tokenizer.json"))
    cfg = {"added_tokens_decoder": {str(tk.token_to_id(s)): {"content": s, "special": True} for s in SPECIALS},
           "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f)
    convert.write_tokenizer(folder)   # what prepare.py does to a folder


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("tok"))
    train_tok(folder)
    return folder


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.from_pretrained(tok_dir)


def tiny_lm(tok, lora=False, head=False, seed=0):
    torch.manual_seed(seed)
    enc = WhisperEncoder(WhisperConfig(n_mels=80, d_model=16, n_heads=2, n_layers=1, ffn_dim=32)).eval()
    dec = tiny_decoder(vocab=tok.vocab_size, seed=seed)
    if lora:
        add_lora(dec, r=4, alpha=8, dropout=0.0)
        randomize_lora(dec)
    torch.manual_seed(seed + 1)
    return SpeechLM(enc, Adapter(16, 32, inner_dim=8), dec, tok, nn.Linear(32, 5, bias=False) if head else None).eval()


def test_chatml_layout_around_the_speech_slot(tok):
    ids, labels = cache.make_example(tok, data.SYSTEM_PROMPT, [INSTRUCTION, data.SPEECH], "hello world.")
    assert ids.count(data.SPEECH) == 1
    k = ids.index(data.SPEECH)
    assert tok.decode(ids[:k]) == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                                   "<|im_start|>user\n" + INSTRUCTION)
    assert tok.decode(ids[k + 1:]) == "<|im_end|>\n<|im_start|>assistant\nhello world.<|im_end|>\n<|endoftext|>"
    im_start, im_end, eot = (tok.token_id(s) for s in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"))
    nl, target = tok.encode("\n"), tok.encode("hello world.")
    after = [im_end, *nl, im_start, *tok.encode("assistant\n")]
    assert ids[k + 1:k + 1 + len(after)] == after                          # literal ids right after the slot
    before = [im_start, *tok.encode("system\n" + data.SYSTEM_PROMPT), im_end, *nl, im_start,
              *tok.encode("user\n" + INSTRUCTION)]
    assert ids[:k] == before                                                # literal ids up to the slot
    answer = target + [im_end, *nl, eot]
    assert ids[-len(answer):] == answer and labels[-len(answer):] == answer
    assert labels[:-len(answer)] == [IGNORE] * (len(ids) - len(answer))     # only target + closing are labelled

    lm = tiny_lm(tok)
    speech = torch.randn(4, 32)
    out = lm.splice([ids], [speech], [labels])
    S = len(ids) + 3
    assert out["valid"].shape == (1, S) and out["valid"].all()
    assert out["speech_mask"][0].tolist() == [0.0] * k + [1.0] * 4 + [0.0] * (S - k - 4)
    assert out["labels"][0].tolist() == labels[:k] + [IGNORE] * 4 + labels[k + 1:]
    assert torch.equal(out["embeds"][0, k:k + 4], speech)
    text = torch.cat([out["embeds"][0, :k], out["embeds"][0, k + 4:]])
    assert torch.equal(text, lm.decoder.embed_tokens(torch.tensor(ids[:k] + ids[k + 1:])))


def test_splice_batches_equal_rows_alone(tok):
    lm = tiny_lm(tok)
    rows, labs = zip(*[cache.make_example(tok, data.SYSTEM_PROMPT, [instr, data.SPEECH], tgt) for instr, tgt in
                       [(INSTRUCTION, "the cat sat."), ("hello ", "a mat on the mat, the cat.")]])
    speech = [torch.randn(3, 32), torch.randn(6, 32)]
    with torch.no_grad():
        for pad in ("right", "left"):
            batch = lm.splice(list(rows), speech, list(labs), pad=pad)
            assert batch["speech_mask"].sum() == 9 and batch["speech_mask"].dtype == torch.bool
            for b in range(2):
                one = lm.splice([rows[b]], [speech[b]], [labs[b]])
                n = one["valid"].shape[1]
                cols = slice(0, n) if pad == "right" else slice(batch["valid"].shape[1] - n, None)
                assert batch["valid"][b].sum() == n and batch["valid"][b, cols].all()
                for key in ("labels", "speech_mask", "embeds"):
                    assert torch.equal(batch[key][b, cols], one[key][0]), (pad, b, key)
                # the decoder sees the same sequence: padding and the other row change nothing
                got = lm.decoder(embeds=batch["embeds"], valid=batch["valid"])[b, cols]
                assert torch.allclose(got, lm.decoder(embeds=one["embeds"])[0], atol=1e-5), (pad, b)
    with pytest.raises(ValueError, match="2 SPEECH slots but 1"):
        lm.splice(list(rows), speech[:1])


def test_encode_audio_real_frames_and_padded(tok):
    lm = tiny_lm(tok)
    torch.manual_seed(4)
    clips = [torch.randn(8000) * 0.1, torch.randn(19360) * 0.1]        # 50 and 121 mel frames
    feats = lm.encode_audio(clips)
    assert [f.shape for f in feats] == [(25, 16), (61, 16)]             # (n_frames - 1)//2 + 1
    for c, f in zip(clips, feats):
        assert torch.allclose(lm.encode_audio([c])[0], f, atol=1e-5)    # a batch = each clip alone
    padded = lm.encode_audio(clips, padded=True)
    assert [f.shape for f in padded] == [(25, 16), (61, 16)]
    assert (padded[0] - feats[0]).abs().max() > 1e-4                    # the two modes really differ
    lm.config["padded"] = True    # a run trained on padded audio (a converted release) is heard so by default
    assert all(torch.equal(a, b) for a, b in zip(lm.encode_audio(clips), padded))
    odd = torch.randn(19201) * 0.1    # 120 mel frames + 1 sample: the release's mask counts 121, so 61 frames, not 60
    assert lm.encode_audio([odd])[0].shape[0] == 61 and lm.encode_audio([odd], padded=False)[0].shape[0] == 60
    emb, lengths = lm.speech_embeds(feats)
    assert emb.shape == (2, 8, 32) and lengths.tolist() == [4, 8]


def test_emotion_head_pools_real_frames_only(tok):
    lm = tiny_lm(tok).start_stage2(num_emotions=5)
    assert lm.emotion_head.weight.shape == (5, 32) and lm.emotion_head.bias is None
    feats = [torch.randn(13, 16), torch.randn(40, 16), torch.randn(27, 16)]
    with torch.no_grad():
        emb, lengths = lm.speech_embeds(feats)
        logits = lm.emotion_logits(emb, lengths)
        for b, n in enumerate(lengths.tolist()):   # the head on the mean of this clip's own frames, alone
            alone, _ = lm.speech_embeds(feats[b:b + 1])
            assert alone.shape[1] == n and torch.allclose(logits[b], lm.emotion_head(alone[0].mean(0)), atol=1e-5)


def test_generate_batches_and_partial_lora(tok, monkeypatch):
    lm = tiny_lm(tok, lora=True, head=True)
    feats = [torch.randn(40, 16), torch.randn(90, 16)]
    convs = [[{"role": "system", "content": data.SYSTEM_PROMPT}, {"role": "user", "content": [p, data.SPEECH]}]
             for p in (INSTRUCTION, "hello ")]
    seen, masks = [], []
    real = adapter.partial_lora

    def spy(decoder, speech_mask, valid):
        masks.append(speech_mask)
        return real(decoder, speech_mask, valid)
    monkeypatch.setattr(adapter, "partial_lora", spy)
    both = lm.generate(convs, feats=feats, max_new_tokens=6, on_token=lambda ids: seen.append(ids.tolist()))
    assert len(seen) >= 1 and all(len(s) == 2 for s in seen)
    alone = [lm.generate(c, feats=[f], max_new_tokens=6)[0] for c, f in zip(convs, feats)]
    assert both == alone and all(len(x) > 0 for x in both)
    assert masks[0].sum().item() == 5 + 12 and masks[0].shape[0] == 2  # ceil(40/8) + ceil(90/8) speech positions
    assert masks[1].sum().item() == 5                                   # (the first call) the row alone
    with torch.no_grad():
        emb, lengths = lm.speech_embeds(feats)
        logits = lm.emotion_logits(emb, lengths)
        one = lm.emotion_logits(*lm.speech_embeds(feats[:1]))
    assert logits.shape == (2, 5) and torch.allclose(logits[:1], one, atol=1e-5)


def test_stage1_step_teacher_and_student_line_up(tok):
    lm = tiny_lm(tok).train()
    assert list(lm.trainable_parameters()) == [n for n, _ in lm.named_parameters() if n.startswith("adapter.")]
    text = ["the cat sat on the mat", "hello world"]
    targets = [("the cat.", False), ("on the mat, the", True)]           # the second one was cut off
    teacher = [cache.make_example(tok, data.SYSTEM_PROMPT, [INSTRUCTION + x], t, tr) for x, (t, tr) in zip(text, targets)]
    student = [cache.make_example(tok, data.SYSTEM_PROMPT, [INSTRUCTION, data.SPEECH], t, tr) for t, tr in targets]
    with torch.no_grad():
        t = lm.response_logits(teacher)
    s = lm.response_logits(student, [torch.randn(50, 16), torch.randn(20, 16)])
    t_logits = t["logits"]
    n = len(tok.encode("the cat.")) + len(tok.closing_ids) + len(tok.encode("on the mat, the"))
    assert t_logits.shape == s["logits"].shape == (n, tok.vocab_size) and not t_logits.requires_grad
    assert torch.equal(t["targets"], s["targets"]) and s["embeds"].shape == (2, 7, 32) and s["lengths"].tolist() == [7, 3]
    # the positions that predict each target token: CE on them = CE over every shifted position, IGNORE left out
    b = lm.splice([r for r, _ in teacher], [], [l for _, l in teacher])
    with torch.no_grad():
        full = lm.decoder(embeds=b["embeds"], valid=b["valid"])
        shifted = F.cross_entropy(full[:, :-1].reshape(-1, tok.vocab_size), b["labels"][:, 1:].reshape(-1))
    assert t["targets"].tolist() == [y for _, labels in teacher for y in labels[1:] if y != IGNORE]
    assert F.cross_entropy(t_logits, t["targets"]).item() == pytest.approx(shifted.item(), rel=1e-5)
    loss = kl_loss(s["logits"], t_logits)
    assert loss.item() > 0
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lm.adapter.parameters())
    assert all(p.grad is None for p in lm.decoder.parameters())


def test_stage2_step_gradients_reach_exactly_the_trainable_weights(tok):
    lm = tiny_lm(tok).start_stage2(lora=dict(r=4, alpha=8, dropout=0.0)).train()
    randomize_lora(lm.decoder)
    assert lm.emotion_head.weight.shape == (5, 32) and lm.decoder.layers[0].self_attn.o_proj.lora_A.dtype == torch.float32
    names = lm.trainable_parameters()
    assert len(names) == 10 + 1 + 2 * 7 * 2 and all(not p.requires_grad for p in lm.encoder.parameters())
    examples = [cache.make_example(tok, data.EMOTION_SYSTEM_PROMPT, ["hello ", data.SPEECH], t)
                for t in ("the cat.", "on the mat, the cat sat.")]
    s = lm.response_logits(examples, [torch.randn(40, 16), torch.randn(70, 16)])
    head = lm.emotion_logits(s["embeds"], s["lengths"])
    loss = F.cross_entropy(s["logits"], s["targets"]) + F.cross_entropy(head, torch.tensor([1, 3]))
    loss.backward()
    grads = {n: p.grad for n, p in lm.named_parameters()}
    assert all(g is None for n, g in grads.items() if n not in names)
    # Partial LoRA in the LAST layer: only its k_proj and v_proj reach the response (through the keys and
    # values the text positions attend to); its q / o / MLP deltas change only speech positions' final
    # states, which no loss reads. So those get exactly zero gradient, here and in the release alike.
    dead = {n for n in names if n.startswith("decoder.layers.1.") and not (".k_proj." in n or ".v_proj." in n)}
    assert len(dead) == 10 and all(grads[n].abs().sum() == 0 for n in dead)
    live = [n for n in names if n not in dead]
    assert all(grads[n].abs().sum() > 0 for n in live), [n for n in live if grads[n].abs().sum() == 0]


def test_shared_prompt_start_runs_once_and_changes_nothing(tok):
    """response_logits runs the rows' common start once (PrefixKV) and the rest after it: the same logits and the
    same gradients as the whole rows in one pass, with partial LoRA and right padding."""
    lm = tiny_lm(tok).start_stage2(lora=dict(r=4, alpha=8, dropout=0.0)).train()
    randomize_lora(lm.decoder)
    examples = [cache.make_example(tok, data.EMOTION_SYSTEM_PROMPT, ["hello ", data.SPEECH], t)
                for t in ("the cat.", "on the mat, the cat sat.", "a")]
    feats = [torch.randn(n, 16) for n in (40, 70, 9)]
    params = list(lm.trainable_parameters().values())

    def grads_of(logits):
        lm.zero_grad()
        logits.float().square().mean().backward()
        return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
    s = lm.response_logits(examples, feats)
    (start,) = lm._prefixes   # the system prompt and "hello ": everything before the speech
    assert list(start) == examples[0][0][:examples[0][0].index(data.SPEECH)]
    emb, lengths = lm.speech_embeds(feats)
    b = lm.splice([r for r, _ in examples], [emb[i, :n] for i, n in enumerate(lengths.tolist())],
                  [y for _, y in examples])
    at = torch.zeros_like(b["labels"], dtype=torch.bool)
    at[:, :-1] = b["labels"][:, 1:] != IGNORE
    with partial_lora(lm.decoder, b["speech_mask"], b["valid"]):
        whole = lm.decoder(embeds=b["embeds"], valid=b["valid"], logits_at=at)
    assert torch.allclose(s["logits"], whole, atol=1e-5)
    for g, h in zip(grads_of(s["logits"]), grads_of(whole)):
        assert torch.allclose(g, h, atol=1e-6, rtol=1e-4)


# ----------------------------------------------------------------------------- run folders

@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory, tok_dir):
    """Tiny Hugging Face folders: a whisper (d_model 16), an LLM (hidden 32) and one with hidden 48."""
    import shutil
    import transformers
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    wcfg = transformers.WhisperConfig(num_mel_bins=80, d_model=16, encoder_layers=1, encoder_attention_heads=2,
                                      encoder_ffn_dim=32, decoder_layers=1, decoder_attention_heads=2,
                                      decoder_ffn_dim=32, vocab_size=64, max_target_positions=16,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=3,
                                      begin_suppress_tokens=None, suppress_tokens=None)
    transformers.WhisperModel(wcfg).save_pretrained(root / "whisper")
    convert.write_config(root / "whisper", "whisper")   # what prepare.py does to a folder
    tk = Tokenizer.from_pretrained(tok_dir)
    for name, hidden in (("llm", 32), ("llm48", 48)):
        cfg = transformers.LlamaConfig(vocab_size=tk.vocab_size, hidden_size=hidden, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=256, tie_word_embeddings=False,
                                       eos_token_id=tk.token_id("<|im_end|>"))
        transformers.LlamaForCausalLM(cfg).save_pretrained(root / name)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(os.path.join(tok_dir, f), root / name / f)
        convert.write_config(root / name, "llm")
        convert.write_tokenizer(root / name)
    return {k: str(root / k) for k in ("whisper", "llm", "llm48")}


def build_from(folders, llm="llm", d_llm=32):
    enc = WhisperEncoder.from_pretrained(folders["whisper"], device="cpu")
    dec = Decoder.from_pretrained(folders[llm], device="cpu")
    add_lora(dec, r=4, alpha=8)
    randomize_lora(dec)
    torch.manual_seed(7)
    return SpeechLM(enc, Adapter(16, d_llm, inner_dim=8), dec, Tokenizer.from_pretrained(folders[llm]),
                    nn.Linear(d_llm, 5, bias=False))


def test_save_run_from_run_round_trip(hf_folders, tmp_path, monkeypatch):
    lm = build_from(hf_folders)
    run = tmp_path / "runs" / "a"
    save_run(lm, str(run), {"whisper": hf_folders["whisper"], "llm": hf_folders["llm"], "stage": "emotion", "lr": 2e-5})
    assert sorted(os.listdir(run)) == ["config.json", "model.safetensors"]          # no temp files left
    cfg = json.loads((run / "config.json").read_text())
    assert not os.path.isabs(cfg["whisper"]) and cfg["stage"] == "emotion" and cfg["lr"] == 2e-5
    assert cfg["adapter"] == dict(d_enc=16, d_llm=32, inner_dim=8, kernel_size=5, n_convs=3, d_in=16)
    assert cfg["tone_layer"] == 0   # written from the model, whatever the config given: the adapter's width follows it
    assert cfg["lora"] == dict(r=4, alpha=8, dropout=0.05, targets=["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"])
    assert cfg["num_emotions"] == 5
    saved = load_file(str(run / "model.safetensors"))
    assert set(saved) == set(lm.trainable_parameters()) and len(saved) == 10 + 1 + 2 * 7 * 2
    assert all(k.startswith(("adapter.", "emotion_head.", "decoder.layers.")) for k in saved)

    monkeypatch.chdir(tmp_path)                  # paths in config.json resolve against the run folder, not cwd
    back = SpeechLM.from_run(str(run), device="cpu")
    assert not back.training and back.emotion_head is not None
    for k, v in lm.trainable_parameters().items():
        assert torch.equal(back.trainable_parameters()[k], v), k
    feats = [torch.randn(30, 16)]
    msgs = [{"role": "user", "content": ["hi ", data.SPEECH]}]
    assert back.generate(msgs, feats=feats, max_new_tokens=5) == lm.eval().generate(msgs, feats=feats, max_new_tokens=5)
    with torch.no_grad():
        assert torch.allclose(back.emotion_logits(*back.speech_embeds(feats)), lm.emotion_logits(*lm.speech_embeds(feats)))
    # the stage-2 trainer starts from a stage-1 run and saves again: paths stay usable
    save_run(back, str(tmp_path / "runs" / "b"))
    assert SpeechLM.from_run(str(tmp_path / "runs" / "b"), device="cpu").config["num_emotions"] == 5
    # frozen networks in bf16, trainable weights kept in fp32 (what the optimizer updates)
    half = SpeechLM.from_run(str(run), device="cpu", dtype="bf16")
    assert half.decoder.embed_tokens.weight.dtype == half.encoder.conv1.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in half.trainable_parameters().values())
    assert len(half.generate(msgs, feats=feats, max_new_tokens=3)[0]) > 0


def test_build_a_fresh_stage1_model(hf_folders):
    lm = SpeechLM.build(hf_folders["whisper"], hf_folders["llm"], device="cpu", dtype="fp32", adapter=dict(inner_dim=8))
    assert lm.adapter.settings == dict(d_enc=16, d_llm=32, inner_dim=8, kernel_size=5, n_convs=3, d_in=16)
    assert lm.config == {"whisper": hf_folders["whisper"], "llm": hf_folders["llm"], "tone_layer": 0}
    assert lm.emotion_head is None and not any(".lora_" in n for n, _ in lm.named_parameters())
    assert list(lm.trainable_parameters())[0] == "adapter.conv_layers.0.weight"


def test_the_tone_layer_is_heard_beside_the_output(hf_folders, tmp_path):
    """tone_layer k: each frame is the encoder's output, then layer k's frame layer-normed (no weights); the
    adapter's first conv takes both, and a run folder brings it back."""
    whisper = tiny.make_whisper(tmp_path / "whisper2", n_layers=2)   # its final LayerNorm: unit weight, zero bias
    clip, frames = torch.randn(16000), {}
    for k in (0, 1, 2):
        lm = SpeechLM.build(whisper, hf_folders["llm"], device="cpu", dtype="fp32", tone_layer=k)
        assert lm.adapter.conv_layers[0].in_channels == (32 if k else 16) and lm.adapter.conv_layers[1].in_channels == 16
        frames[k], = lm.encode_audio([clip])
    assert frames[0].shape == (50, 16) and frames[1].shape == frames[2].shape == (50, 32)
    assert torch.equal(frames[1][:, :16], frames[0]) and torch.equal(frames[2][:, :16], frames[0])
    assert torch.allclose(frames[2][:, 16:], frames[0], atol=1e-5)       # the last layer, normed: the output here
    assert not torch.allclose(frames[1][:, 16:], frames[0], atol=1e-2)   # the first is another
    run = str(tmp_path / "run")
    save_run(lm, run, {"whisper": whisper, "llm": hf_folders["llm"]})
    back = SpeechLM.from_run(run, device="cpu", dtype="fp32")
    assert back.tone_layer == 2 and torch.equal(back.encode_audio([clip])[0], frames[2])
    with pytest.raises(ValueError, match="tone_layer 3: .* has 2 layers"):
        SpeechLM.build(whisper, hf_folders["llm"], device="cpu", dtype="fp32", tone_layer=3)


def test_bad_runs_are_errors_that_name_the_problem(hf_folders, tmp_path):
    lm = build_from(hf_folders)
    run = str(tmp_path / "run")
    save_run(lm, run, {"whisper": hf_folders["whisper"], "llm": hf_folders["llm"]})

    # an adapter trained for another LLM: the run's and the loaded pair both named
    with pytest.raises(ValueError) as e:
        SpeechLM.from_run(run, device="cpu", llm=hf_folders["llm48"])
    assert "d_llm 32" in str(e.value) and "dim 48" in str(e.value) and hf_folders["llm48"] in str(e.value)

    # config.json claims the pair fits but the weights were trained for another one
    other = build_from(hf_folders, llm="llm48", d_llm=48)
    bad = str(tmp_path / "bad")
    save_run(other, bad, {"whisper": hf_folders["whisper"], "llm": hf_folders["llm48"]})
    cfg = json.load(open(os.path.join(bad, "config.json")))
    cfg["llm"], cfg["adapter"]["d_llm"] = os.path.relpath(hf_folders["llm"], bad), 32
    json.dump(cfg, open(os.path.join(bad, "config.json"), "w"))
    with pytest.raises(ValueError) as e:
        SpeechLM.from_run(bad, device="cpu")
    msg = str(e.value)
    assert "model.safetensors" in msg and "size mismatch" in msg and hf_folders["llm"] in msg and "dim 32" in msg

    # a missing weight, an extra one
    sd = load_file(os.path.join(run, "model.safetensors"))
    save_file({k: v for k, v in sd.items() if k != "emotion_head.weight"}, os.path.join(run, "model.safetensors"))
    with pytest.raises(KeyError, match=r"missing keys \['emotion_head.weight'\]"):
        SpeechLM.from_run(run, device="cpu")
    save_file({**sd, "adapter.extra": torch.zeros(1)}, os.path.join(run, "model.safetensors"))
    with pytest.raises(KeyError, match=r"unexpected keys \['adapter.extra'\]"):
        SpeechLM.from_run(run, device="cpu")

    # missing files and folders
    os.remove(os.path.join(run, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        SpeechLM.from_run(run, device="cpu")
    with pytest.raises(FileNotFoundError, match="config.json"):
        SpeechLM.from_run(str(tmp_path / "nowhere"), device="cpu")
    with pytest.raises(FileNotFoundError, match=r"no_llm/model.json: missing; run `python scripts/prepare.py --llm="):
        SpeechLM.from_run(bad, device="cpu", llm=str(tmp_path / "no_llm"))
