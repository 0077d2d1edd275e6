"""Layer-wise window attention (Qwen technical report, section 2.3.2): at inference each layer may limit how far
back a query looks, shorter windows in the lower layers and longer in the higher ones (`model.attention_windows`).
It is not in the released modeling code; the rule here is the common sliding window: a query at position p sees
the keys at positions p - w + 1 .. p (w positions, itself included).

The mask is a function of positions only, so it composes with any other rule built from positions (a KV cache,
whose queries are the last positions of the keys; left-padded rows, whose offsets cancel in p - k; context
parallelism, whose ranks hold chunks of global positions).
"""

from __future__ import annotations

import torch


def layer_window(windows, layer_number: int) -> int | None:
    """The window of the 1-based `layer_number` from one window per layer (0 or None: full attention, None)."""
    if not windows:
        return None
    window = windows[layer_number - 1]
    return window or None


def window_keep_mask(query_positions: torch.Tensor, key_positions: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean [sq, sk] mask, True where the query at ``query_positions[i]`` may attend to the key at
    ``key_positions[j]``: causal (k <= q) and, with a `window`, fewer than `window` positions back (q - k < w)."""
    distance = query_positions[:, None] - key_positions[None, :]
    keep = distance >= 0
    if window:
        keep &= distance < window
    return keep
