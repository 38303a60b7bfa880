"""int8 weight-only linear layers for the frozen LLM (chat.py --quantize=int8): a decode step reads every weight
once, so on a CPU its time is their bytes, a quarter of fp32's. After gpt-fast's WeightOnlyInt8Linear: symmetric
per-output-channel scales, activations and LoRA in floating point. Inference only: the kernel has no backward."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from adapter import LoRALinear


class Int8Linear(nn.Linear):
    """weight: int8 (out, in) with one bf16 scale per output channel, w ~= q * s; the bias stays float."""

    def forward(self, x):
        if x.device.type == "cpu":
            # vectorised for bf16 activations only (summed in fp32); its aligned loads need a fresh contiguous copy
            a = x.reshape(-1, self.in_features).to(torch.bfloat16, memory_format=torch.contiguous_format, copy=True)
            y = torch.ops.aten._weight_int8pack_mm(a, self.weight, self.scales).to(x.dtype)
            y = y.view(*x.shape[:-1], self.out_features)
        else:   # dequantize and matmul, as gpt-fast does: torch's CUDA kernel for this op is a plain fp32 loop
            y = F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        return y if self.bias is None else y + self.bias


class Int8LoRALinear(LoRALinear, Int8Linear):
    """LoRALinear's base, super().forward(x), is Int8Linear's int8 matmul here; the LoRA delta is unchanged."""


@torch.no_grad()
def to_int8(linear):
    w = linear.weight.float()
    # max |w| of a row -> 127; the scale rounded to bf16 (the kernel's) first, so q * s is on the grid it multiplies
    scales = (w.abs().amax(1) / 127).clamp(min=torch.finfo(torch.float32).tiny).to(torch.bfloat16)
    q = (w / scales.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
    del linear.weight                       # this module's reference only: a tied embedding keeps its table
    linear.register_buffer("weight", q)
    linear.register_buffer("scales", scales)
    linear.__class__ = Int8LoRALinear if isinstance(linear, LoRALinear) else Int8Linear
    return linear


def quantize_decoder(decoder, mode="int8"):
    """Every linear layer of the decoder to int8, in place (a tied head gets its own int8 copy); the embedding
    stays float. The kernel reads 16 inputs at a time: other widths stay float."""
    if mode != "int8":
        raise ValueError(f"quantize={mode!r} is not supported: use int8")
    for m in list(decoder.modules()):
        if type(m) in (nn.Linear, LoRALinear) and m.in_features % 16 == 0:
            to_int8(m)
    return decoder
