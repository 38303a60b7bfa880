# Builders for a tiny random BLSP-Emo, made at test time in a few hundred milliseconds: a Hugging Face
# Whisper folder, a Qwen2-style LLM folder with a byte-level BPE tokenizer in the Qwen2 file layout
# (tokenizer.json, vocab.json + merges.txt, tokenizer_config.json; ChatML specials), a run folder, and
# test clips. The checkpoint files are written by hand with the Hugging Face key names (not with
# transformers' save_pretrained): importing transformers costs more than everything else here, and the
# parity of these names with transformers is tests/test_model.py's business.
import json
import math
import os
import shutil

import numpy as np
import soundfile as sf
import torch
from safetensors.torch import save_file

import convert
import data
import evaluate
import tokenizer
import trainer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def make_tokenizer(folder, vocab_size=400):
    """A byte-level BPE trained on the project's prompts, saved as Qwen2 saves its tokenizer: Qwen's split
    regex + ByteLevel, NFC, the three ChatML specials appended after the vocabulary."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    tk = HFTokenizer(models.BPE())
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(convert.QWEN_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = [data.SYSTEM_PROMPT, data.EMOTION_SYSTEM_PROMPT, data.CONTINUE, data.CONTINUE_HEARD_EMOTION,
            evaluate.SER_QUESTION, "system\n", "user\n", "assistant\n", "the cat sat on the mat. hello world.",
            " ".join(data.EMOTIONS), "I think the speaker sounds sad, not happy or angry."] * 10
    tk.train_from_iterator(text, trainer=trainer)
    tk.add_special_tokens(SPECIALS)
    os.makedirs(folder, exist_ok=True)
    tk.save(os.path.join(folder, "tokenizer.json"))
    tk.model.save(str(folder))   # vocab.json + merges.txt
    cfg = {"added_tokens_decoder": {str(tk.token_to_id(s)): {"content": s, "special": True} for s in SPECIALS},
           "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": CHATML,
           "tokenizer_class": "Qwen2Tokenizer"}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f)
    convert.write_tokenizer(folder)   # what prepare.py does to a folder: tokenizer.tiktoken (+ .json)
    return str(folder)


def _linear(g, out_dim, in_dim, gain=1.0):
    # 1/sqrt(fan_in): activations keep their scale through the layers, so the random model is not trivial
    return torch.randn(out_dim, in_dim, generator=g) * (gain / math.sqrt(in_dim))


def make_whisper(folder, d_model=16, n_layers=1, n_heads=2, ffn_dim=32, n_mels=80, seed=0):
    """A Whisper folder (config.json, model.json + model.safetensors with the encoder under model.encoder.*)."""
    g = torch.Generator().manual_seed(seed)
    p = "model.encoder."
    sd = {p + "conv1.weight": _linear(g, d_model, n_mels * 3).reshape(d_model, n_mels, 3),
          p + "conv1.bias": torch.zeros(d_model),
          p + "conv2.weight": _linear(g, d_model, d_model * 3).reshape(d_model, d_model, 3),
          p + "conv2.bias": torch.zeros(d_model),
          p + "layer_norm.weight": torch.ones(d_model), p + "layer_norm.bias": torch.zeros(d_model)}
    t = torch.arange(1500)[:, None] * torch.exp(-math.log(10000) / (d_model // 2 - 1) * torch.arange(d_model // 2))
    sd[p + "embed_positions.weight"] = torch.cat([t.sin(), t.cos()], dim=1)   # whisper's sinusoids
    for i in range(n_layers):
        q = f"{p}layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd[q + f"self_attn.{name}.weight"] = _linear(g, d_model, d_model)
            if name != "k_proj":    # whisper's key projection has no bias
                sd[q + f"self_attn.{name}.bias"] = torch.zeros(d_model)
        for ln in ("self_attn_layer_norm", "final_layer_norm"):
            sd[q + f"{ln}.weight"], sd[q + f"{ln}.bias"] = torch.ones(d_model), torch.zeros(d_model)
        sd[q + "fc1.weight"], sd[q + "fc1.bias"] = _linear(g, ffn_dim, d_model), torch.zeros(ffn_dim)
        sd[q + "fc2.weight"], sd[q + "fc2.bias"] = _linear(g, d_model, ffn_dim), torch.zeros(d_model)
    cfg = dict(model_type="whisper", architectures=["WhisperForConditionalGeneration"], num_mel_bins=n_mels,
               max_source_positions=1500, d_model=d_model, encoder_attention_heads=n_heads,
               encoder_layers=n_layers, encoder_ffn_dim=ffn_dim, activation_function="gelu",
               scale_embedding=False, torch_dtype="float32")
    return _write(folder, cfg, sd, "whisper")


def make_llm(folder, tok_folder, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_pos=1024, seed=0):
    """A Qwen2 folder (q/k/v biases, untied head) with the tokenizer files copied in. The ChatML specials'
    rows of lm_head are zero, so greedy decoding never stops early: every reply has max_new_tokens tokens
    (random weights would otherwise sometimes answer with nothing at all)."""
    tok = tokenizer.Tokenizer.from_pretrained(tok_folder)
    V, hd = tok.vocab_size, dim // n_heads
    g = torch.Generator().manual_seed(seed)
    sd = {"model.embed_tokens.weight": torch.randn(V, dim, generator=g), "model.norm.weight": torch.ones(dim),
          "lm_head.weight": _linear(g, V, dim, gain=3.0)}       # logits of std ~3: peaked, not uniform
    for s in SPECIALS:
        sd["lm_head.weight"][tok.token_id(s)] = 0.0
    for i in range(n_layers):
        q = f"model.layers.{i}."
        for name, out in (("q_proj", dim), ("k_proj", n_kv_heads * hd), ("v_proj", n_kv_heads * hd)):
            sd[q + f"self_attn.{name}.weight"] = _linear(g, out, dim)
            sd[q + f"self_attn.{name}.bias"] = 0.1 * torch.randn(out, generator=g)
        sd[q + "self_attn.o_proj.weight"] = _linear(g, dim, dim)
        sd[q + "mlp.gate_proj.weight"], sd[q + "mlp.up_proj.weight"] = _linear(g, ffn_dim, dim), _linear(g, ffn_dim, dim)
        sd[q + "mlp.down_proj.weight"] = _linear(g, dim, ffn_dim)
        sd[q + "input_layernorm.weight"], sd[q + "post_attention_layernorm.weight"] = torch.ones(dim), torch.ones(dim)
    cfg = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=V, hidden_size=dim,
               intermediate_size=ffn_dim, num_hidden_layers=n_layers, num_attention_heads=n_heads,
               num_key_value_heads=n_kv_heads, max_position_embeddings=max_pos, rms_norm_eps=1e-6,
               rope_theta=10000.0, tie_word_embeddings=False, use_sliding_window=False,
               bos_token_id=tok.token_id("<|endoftext|>"), eos_token_id=tok.token_id("<|im_end|>"),
               torch_dtype="float32")
    _write(folder, cfg, sd, "llm")
    for f in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(os.path.join(tok_folder, f), os.path.join(folder, f))
    convert.write_tokenizer(folder)
    return str(folder)


def _write(folder, cfg, sd, kind):
    os.makedirs(folder, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(folder, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    convert.write_config(folder, kind)   # what prepare.py does to a folder: model.json
    return str(folder)


def make_models(root, llm_dims=(32,)):
    """-> {"whisper": folder, "llm": folder (first dim), "llm<dim>": folder for every dim} under root."""
    root = str(root)
    tok = make_tokenizer(os.path.join(root, "tokenizer"))
    out = {"whisper": make_whisper(os.path.join(root, "whisper"))}
    for k, d in enumerate(llm_dims):
        out[f"llm{d}"] = make_llm(os.path.join(root, f"llm{d}"), tok, dim=d, seed=k)
        out.setdefault("llm", out[f"llm{d}"])
    return out


def make_run(run_dir, whisper, llm, stage="emotion", num_emotions=5, lora=True, seed=0):
    """A run folder as train_emotion.py writes it (stage 2: LoRA + emotion head; random, not trained).
    The LoRA B matrices and the adapter are randomised so that the speech really changes the reply."""
    from adapter import SpeechLM
    torch.manual_seed(seed)
    m = SpeechLM.build(whisper, llm, device="cpu", dtype="fp32", adapter=dict(inner_dim=16))
    if num_emotions or lora:
        m.start_stage2(lora=dict(r=4, alpha=8, dropout=0.0) if lora else None, num_emotions=num_emotions)
    with torch.no_grad():
        for n, p in m.trainable_parameters().items():
            if n.endswith(".lora_B"):
                p.normal_(0, 0.1)
    trainer.save_run(m, str(run_dir), {"whisper": whisper, "llm": llm, "stage": stage})
    return str(run_dir)


def chirp(seconds, sr=16000, seed=0, amp=0.3):
    """A 150 Hz -> 3 kHz chirp with a slow amplitude envelope and a little noise: speech-like energy."""
    t = np.arange(int(seconds * sr)) / sr
    phase = 2 * np.pi * (150 * t + (3000 - 150) * t**2 / (2 * max(seconds, 1e-3)))
    env = 0.6 + 0.4 * np.sin(2 * np.pi * 1.3 * t)
    x = env * np.sin(phase) + 0.05 * np.random.default_rng(seed).standard_normal(len(t))
    return (amp * x).astype(np.float32)


def write_wav(path, audio, sr=16000):
    sf.write(str(path), np.asarray(audio, dtype=np.float32), sr, subtype="PCM_16")
    return str(path)
