"""int8 weight-only linear layers for the frozen LLM, for decoding on a CPU: one token's step reads every
weight once, so its time is the bytes of weights; int8 reads a quarter of fp32's. After pytorch-labs/gpt-fast
(WeightOnlyInt8Linear): symmetric per-output-channel scales, computed here when the model loads, and
activations left in floating point. The partial LoRA stays in floating point on top of an int8 base.

    python chat.py clip.wav --quantize=int8

Weights in memory: 1 byte per quantized weight + 2 per output channel (a bf16 scale), the rest (embedding
table, norms, biases, LoRA, encoder, adapter) as before. For inference only: the int8 kernel has no backward.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from adapter import LoRALinear

MODES = ("int8",)


class Int8Linear(nn.Linear):
    """An nn.Linear whose weight is int8 (out, in) with one bf16 scale per output channel: w ~= q * s.
    The bias, if any, stays float. Made in place from a float Linear by to_int8."""

    def forward(self, x):
        if x.device.type == "cpu":
            # The CPU kernel is vectorised for bf16 activations only (fp32 ones take a scalar loop, slower than
            # an fp32 matmul): x is rounded to bf16, products summed in fp32, the output returned in x's dtype.
            # Always a fresh copy: the kernel's aligned loads need a row-contiguous input starting on 32 bytes.
            a = x.reshape(-1, self.in_features).to(torch.bfloat16, memory_format=torch.contiguous_format, copy=True)
            y = torch.ops.aten._weight_int8pack_mm(a, self.weight, self.scales).to(x.dtype)
            y = y.view(*x.shape[:-1], self.out_features)
        else:
            # other devices dequantize and matmul, as gpt-fast does (torch's CUDA kernel for this op is a plain
            # fp32 loop, one thread per output); not yet run on a GPU
            y = F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        return y if self.bias is None else y + self.bias


class Int8LoRALinear(LoRALinear, Int8Linear):
    """LoRALinear computes its base as super().forward(x): in this class that is Int8Linear's int8 matmul
    (the method order is LoRALinear, Int8Linear, nn.Linear); the LoRA delta is LoRALinear's, unchanged."""


@torch.no_grad()
def to_int8(linear):
    """In place: the float weight -> int8 and its scales, the module -> the int8 form of its class."""
    w = linear.weight.float()
    # Symmetric: max |w| of a row maps to 127, so nothing is clipped (the clamp only catches the rounding of
    # the scale). The scale is rounded to bf16, the kernel's dtype, before w is divided by it: q * s is then
    # the nearest point of the grid the kernel really multiplies by.
    scales = (w.abs().amax(1) / 127).clamp(min=torch.finfo(torch.float32).tiny).to(torch.bfloat16)
    q = (w / scales.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
    del linear.weight                       # this module's reference only: a tied embedding keeps its table
    linear.register_buffer("weight", q)
    linear.register_buffer("scales", scales)
    linear.__class__ = Int8LoRALinear if isinstance(linear, LoRALinear) else Int8Linear
    return linear


def quantize_decoder(decoder, mode="int8"):
    """Every linear layer of the decoder to int8, in place: attention, MLP, the LoRA bases and the LM head.
    The embedding table stays float: a lookup reads one row a token, so int8 would save memory, not time;
    a head tied to it gets its own int8 copy. A layer whose input width is not a multiple of 16 stays float:
    the kernel reads 16 inputs at a time and gives wrong numbers (or crashes) on a remainder."""
    if mode not in MODES:
        raise ValueError(f"quantize={mode!r} is not supported: use {' or '.join(MODES)}")
    for m in list(decoder.modules()):
        if type(m) in (nn.Linear, LoRALinear) and m.in_features % 16 == 0:
            to_int8(m)
    return decoder
