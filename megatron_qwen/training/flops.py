"""FLOP count of a Qwen training step and model-FLOPs utilisation (MFU)."""

from __future__ import annotations

# Dense BF16 tensor-core peak per device, FLOP/s, by a substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "H800": 989e12,
    "GH200": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "A10": 125e12,
    "V100": 125e12,
}


def qwen_flops_per_token(hidden: int, layers: int, ffn: int, vocab: int, seq: int, recompute_full: bool = False) -> float:
    """Model FLOPs of one token in a forward+backward pass of Qwen (v1).

    Per layer, forward, per token (a multiply-add is 2 FLOPs):
      QKV projection 2*H*3H, attention scores and weighted values 2 * 2*S*H (the full S x S product,
      as Megatron-LM counts it), output projection 2*H*H, SwiGLU 3 * 2*H*F
      -> 8H^2 + 4SH + 6HF.
    Plus the output layer 2*H*V. The backward pass costs twice the forward: x3 in all, x4 with full
    activation recomputation (the forward runs again).
    """
    per_layer = 8 * hidden * hidden + 4 * seq * hidden + 6 * hidden * ffn
    forward = layers * per_layer + 2 * hidden * vocab
    return (4.0 if recompute_full else 3.0) * forward


def peak_flops(device_name: str | None, override_tflops: float | None = None) -> float | None:
    """Peak dense BF16 FLOP/s of a device from its name, or `override_tflops` * 1e12 when given."""
    if override_tflops:
        return override_tflops * 1e12
    if not device_name:
        return None
    for key, value in PEAK_BF16_FLOPS.items():
        if key in device_name:
            return value
    return None


def mfu(tokens_per_second_per_device: float, flops_per_token: float, peak: float | None) -> float | None:
    """Achieved model FLOP/s over the peak, or None when the peak is unknown (e.g. on CPU)."""
    if not peak:
        return None
    return tokens_per_second_per_device * flops_per_token / peak
