"""
Measured speed of our modules against what a user would otherwise run (Hugging Face transformers).

    .venv/bin/python scripts/bench.py                  # full run on CPU, a few minutes on 2 idle cores -> bench.json
    .venv/bin/python scripts/bench.py --quick          # tiny sizes, seconds (what tests/test_bench.py runs)
    .venv/bin/python scripts/bench.py --threads=1      # on a shared, oversubscribed CPU (see the warning it prints)
    .venv/bin/python scripts/bench.py --only=decode_small --profile   # one section, with torch.profiler tables
    .venv/bin/python scripts/bench.py --only=int8      # int8 weight-only decode (quantize.py): speed and quality
    .venv/bin/python scripts/bench.py --device=cuda    # where there is one

A tool, not product code: it imports transformers (a test extra, requirements-test.txt) as the
reference, and only here. Both sides get the same random weights: transformers builds the model, saves
an HF folder, and our own from_pretrained loads it. Calls alternate A/B/B/A in one process after a
warm-up; the table gives speed-ups (reference time / our time, > 1: we are faster) by median, the
claim, and by minimum, which on a busy CPU is the closer estimate of the uncontended cost.
"""
import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: data.py, model.py

# whisper-base encoder; Qwen2.5-0.5B-shaped decoder (494M, tied); SmolLM2-135M-shaped decoder (the
# out-of-the-box LLM: the stage-1 step and the decode_small section)
FULL = dict(enc=dict(num_mel_bins=80, d_model=512, encoder_layers=6, encoder_attention_heads=8, encoder_ffn_dim=2048),
            dec=dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                     num_attention_heads=14, num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=True),
            lm=dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, rope_theta=1e5, tie_word_embeddings=True),
            prompt_len=64, new_tokens=128, copy_mb=512, batch=8, d_enc=512,
            # A/B rounds, and seconds after which a section stops adding rounds: under 15 minutes on 2 cores
            reps=dict(log_mel=41, encoder=5, decode=3, decode_small=3, train=9, int8=3),
            budget_s=dict(log_mel=20, encoder=60, decode=150, decode_small=60, train=90, int8=150))
TINY = dict(num_mel_bins=80, d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128)
TINY_LM = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=True)
QUICK = dict(FULL, enc=TINY, dec=TINY_LM, lm=TINY_LM, prompt_len=8, new_tokens=16, copy_mb=32, batch=2, d_enc=64,
             reps=dict(log_mel=3, encoder=2, decode=2, decode_small=2, train=2, int8=2), budget_s={})
MEL_SECONDS, ENC_SECONDS = 10.0, 5.0


# ----------------------------------------------------------------------------- timing
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def ab(fns, reps, device, warmup=1, budget_s=None):
    """Seconds per call of each fn (name -> fn): {name: {"med", "min", "n"}}. Calls interleave, the
    order flipping every round (ABBA), so drift hits every side alike. budget_s: stop after the round
    that spends it, 2 rounds at least unless the first alone took twice the budget."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times, t0 = {n: [] for n in names}, time.perf_counter()
    for r in range(reps):
        for n in (names if r % 2 == 0 else names[::-1]):
            _sync(device)
            t = time.perf_counter()
            fns[n]()
            _sync(device)
            times[n].append(time.perf_counter() - t)
        spent = time.perf_counter() - t0
        if budget_s is not None and (r >= 1 and spent > budget_s or spent > 2 * budget_s):
            break
    return {n: dict(med=statistics.median(v), min=min(v), n=len(v)) for n, v in times.items()}


def timings(tm, pairs):
    """Result fields: ms (median and min) of every side, and speed-ups slow/fast for each named pair."""
    out = {f"ms_{k}": 1e3 * v["med"] for k, v in tm.items()}
    out.update({f"ms_min_{k}": 1e3 * v["min"] for k, v in tm.items()})
    for name, (slow, fast) in pairs.items():
        out[f"speedup_{name}"] = tm[slow]["med"] / tm[fast]["med"]
        out[f"speedup_min_{name}"] = tm[slow]["min"] / tm[fast]["min"]
    return dict(out, calls=min(v["n"] for v in tm.values()))


def profile(fn, label, rows=12):
    """Run fn once under torch.profiler; print and return the top ops by self time."""
    from torch.profiler import ProfilerActivity, profile as tprofile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with tprofile(activities=acts) as prof:
        fn()
    avg = prof.key_averages()
    print(f"\n--- profile: {label} ---\n" + avg.table(sort_by="self_cpu_time_total", row_limit=rows))
    top = sorted(avg, key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    return [[e.key, round(e.self_cpu_time_total / 1e3, 3), e.count] for e in top]


def memcpy_rate(device, nbytes=512 << 20):
    """Bytes/s a large copy moves, read and write counted: decode streams every weight once per token."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / ab({"copy": lambda: dst.copy_(src)}, reps=5, device=device)["copy"]["med"]


# ----------------------------------------------------------------------------- building both sides
def hf_whisper_encoder(kw, folder, device):
    """transformers' WhisperEncoder with random weights, saved as an HF folder (model.encoder.* keys)."""
    import convert
    from safetensors.torch import save_file
    from transformers import WhisperConfig as HFConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder as HFEncoder
    cfg = HFConfig(**kw)
    enc = HFEncoder(cfg).eval()
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg.to_dict(), f)
    convert.write_config(folder, "whisper")   # the model.json our from_pretrained reads, as prepare.py writes it
    save_file({"model.encoder." + k: v.contiguous() for k, v in enc.state_dict().items()},
              os.path.join(folder, "model.safetensors"))
    return enc.to(device)


def hf_causal_lm(kw, model_type, folder, device, dtype):
    """A transformers llama/qwen2 causal LM with random weights, saved as an HF folder. rope_theta is
    also written top-level, as published checkpoints have it (transformers 5 nests it in rope_parameters)."""
    import convert
    from transformers import AutoConfig, AutoModelForCausalLM
    kw = dict(kw)
    theta = kw.pop("rope_theta")
    cfg = AutoConfig.for_model(model_type, rope_parameters={"rope_type": "default", "rope_theta": theta},
                               max_position_embeddings=4096, **kw)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg).eval()
    m.save_pretrained(folder)
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        d = json.load(f)
    with open(path, "w") as f:
        json.dump(dict(d, rope_theta=theta), f)
    convert.write_config(folder, "llm")
    m.requires_grad_(False)
    return m.to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------- 1. log-mel
def bench_log_mel(cfg, reps, device, do_profile=False, budget_s=None):
    import data
    from transformers import WhisperFeatureExtractor
    fe = WhisperFeatureExtractor(feature_size=80)
    n = int(MEL_SECONDS * data.SAMPLE_RATE)
    t = torch.arange(n) / data.SAMPLE_RATE
    # speech-like: an amplitude-modulated tone plus noise, so the log floor (max - 8) is not hit everywhere
    audio = (0.3 * torch.sin(2 * np.pi * 220 * t) * torch.sin(2 * np.pi * 0.5 * t)
             + 0.05 * torch.randn(n, generator=torch.Generator().manual_seed(0))).float()
    audio_np, audio_dev, dev = audio.numpy(), audio.to(device), device.type
    fns = {"ref": lambda: fe(audio_np, sampling_rate=data.SAMPLE_RATE, return_tensors="pt", device=dev)["input_features"],
           "ours_padded": lambda: data.log_mel(audio_dev, pad_to_30s=True),
           "ours_real": lambda: data.log_mel(audio_dev, pad_to_30s=False)}
    r = fns["ref"]()[0].float()
    p, q = (fns[k]().cpu().float() for k in ("ours_padded", "ours_real"))
    # real frames: the last frame's window reaches past the clip, where our reflect padding and the
    # reference's zeros differ by design, so it is left out of the comparison
    diff_pad, diff_real = (p - r).abs().max().item(), (q[:, :-1] - r[:, :q.shape[1] - 1]).abs().max().item()
    tm = ab(fns, reps, device, warmup=2, budget_s=budget_s)
    res = dict(seconds=MEL_SECONDS, frames_padded=p.shape[-1], frames_real=q.shape[-1],
               max_abs_diff_padded=diff_pad, max_abs_diff_real=diff_real,
               values_ok=max(diff_pad, diff_real) <= 1e-4,
               **timings(tm, dict(padded=("ref", "ours_padded"), real=("ref", "ours_real"))))
    if do_profile:
        res["profile_ours"] = profile(fns["ours_padded"], "log_mel ours (padded)")
        res["profile_ref"] = profile(fns["ref"], "log_mel transformers")
    return res


# ----------------------------------------------------------------------------- 2. encoder
@torch.no_grad()
def bench_encoder(cfg, reps, device, do_profile=False, budget_s=None):
    import data
    from model import WhisperEncoder
    kw = cfg["enc"]
    with tempfile.TemporaryDirectory() as folder:
        ref_enc = hf_whisper_encoder(kw, folder, device)
        ours = WhisperEncoder.from_pretrained(folder, dtype=torch.float32, device=device).eval()
    n_real = int(ENC_SECONDS * data.SAMPLE_RATE) // data.HOP_LENGTH
    mel = torch.full((1, kw["num_mel_bins"], data.N_FRAMES), -0.5)   # whisper's silence level after (x+4)/4
    mel[..., :n_real] = torch.randn(1, kw["num_mel_bins"], n_real, generator=torch.Generator().manual_seed(0)) / 2
    mel = mel.to(device)
    real, lengths = mel[..., :n_real].contiguous(), torch.tensor([n_real], device=device)
    # real frames as the pipeline runs them (SpeechLM.encode_audio passes the lengths)
    fns = {"ref_padded": lambda: ref_enc(mel).last_hidden_state,
           "ours_padded": lambda: ours(mel, [mel.shape[-1]], padded=True)[0],
           "ours_real": lambda: ours(real, lengths=lengths)[0]}
    y_ref, y_pad, y_real = (fns[k]() for k in fns)
    tm = ab(fns, reps, device, budget_s=budget_s)
    res = dict(config=kw, seconds=ENC_SECONDS, mel_frames_real=n_real, out_frames_real=y_real.shape[1],
               max_abs_diff_padded_vs_ref=(y_pad - y_ref).abs().max().item(),
               # real frames are a different computation (no attention over padding): how far it moves
               max_abs_diff_real_vs_padded=(y_real - y_pad[:, :y_real.shape[1]]).abs().max().item(),
               **timings(tm, dict(real_vs_padded=("ours_padded", "ours_real"),
                                  padded_vs_ref=("ref_padded", "ours_padded"), real_vs_ref=("ref_padded", "ours_real"))))
    if do_profile:
        res["profile_ours_real"] = profile(fns["ours_real"], "encoder ours (real frames)")
        res["profile_ours_padded"] = profile(fns["ours_padded"], "encoder ours (padded)")
    return res


# ----------------------------------------------------------------------------- 3. decode
class _Clock(list):
    """Time stamps of new tokens: our on_token callback, or a transformers streamer (put, end)."""
    def put(self, value):     # transformers calls put(prompt) first, then put(token) at each step
        self.append(time.perf_counter())

    def end(self):
        pass

    def rate(self, skip_first):
        s = self[1:] if skip_first else self
        # from the first new token (after prefill) to the last: steady-state one-token steps
        return (len(s) - 1) / (s[-1] - s[0]) if len(s) > 1 else float("nan")


def weight_bytes_per_token(dec):
    """Bytes of weights a one-token step reads: every parameter and buffer (int8 weights and their scales
    are buffers) once, except the embedding table, which a lookup touches one row of -- unless it is tied
    to the LM head, which reads all of it."""
    tied = dec.lm_head.weight is dec.embed_tokens.weight
    return sum(p.numel() * p.element_size() for name, p in [*dec.named_parameters(), *dec.named_buffers()]
               if tied or not name.startswith("embed_tokens"))   # named_parameters counts a tie once


@torch.no_grad()
def bench_decode(cfg, reps, device, do_profile=False, budget_s=None, small=False, dtype=torch.float32,
                 compile_=False, int8=False):
    """Greedy decode, ours against transformers' generate; int8=True adds a third side: our decoder on the
    same weights with its linear layers in int8 (quantize.py)."""
    from model import Decoder
    kw, model_type = (cfg["lm"], "llama") if small else (cfg["dec"], "qwen2")
    P, N = cfg["prompt_len"], cfg["new_tokens"]
    with tempfile.TemporaryDirectory() as folder:
        ref_lm = hf_causal_lm(kw, model_type, folder, device, dtype)
        ours = Decoder.from_pretrained(folder, dtype=dtype, device=device).eval()
        sides = {"ours": ours}
        if int8:
            from quantize import quantize_decoder
            sides["int8"] = quantize_decoder(Decoder.from_pretrained(folder, dtype=dtype, device=device).eval())
    if compile_:   # off by default: on a short CPU run, compiling costs more time than its faster steps save
        ours.forward = torch.compile(ours.forward, dynamic=True)
    prompt = torch.randint(0, kw["vocab_size"], (1, P), generator=torch.Generator().manual_seed(1)).to(device)
    rates, out = {"ref": [], **{k: [] for k in sides}}, {}

    def run_ours(name, n=N):
        c = _Clock()
        out[name] = sides[name].generate(prompt, max_new_tokens=n, stop_ids=[], on_token=c.put)[0]
        rates[name].append(c.rate(skip_first=False))

    def run_ref(n=N):
        c = _Clock()
        out["ref"] = ref_lm.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                     do_sample=False, eos_token_id=None, pad_token_id=0, streamer=c)[0, P:].tolist()
        rates["ref"].append(c.rate(skip_first=True))

    run_ref(min(16, N))   # warm-up: a short generate touches every weight and kernel
    for name in sides:
        run_ours(name, min(16, N))
    rates = {k: [] for k in rates}
    fns = {"ref": run_ref, **{k: (lambda k=k: run_ours(k)) for k in sides}}
    tm = ab(fns, reps, device, warmup=0, budget_s=budget_s)
    wbytes, rate = weight_bytes_per_token(ours), memcpy_rate(device, cfg["copy_mb"] << 20)
    step_ours, step_ref, bound = statistics.median(rates["ours"]), statistics.median(rates["ref"]), rate / wbytes
    res = dict(config=kw, model_type=model_type, dtype=str(dtype).replace("torch.", ""), compile=compile_,
               params=sum(p.numel() for p in ours.parameters()), prompt_len=P, new_tokens=N,
               tok_s_ours=N / tm["ours"]["med"], tok_s_ref=N / tm["ref"]["med"],
               step_tok_s_ours=step_ours, step_tok_s_ref=step_ref, speedup_step=step_ours / step_ref,
               ids_equal=out["ours"] == out["ref"], n_ids=len(out["ours"]),
               first_diff=next((i for i, (a, b) in enumerate(zip(out["ours"], out["ref"])) if a != b), None),
               weight_bytes_per_token=wbytes, memcpy_gb_s=rate / 1e9, bound_tok_s=bound,
               fraction_of_bound_ours=step_ours / bound, fraction_of_bound_ref=step_ref / bound,
               **timings(tm, dict(tok_s=("ref", "ours"), **(dict(tok_s_int8=("ref", "int8"),
                                                                 int8_vs_ours=("ours", "int8")) if int8 else {}))))
    if int8:   # ids are not compared: on random weights, agreement says nothing (int8_quality measures it)
        step_int8, wbytes8 = statistics.median(rates["int8"]), weight_bytes_per_token(sides["int8"])
        res.update(tok_s_int8=N / tm["int8"]["med"], step_tok_s_int8=step_int8, speedup_step_int8=step_int8 / step_ref,
                   weight_bytes_per_token_int8=wbytes8, bound_tok_s_int8=rate / wbytes8,
                   fraction_of_bound_int8=step_int8 * wbytes8 / rate)
    if do_profile:
        res["profile_ours"] = profile(lambda: run_ours("ours"), "decode ours (generate)")
        if int8:
            res["profile_int8"] = profile(lambda: run_ours("int8"), "decode ours int8 (generate)")
        res["profile_ref"] = profile(run_ref, "decode transformers (generate)")
    return res


# ----------------------------------------------------------------------------- 4. stage-1 step
def bench_train(cfg, reps, device, do_profile=False, budget_s=None, autocast_bf16=False):
    """One stage-1 step, the demo run's rows: a 24-token start every row shares (system prompt, instruction), then
    the transcript (teacher) or the speech (student: 8 cached encoder frames a position, each the output and the tone
    layer side by side as train_semantic.py's tone_layer = 1 makes them), 7 template tokens and the response, their
    lengths spread as in the demo's batches (below); rows right-padded to the longest. The LLM
    frozen, the teacher without grad, only the adapter trains (AdamW, clip 1.0). The same adapter init, data and
    weights drive our Decoder and transformers' model, which gets the padding mask; both take logits at the response
    positions only. Ours runs the shared start once and keeps it (PrefixKV) and computes no padding position."""
    from adapter import Adapter, kl_loss
    from model import Decoder, PrefixKV
    kw, B, d_enc = cfg["lm"], cfg["batch"], cfg["d_enc"]
    with tempfile.TemporaryDirectory() as folder:
        ref_lm = hf_causal_lm(kw, "llama", folder, device, torch.float32)
        ours = Decoder.from_pretrained(folder, dtype=torch.float32, device=device).eval().requires_grad_(False)
    # per-row lengths, deciles of the demo run's stage-1 items (speech positions, transcript tokens, response tokens)
    n_pre, n_mid = 24, 7
    n_sp, n_text, n_resp = ([v[i % len(v)] for i in range(B)] for v in (
        [19, 12, 26, 15, 17, 14, 21, 16, 18], [9, 6, 14, 8, 10, 7, 12, 7, 11], [49, 18, 49, 30, 49, 24, 49, 41, 49]))
    g = torch.Generator().manual_seed(2)
    rand = lambda n: torch.randint(0, kw["vocab_size"], (n,), generator=g).tolist()
    pre, mid = rand(n_pre), rand(n_mid)
    resp_ids = [rand(n) for n in n_resp]
    teacher_rows = [pre + rand(t) + mid + r for t, r in zip(n_text, resp_ids)]
    student_rows = [pre + [-1] * s + mid + r for s, r in zip(n_sp, resp_ids)]   # -1: a speech position

    def grid(rows):   # -> ids (B, S) right-padded, valid, the positions predicting a response token
        S = max(map(len, rows))
        ids, valid, at = torch.zeros(B, S, dtype=torch.long), *torch.zeros(2, B, S, dtype=torch.bool)
        for i, (row, n) in enumerate(zip(rows, n_resp)):
            ids[i, :len(row)], valid[i, :len(row)] = torch.tensor(row).clamp(min=0), True
            at[i, len(row) - n - 1:len(row) - 1] = True
        return ids.to(device), valid.to(device), at.to(device)
    t_ids, t_valid, t_at = grid(teacher_rows)
    s_ids, s_valid, s_at = grid(student_rows)
    speech_at = torch.zeros_like(s_valid)
    for i, s in enumerate(n_sp):
        speech_at[i, n_pre:n_pre + s] = True
    prefix = PrefixKV(ours, t_ids[0, :n_pre])
    feats = torch.randn(B, max(n_sp) * 8, 2 * d_enc, generator=g).to(device)
    lengths = torch.tensor([s * 8 for s in n_sp], device=device)
    torch.manual_seed(3)
    adapters = {"ours": Adapter(d_enc, kw["hidden_size"], d_in=2 * d_enc).to(device)}
    adapters["ref"] = copy.deepcopy(adapters["ours"])
    opts = {k: torch.optim.AdamW(a.parameters(), lr=1e-4, weight_decay=0.05) for k, a in adapters.items()}
    hf_logits = lambda h, m: ref_lm.lm_head(h.last_hidden_state[m])
    sides = dict(ours=(ours.embed_tokens,
                       lambda: ours(t_ids[:, n_pre:], valid=t_valid[:, n_pre:], cache=prefix,
                                    logits_at=t_at[:, n_pre:]),
                       lambda e: ours(embeds=e[:, n_pre:], valid=s_valid[:, n_pre:], cache=prefix,
                                      logits_at=s_at[:, n_pre:])),
                 ref=(ref_lm.model.embed_tokens,
                      lambda: hf_logits(ref_lm.model(input_ids=t_ids, attention_mask=t_valid.long()), t_at),
                      lambda e: hf_logits(ref_lm.model(inputs_embeds=e, attention_mask=s_valid.long()), s_at)))
    losses = {"ours": [], "ref": []}

    def step(name):
        (embed, teacher_logits, student_logits), ad, opt = sides[name], adapters[name], opts[name]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
            with torch.no_grad():
                teacher = teacher_logits()
            speech = ad(feats, lengths)[0]
            emb = embed(s_ids).masked_scatter(speech_at[..., None], torch.cat(
                [speech[i, :s] for i, s in enumerate(n_sp)]).to(ours.embed_tokens.weight.dtype))
            loss = kl_loss(student_logits(emb), teacher)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ad.parameters(), 1.0)
        opt.step()
        losses[name].append(loss.item())

    tm = ab({"ref": lambda: step("ref"), "ours": lambda: step("ours")}, reps, device, budget_s=budget_s)
    real = int(s_valid.sum() + t_valid.sum()) - 2 * B * n_pre
    res = dict(config=kw, batch=B, seq=(t_ids.shape[1], s_ids.shape[1]), speech_positions=n_sp,
               response_positions=n_resp, padding=1 - real / (t_ids.numel() + s_ids.numel() - 2 * B * n_pre),
               autocast_bf16=autocast_bf16, samples_s_ours=B / tm["ours"]["med"], samples_s_ref=B / tm["ref"]["med"],
               # same adapter init and data: the first loss agrees up to kernel rounding
               first_loss_ours=losses["ours"][0], first_loss_ref=losses["ref"][0],
               **timings(tm, dict(step=("ref", "ours"))))
    if do_profile:
        res["profile_ours"] = profile(lambda: step("ours"), "stage-1 step ours")
    return res


# ----------------------------------------------------------------------------- 5. int8 weight-only decode
SMOLLM2 = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints", "smollm2-135m-instruct")


@torch.no_grad()
def int8_quality(cfg, device, new_tokens=32, chunk=512):
    """What int8 costs against our fp32 on the same weights, with bf16 (what --dtype=auto picks on a CPU that
    has it) beside it for scale: greedy ids from the stage-1 teacher prompt over the 63 held-out sentences,
    and the perplexity of scripts/sentences.txt as one text, in chunks (the scales are computed from the
    weights alone, so no text was seen by the quantization). On the prepared SmolLM2 in a full run: random
    weights say nothing about quality, so --quick (or a missing checkpoint) runs the code on random ones and
    says so."""
    import cache
    import data
    import synth
    from model import Decoder
    from quantize import quantize_decoder
    from tokenizer import Tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        real = cfg is not QUICK and os.path.isdir(SMOLLM2)
        folder = SMOLLM2 if real else tmp
        if not real:
            hf_causal_lm(cfg["lm"], "llama", folder, "cpu", torch.float32)
        decs = {name: Decoder.from_pretrained(folder, dtype=dtype, device=device).eval()
                for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("int8", torch.float32))}
    quantize_decoder(decs["int8"])
    if real:
        tok, (train, test) = Tokenizer.from_pretrained(folder), synth.load_sentences()
        rows = [tok.encode_chat(cache.continue_target_messages(s)) for _, s in test]
        text, stop = tok.encode(" ".join(s for _, s in sorted(train + test))), tok.eos_ids
    else:
        g, V = torch.Generator().manual_seed(4), cfg["lm"]["vocab_size"]
        rows = [torch.randint(0, V, (cfg["prompt_len"],), generator=g).tolist() for _ in range(4)]
        text, stop = torch.randint(0, V, (4 * cfg["prompt_len"],), generator=g).tolist(), []
    ids, _, valid = data.pad_batch(rows, 0, side="left")
    text = torch.tensor([text], device=device)
    res = dict(weights=SMOLLM2 if real else "random (SmolLM2 shape in a full run; quality not measured)",
               prompts=len(rows), new_tokens=new_tokens, text_tokens=text.shape[1])
    out = {}
    for name, dec in decs.items():
        out[name] = dec.generate(ids.to(device), valid=valid.to(device), max_new_tokens=new_tokens, stop_ids=stop)
        nll = sum(torch.nn.functional.cross_entropy(dec(x[:, :-1])[0].float(), x[0, 1:], reduction="sum").item()
                  for x in (text[:, i:i + chunk + 1] for i in range(0, text.shape[1] - 1, chunk)))
        res[f"ppl_{name}"] = math.exp(nll / (text.shape[1] - 1))
    for name in ("int8", "bf16"):
        same = [a == b for a, b in zip(out["fp32"], out[name])]
        res[f"ids_agree_{name}"] = sum(same)
        res[f"first_diff_{name}"] = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                                     if not s else None for a, b, s in zip(out["fp32"], out[name], same)]
        res[f"ppl_ratio_{name}"] = res[f"ppl_{name}"] / res["ppl_fp32"]
    res.update(ids_most_equal=res["ids_agree_int8"] > len(rows) / 2, ppl_rise_ok=res["ppl_ratio_int8"] <= 1.02,
               reply_tokens_fp32=sum(map(len, out["fp32"])) / len(rows))
    return res


def bench_int8(cfg, reps, device, do_profile=False, budget_s=None):
    """int8 weight-only decode (quantize.py): speed on random weights in the two LLM shapes, ours int8 and
    fp32 beside transformers' fp32 generate, then its cost in quality (int8_quality)."""
    kw = dict(reps=reps, device=device, do_profile=do_profile, budget_s=budget_s, int8=True)
    return dict(qwen=bench_decode(cfg, small=False, **kw), smollm2=bench_decode(cfg, small=True, **kw),
                **int8_quality(cfg, device))


# ----------------------------------------------------------------------------- report
# (name, section, result key, minimum): the speed claims. log-mel is held to 5x on the identical padded output and
# on the real frames the pipeline computes (SpeechLM.encode_audio).
TARGETS = [("log-mel padded >= 5x transformers", "log_mel", "speedup_padded", 5.0),
           ("log-mel real frames >= 5x transformers", "log_mel", "speedup_real", 5.0),
           ("log-mel values within 1e-4", "log_mel", "values_ok", True),
           ("encoder real-frames >= 4x padded (5 s)", "encoder", "speedup_real_vs_padded", 4.0),
           ("decode >= 1.2x transformers tok/s", "decode", "speedup_tok_s", 1.2),
           ("decode ids identical", "decode", "ids_equal", True),
           ("decode (small) ids identical", "decode_small", "ids_equal", True),
           ("int8 decode >= 2x transformers fp32 tok/s, Qwen2.5-0.5B shape", "int8", "qwen.speedup_tok_s_int8", 2.0),
           ("int8 decode >= 2x transformers fp32 tok/s, SmolLM2-135M shape", "int8", "smollm2.speedup_tok_s_int8", 2.0),
           ("int8 greedy replies (32 tokens) = fp32's on most prompts", "int8", "ids_most_equal", True),
           ("int8 perplexity within 2% of fp32's", "int8", "ppl_rise_ok", True),
           ("stage-1 step >= 1.5x transformers", "train", "speedup_step", 1.5)]


def _get(results, sec, key):
    r = results[sec]
    for k in key.split("."):   # "qwen.speedup_tok_s_int8": a field of a sub-result
        r = r[k]
    return r


def check_targets(results):
    return {name: dict(value=_get(results, sec, key), target=want, passed=bool(_get(results, sec, key) >= want))
            for name, sec, key, want in TARGETS if sec in results}


def table(results):
    rows = []   # (what, ours, reference, speed-up key) -- speed-ups by median and by minimum
    if "log_mel" in results:
        r = results["log_mel"]
        rows += [(f"log-mel 10 s, {what}", f"{r['ms_' + k]:.1f} ms", f"{r['ms_ref']:.1f} ms", r, key)
                 for k, key, what in (("ours_padded", "padded", "padded to 30 s"), ("ours_real", "real", "real frames"))]
    if "encoder" in results:
        r = results["encoder"]
        rows += [("encoder 5 s, ours padded", f"{r['ms_ours_padded']:.0f} ms", f"{r['ms_ref_padded']:.0f} ms", r, "padded_vs_ref"),
                 ("encoder 5 s, ours real frames", f"{r['ms_ours_real']:.0f} ms", f"{r['ms_ref_padded']:.0f} ms", r, "real_vs_ref"),
                 ("encoder 5 s, real frames vs padded (ours)", f"{r['ms_ours_real']:.0f} ms",
                  f"{r['ms_ours_padded']:.0f} ms", r, "real_vs_padded")]
    for sec in ("decode", "decode_small"):
        if sec in results:
            r = results[sec]
            rows.append((f"decode {r['params'] / 1e6:.0f}M {r['dtype']}, generate tok/s", f"{r['tok_s_ours']:.2f}",
                         f"{r['tok_s_ref']:.2f}", r, "tok_s"))
    if "int8" in results:
        for shape, r in ((k, results["int8"][k]) for k in ("qwen", "smollm2")):
            rows += [(f"decode {shape} {r['params'] / 1e6:.0f}M int8 vs transformers fp32, tok/s",
                      f"{r['tok_s_int8']:.2f}", f"{r['tok_s_ref']:.2f}", r, "tok_s_int8"),
                     (f"decode {shape} {r['params'] / 1e6:.0f}M int8 vs ours fp32, tok/s", f"{r['tok_s_int8']:.2f}",
                      f"{r['tok_s_ours']:.2f}", r, "int8_vs_ours"),
                     (f"decode {shape} {r['params'] / 1e6:.0f}M ours fp32 vs transformers fp32, tok/s",
                      f"{r['tok_s_ours']:.2f}", f"{r['tok_s_ref']:.2f}", r, "tok_s")]
    if "train" in results:
        r = results["train"]
        rows.append(("stage-1 step samples/s" + (" (bf16 autocast)" if r["autocast_bf16"] else ""),
                     f"{r['samples_s_ours']:.2f}", f"{r['samples_s_ref']:.2f}", r, "step"))
    lines = [f"{'':44s} {'ours':>10s} {'reference':>10s} {'speed-up':>9s} {'(by min)':>9s}"]
    lines += [f"{a:44s} {b:>10s} {c:>10s} {r['speedup_' + k]:>8.2f}x {r['speedup_min_' + k]:>8.2f}x"
              for a, b, c, r, k in rows]
    if "log_mel" in results:
        r = results["log_mel"]
        lines.append(f"log-mel max |ours - transformers|: padded {r['max_abs_diff_padded']:.1e}, real frames "
                     f"{r['max_abs_diff_real']:.1e}")
    if "train" in results:
        r = results["train"]
        lines.append(f"stage-1 step: rows of {r['seq'][0]} (teacher) and {r['seq'][1]} (student) positions, "
                     f"{r['padding']:.0%} of them padding after the shared start; first loss ours "
                     f"{r['first_loss_ours']:.6f}, transformers {r['first_loss_ref']:.6f}")
    if "encoder" in results:
        lines.append(f"encoder max |ours padded - transformers|: {results['encoder']['max_abs_diff_padded_vs_ref']:.1e}")
    for sec in ("decode", "decode_small"):
        if sec in results:
            r = results[sec]
            lines.append(f"{sec}: one-token steps {r['step_tok_s_ours']:.2f} tok/s (ours), {r['step_tok_s_ref']:.2f} "
                         f"(transformers); bandwidth bound {r['weight_bytes_per_token'] / 1e6:.0f} MB of weights per "
                         f"token / {r['memcpy_gb_s']:.1f} GB/s copy traffic = {r['bound_tok_s']:.1f} tok/s, of which "
                         f"ours reaches {100 * r['fraction_of_bound_ours']:.0f}%, transformers "
                         f"{100 * r['fraction_of_bound_ref']:.0f}%; ids equal: {r['ids_equal']}")
    if "int8" in results:
        q = results["int8"]
        for shape in ("qwen", "smollm2"):
            r = q[shape]
            lines.append(f"int8 {shape}: one-token steps {r['step_tok_s_int8']:.2f} tok/s, {r['speedup_step_int8']:.2f}x "
                         f"transformers fp32's; {r['weight_bytes_per_token_int8'] / 1e6:.0f} MB of weights per token "
                         f"(fp32 {r['weight_bytes_per_token'] / 1e6:.0f} MB), bound {r['bound_tok_s_int8']:.1f} tok/s, "
                         f"{100 * r['fraction_of_bound_int8']:.0f}% of it reached")
        lines.append(f"int8 quality on {q['weights']}: greedy replies (up to {q['new_tokens']} tokens, "
                     f"{q['reply_tokens_fp32']:.1f} on average) equal fp32's on {q['ids_agree_int8']}/{q['prompts']} "
                     f"prompts (bf16: {q['ids_agree_bf16']}/{q['prompts']}); perplexity of {q['text_tokens']} tokens "
                     f"{q['ppl_fp32']:.3f} fp32, {q['ppl_int8']:.3f} int8 (x{q['ppl_ratio_int8']:.4f}), "
                     f"{q['ppl_bf16']:.3f} bf16 (x{q['ppl_ratio_bf16']:.4f})")
    return "\n".join(lines)


SECTIONS = ("log_mel", "encoder", "decode", "train", "int8")
EXTRA = ("decode_small",)   # on request (--only): SmolLM2-135M-shaped decode, the out-of-the-box LLM


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, seconds")
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma list of " + ",".join(SECTIONS + EXTRA))
    ap.add_argument("--out", default="bench.json", help="JSON results ('' for none)")
    ap.add_argument("--dtype", default="fp32", help="decode dtype, both sides (fp32 | bf16 | fp16)")
    ap.add_argument("--compile", action="store_true", help="torch.compile our decoder's forward")
    ap.add_argument("--bf16", action="store_true", help="stage-1 step under bf16 autocast, both sides")
    ap.add_argument("--profile", action="store_true", help="print torch.profiler tables (also kept in the JSON)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    for sec in only:
        if sec not in SECTIONS + EXTRA:
            raise SystemExit(f"unknown section {sec!r}; choose from {', '.join(SECTIONS + EXTRA)}")
    try:   # every section times transformers beside ours; run.sh does not install it, test.sh does
        import transformers  # noqa: F401
    except ImportError:
        raise SystemExit("bench.py compares against transformers, a test extra: install it with "
                         "`.venv/bin/pip install -r requirements-test.txt` (or run `bash test.sh` once)") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    from model import pick_dtype
    device, cfg = torch.device(args.device), QUICK if args.quick else FULL
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    results = dict(meta=dict(command="python scripts/bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
                             torch=torch.__version__, threads=torch.get_num_threads(), device=str(device),
                             cpu=platform.processor() or platform.machine(), cpu_count=cores,
                             cpu_capability=torch.backends.cpu.get_cpu_capability(),
                             load_avg_start=load, quick=args.quick))
    if device.type == "cpu" and load > cores:
        # measured: on an oversubscribed CPU every parallel op waits milliseconds for a descheduled OpenMP
        # thread, so many-small-op work (real-frames encoder, decode steps) slows far more than big GEMMs
        print(f"[bench] warning: load average {load:.1f} on {cores} cores: parallel ops wait on descheduled "
              "threads and skew the ratios; --threads=1 gives compute-bound ratios on a shared machine")
    t0 = time.perf_counter()
    for sec in only:
        t = time.perf_counter()
        print(f"[bench] {sec} ...", flush=True)
        kw = dict(reps=cfg["reps"][sec], device=device, do_profile=args.profile, budget_s=cfg["budget_s"].get(sec))
        if sec == "log_mel":
            results[sec] = bench_log_mel(cfg, **kw)
        elif sec == "encoder":
            results[sec] = bench_encoder(cfg, **kw)
        elif sec in ("decode", "decode_small"):
            results[sec] = bench_decode(cfg, small=sec == "decode_small", dtype=pick_dtype(args.dtype, device),
                                        compile_=args.compile, **kw)
        elif sec == "int8":
            results[sec] = bench_int8(cfg, **kw)
        else:
            results[sec] = bench_train(cfg, autocast_bf16=args.bf16, **kw)
        results[sec]["bench_seconds"] = time.perf_counter() - t
    results["targets"] = check_targets(results)
    m = results["meta"]
    m.update(total_seconds=time.perf_counter() - t0, load_avg_end=os.getloadavg()[0])
    print("\n" + table(results))
    for name, t in results["targets"].items():
        v = t["value"] if isinstance(t["value"], bool) else f"{t['value']:.2f}"
        print(f"{'PASS' if t['passed'] else 'MISS'}  {name}: {v}")
    print(f"[bench] {m['total_seconds']:.0f} s, {m['threads']} threads, CPU capability {m['cpu_capability']}, "
          f"load average {load:.1f} -> {m['load_avg_end']:.1f}" + (f"; wrote {args.out}" if args.out else ""))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return results


if __name__ == "__main__":
    main()
