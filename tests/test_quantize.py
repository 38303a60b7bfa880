# quantize.py: int8 weight-only linear layers. The int8 matmul is its dequantized float matmul up to the bf16
# rounding of the activations; a quantized decoder decodes like the float one on a tiny model; the partial
# LoRA's delta is untouched; chat.py and evaluate.py take --quantize; the weights in memory follow the formula
# on the authors' layout (a tiny random release converted by release.py).
import copy
import gc
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cache
import data
import tiny
from adapter import LoRALinear, SpeechLM, add_lora, partial_lora
from model import Decoder
from quantize import Int8Linear, Int8LoRALinear, quantize_decoder, to_int8
from tokenizer import Tokenizer

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantize")
    m = tiny.make_models(root / "models")
    run = tiny.make_run(root / "run", m["whisper"], m["llm"], stage="emotion", num_emotions=5)
    clip = tiny.write_wav(root / "a.wav", tiny.chirp(1.5, seed=0))
    return dict(m, run=run, clip=clip, root=root)


def bf16_bound(x, w_deq, y):
    """|kernel - float matmul| allowed elementwise: x rounded to bf16 (relative 2^-9 each) moves the sum by at
    most 2^-9 * sum_k |x_k| |w_k|, and the bf16 output by 2^-9 |y|; 1% and 1e-6 over that for fp32 sums."""
    return 2 ** -9 * (x.abs() @ w_deq.abs().T + y.abs()) * 1.01 + 1e-6


def test_int8_linear_is_its_dequantized_matmul():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    w = lin.weight.detach().clone()
    to_int8(lin)
    assert type(lin) is Int8Linear and lin.weight.dtype == torch.int8 and lin.scales.dtype == torch.bfloat16
    assert lin.weight.abs().max() == 127                          # each row's largest weight maps to +-127
    deq = lin.weight.float() * lin.scales.float()[:, None]
    # round to nearest: within half a step of its row, the bf16-rounded scale costing at most 2^-9 of it more
    assert ((deq - w).abs() <= lin.scales.float()[:, None] * (0.5 + 2 ** -8)).all()
    base = torch.randn(3, 7, 65)
    for x in (base[..., :64].contiguous(),                        # 3-D, as the decoder calls it
              base[..., 1:],                                      # rows that start off the kernel's alignment
              base[:, -1, 1:],                                    # the LM head's last-position view
              base[..., :64].transpose(0, 1)):                    # not contiguous
        y = lin(x)
        want = F.linear(x, deq, lin.bias)
        assert y.shape == want.shape and y.dtype == torch.float32
        assert ((y - want).abs() <= bf16_bound(x, deq, want)).all()
    lin16 = to_int8(nn.Linear(64, 48).bfloat16())                 # a bf16 model: its own dtype back
    assert lin16(base[..., :64].bfloat16()).dtype == torch.bfloat16


def test_only_widths_the_kernel_reads_are_quantized_and_bad_modes_are_named():
    net = nn.Sequential(nn.Linear(32, 8), nn.Linear(40, 8))      # 40 inputs: not a multiple of 16
    quantize_decoder(net)
    assert type(net[0]) is Int8Linear and type(net[1]) is nn.Linear
    with pytest.raises(ValueError, match="'int4'.*int8"):
        quantize_decoder(net, "int4")


def test_quantized_decoder_decodes_like_fp32(models):
    """Greedy ids over 16 new tokens equal fp32's on at least 10 of 16 prompts (12 on this seed), and the
    next-token logits stay within 3% of their largest magnitude (1.2% here): a 32-wide random model, where
    each row has only 32 weights to share a scale, is the hard case; bench.py measures the real SmolLM2."""
    fp32 = Decoder.from_pretrained(models["llm"], dtype="fp32", device="cpu")
    int8 = quantize_decoder(copy.deepcopy(fp32))
    linears = [m for m in int8.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 2 * 7 + 1 and all(type(m) is Int8Linear for m in linears)   # 2 layers x 7, LM head
    assert int8.embed_tokens.weight.dtype == torch.float32
    tok = Tokenizer.from_pretrained(models["llm"])
    sentences = open(REPO / "scripts" / "sentences.txt").read().splitlines()[6::7][:16]
    ids, _, valid = data.pad_batch([tok.encode_chat(cache.continue_target_messages(s)) for s in sentences],
                                   tok.pad_id, side="left")
    a = fp32.generate(ids, valid=valid, max_new_tokens=16, stop_ids=[])
    b = int8.generate(ids, valid=valid, max_new_tokens=16, stop_ids=[])
    assert sum(x == y for x, y in zip(a, b)) >= 10, (a, b)
    la, lb = (m(ids, valid=valid, logits_at=-1) for m in (fp32, int8))
    assert (la - lb).abs().max() <= 0.03 * la.abs().max()


def _delta(dec, layer, x, mask):
    """A LoRA layer's output inside partial_lora minus outside it."""
    with partial_lora(dec, mask):
        with_lora = layer(x)
    return with_lora - layer(x)


@torch.no_grad()
def test_partial_lora_stays_float_on_an_int8_base(models):
    dec = add_lora(Decoder.from_pretrained(models["llm"], dtype="fp32", device="cpu"), r=4, alpha=8, dropout=0.0)
    for m in dec.modules():
        if isinstance(m, LoRALinear):
            m.lora_B.normal_(0, 0.1)
    layer = dec.layers[0].self_attn.q_proj
    A, B = layer.lora_A, layer.lora_B
    x, mask = torch.randn(2, 6, 32), torch.zeros(2, 6, dtype=torch.bool)
    mask[:, 2:4] = True                                           # the speech positions
    before = _delta(dec, layer, x, mask)
    tokens = torch.randint(0, dec.cfg.vocab_size, (1, 8))
    speech = torch.zeros(1, 8, dtype=torch.bool)
    speech[0, 3:5] = True
    quantize_decoder(dec)
    assert type(layer) is Int8LoRALinear and layer.weight.dtype == torch.int8
    assert layer.lora_A is A and layer.lora_B is B and A.dtype == B.dtype == torch.float32
    after = _delta(dec, layer, x, mask)
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)   # y + d - y: float rounding of the add only
    assert after[:, [0, 1, 4, 5]].abs().max() == 0 and after[:, 2:4].abs().max() > 1e-2
    # through the whole int8 decoder, the LoRA still acts from the speech on and never before it
    with partial_lora(dec, speech):
        lora = dec(tokens)
    plain = dec(tokens)
    assert (lora - plain)[0, :3].abs().max() == 0 and (lora - plain)[0, 3:].abs().max() > 1e-2


def _chat(models, *args):
    return subprocess.Popen([sys.executable, str(REPO / "chat.py"), f"--ckpt={models['run']}", "--max_new_tokens=8",
                             *args, models["clip"]], cwd=models["root"], env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_chat_quantize_int8_end_to_end_and_a_bad_value(models, monkeypatch, capsys):
    good, bad = _chat(models, "--quantize=int8", "--ser"), _chat(models, "--quantize=int4")   # side by side
    out, err = good.communicate(timeout=120)
    assert good.returncode == 0, err
    head, reply = out.split("\n", 1)
    assert head.startswith("emotion head: ") and reply.strip() and "Traceback" not in err
    out, err = bad.communicate(timeout=120)
    assert bad.returncode == 2 and out == "" and "Traceback" not in err
    assert "--quantize: invalid choice: 'int4'" in err and "int8" in err, err
    # the same command in this process: the LLM that answered is the int8 one
    import chat
    import quantize
    seen = []
    monkeypatch.setattr(quantize, "quantize_decoder", lambda dec, mode: seen.append(quantize_decoder(dec, mode)))
    assert chat.main([f"--ckpt={models['run']}", "--max_new_tokens=8", "--quantize=int8", models["clip"]]) == 0
    assert capsys.readouterr().out.strip()
    assert all(type(m) in (Int8Linear, Int8LoRALinear) for m in seen[0].modules() if isinstance(m, nn.Linear))


def test_evaluate_loads_int8_when_asked(models, monkeypatch):
    import evaluate
    monkeypatch.setattr(evaluate, "quantize", "int8")
    lm = evaluate.load(models["run"])
    assert type(lm.decoder.layers[0].mlp.up_proj) is Int8LoRALinear and type(lm.decoder.lm_head) is Int8Linear
    monkeypatch.setattr(evaluate, "quantize", "int4")
    with pytest.raises(ValueError, match="int8"):
        evaluate.load(models["run"])


def weight_bytes(module):
    """Bytes of every weight tensor the module holds (parameters and buffers), each storage once."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*module.parameters(), *module.buffers()]}
    return sum(storages.values())


def test_memory_formula_on_the_release_layout(tmp_path):
    """int8 bytes = quantized weights x 1 + their output channels x 2 (bf16 scales) + every other weight at its
    dtype, checked on the authors' layout: Qwen-1 (q|k|v with biases, untied head) + Whisper + adapter +
    emotion head + partial LoRA on every projection, converted by release.py. The float weights are freed."""
    import release
    from test_release import D, INTER, LAYERS, VOCAB, make_release
    make_release(str(tmp_path / "blsp-emo"))
    lm = SpeechLM.from_run(release.convert(str(tmp_path / "blsp-emo"), str(tmp_path / "run"), log=lambda *a: None),
                           device="cpu", dtype="fp32")
    n_float = sum(t.numel() for t in [*lm.parameters(), *lm.buffers()])
    assert weight_bytes(lm) == 4 * n_float                        # fp32 throughout, each tensor once
    F_ = INTER // 2                                               # Qwen-1's w1 / w2 width
    shapes = [(D, D)] * 4 + [(F_, D)] * 2 + [(D, F_)]             # (out, in): q k v o, gate up, down
    shapes = shapes * LAYERS + [(VOCAB, D)]                       # and the LM head
    q_weights, q_channels = sum(o * i for o, i in shapes), sum(o for o, _ in shapes)
    head = weakref.ref(lm.decoder.lm_head.weight)
    quantize_decoder(lm.decoder)
    gc.collect()
    assert head() is None
    assert weight_bytes(lm) == q_weights * 1 + q_channels * 2 + 4 * (n_float - q_weights)
