"""FLOP counts of a Qwen training step, and the utilisation they give against a device's peak.

Two counts, as the literature names them (Chowdhery et al. 2022, PaLM, appendix B):
- model FLOPs: what the network needs for forward and backward (3x the forward), whatever the
  implementation; model FLOPs utilisation (MFU) is their rate over the peak.
- hardware FLOPs: what the GPU actually computes, model FLOPs plus the forward passes that activation
  recomputation runs again during backward; their rate over the peak is HFU, >= MFU.
"""

from __future__ import annotations

import re
from typing import Literal

# Dense (without sparsity) 16-bit tensor-core peak per device, FLOP/s: bf16, or fp16 on GPUs without bf16
# (V100, T4), which the trainer runs in fp32 (see `platform.runtime.precision_dtype`). Matched against
# torch.cuda.get_device_name() in this order, so each SKU gets its own figure: an H100 PCIe card is not an
# SXM module. Names come from the driver, e.g. "NVIDIA H100 80GB HBM3" (SXM5), "NVIDIA H100 PCIe",
# "NVIDIA H100 NVL", "NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe", "Tesla V100-SXM2-32GB".
PEAK_16BIT_FLOPS: tuple[tuple[str, float], ...] = (
    (r"H100 PCIe|H800 PCIe", 756e12),
    (r"H100 NVL|H200 NVL", 835e12),
    (r"GH200|H200|H100|H800", 989e12),  # SXM modules and Grace Hopper
    (r"B200", 2250e12),
    (r"A100|A800", 312e12),  # SXM4 and PCIe alike
    (r"L40S", 362e12),
    (r"L40\b", 181e12),
    (r"L4\b", 121e12),
    (r"A10\b", 125e12),
    (r"V100S", 130e12),
    (r"V100-PCIe", 112e12),
    (r"V100", 125e12),  # SXM2
    (r"\bT4\b", 65e12),
)

Head = Literal["lm", "scalar"]
Recompute = Literal["none", "selective", "full"]


def forward_flops_per_token(hidden: int, layers: int, ffn: int, vocab: int, seq: int, head: Head = "lm", *,
                            query_width: int | None = None, kv_width: int | None = None) -> tuple[float, float, float]:
    """Forward FLOPs of one token (a multiply-add is 2), as (the layers' GEMMs, the layers' attention
    cores, the head).

    Per layer, with query width Q (heads x head width) and key/value width K (key/value heads x head width), both
    H by default (multi-head attention with head width H / heads): QKV projection 2*H*(Q + 2K), output projection
    2*Q*H, SwiGLU 3 * 2*H*F -> 8H^2 + 6HF at Q = K = H; attention scores and weighted values 2 * 2*S*Q (the full
    S x S product, as Megatron-LM counts it, although causal kernels skip half). Head: the output layer 2*H*V of
    a language model, or the reward model's scalar head 2*H.
    """
    q = hidden if query_width is None else query_width
    kv = hidden if kv_width is None else kv_width
    gemm = layers * (2 * hidden * (q + 2 * kv) + 2 * q * hidden + 6 * hidden * ffn)
    attention = layers * 4 * seq * q
    outputs = vocab if head == "lm" else 1
    return float(gemm), float(attention), float(2 * hidden * outputs)


def model_flops_per_token(hidden: int, layers: int, ffn: int, vocab: int, seq: int, head: Head = "lm",
                          **widths: int | None) -> float:
    """Model FLOPs of one token in a training step: forward plus backward (twice the forward), 3x in all.
    `widths`: `query_width`, `kv_width` of `forward_flops_per_token` (grouped-query attention, Qwen3's head width)."""
    return 3 * sum(forward_flops_per_token(hidden, layers, ffn, vocab, seq, head, **widths))


def hardware_flops_per_token(
    hidden: int, layers: int, ffn: int, vocab: int, seq: int, head: Head = "lm", recompute: Recompute = "none",
    **widths: int | None,
) -> float:
    """Hardware FLOPs of one token: the model FLOPs plus what recomputation runs again in backward, i.e. the
    layers' forward with full recomputation (not the head, which megatron-core never recomputes), the
    attention cores' forward with selective recomputation (megatron-core's ``core_attn``)."""
    gemm, attention, _ = forward_flops_per_token(hidden, layers, ffn, vocab, seq, head, **widths)
    recomputed = {"none": 0.0, "selective": attention, "full": gemm + attention}[recompute]
    return model_flops_per_token(hidden, layers, ffn, vocab, seq, head, **widths) + recomputed


def peak_flops(device_name: str | None, override_tflops: float | None = None) -> float | None:
    """The dense 16-bit peak FLOP/s of a device from its name (`PEAK_16BIT_FLOPS`), or `override_tflops` * 1e12
    when given; None when unknown (CPU ranks, a GPU not in the table)."""
    if override_tflops:
        return override_tflops * 1e12
    if not device_name:
        return None
    for pattern, value in PEAK_16BIT_FLOPS:
        if re.search(pattern, device_name, re.IGNORECASE):
            return value
    return None


def utilisation(tokens_per_second_per_device: float, flops_per_token: float, peak: float | None) -> float | None:
    """Achieved FLOP/s over the peak (MFU with model FLOPs, HFU with hardware FLOPs); None when the peak is
    unknown."""
    if not peak:
        return None
    return tokens_per_second_per_device * flops_per_token / peak
