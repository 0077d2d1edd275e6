"""FP8 (torchao, local spec) on a mixture-of-experts Qwen, on CPU (torch._scaled_mm runs FP8 on CPU).

(a) a routed expert's FP8 linear pads its token rows to the multiple of 16 FP8 GEMMs need, and its output and
gradients stay within e4m3/e5m2 rounding of the exact products (tests/fp8_reference.py), for token counts that
are no multiple of 16 and for an expert that got no tokens;
(b) one forward and backward of a tiny Qwen2-MoE in FP8 against the same model in fp32, as close as a dense model's;
(c) the FP8 dimension checks name the experts' widths. Training at EP=2 in FP8 is in tests/test_moe.py.
"""

from __future__ import annotations

import pytest
import torch

from fp8_reference import E4M3, E5M2, build_linear, check_gemm, forward_backward, linear_data

K, N = 64, 96


@pytest.fixture
def scaled_mm_shapes(monkeypatch):
    """The (rows, inner, columns) of every torch._scaled_mm call while the test runs."""
    shapes, original = [], torch._scaled_mm

    def recording(a, b, *args, **kwargs):
        shapes.append((a.shape[0], a.shape[1], b.shape[1]))
        return original(a, b, *args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", recording)
    return shapes


def _expert_linear(kind: str, recipe: str):
    from megatron.core import parallel_state

    from megatron_qwen.config import load_config
    from megatron_qwen.model.qwen import transformer_config
    from megatron_qwen.platform.runtime import Runtime

    layer = build_linear(kind, recipe, K, N, transformer_config(load_config("configs/tiny.yaml"), Runtime.cpu()),
                         parallel_state.get_tensor_model_parallel_group(), bias=False)
    layer.is_expert = True  # as SequentialMLP's experts are built (megatron-core's is_expert=True)
    return layer


@pytest.mark.usefixtures("single_rank")
@pytest.mark.parametrize("kind", ["column", "row"])
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_an_expert_linear_pads_its_tokens_and_stays_within_float8_rounding(recipe, kind, scaled_mm_shapes):
    rowwise = recipe == "rowwise"
    r, c = (1, 0) if rowwise else (None, None)
    for tokens in (5, 37):
        x, w, _, dy = linear_data(tokens, K, N, seed=tokens)
        layer = _expert_linear(kind, recipe)
        with torch.no_grad():
            layer.weight.copy_(w)
        y, dx, dw = forward_backward(layer, x, dy)
        assert y.shape == (tokens, N) and dx.shape == (tokens, K)
        checks = [
            check_gemm("output", y, x, E4M3, r, w.t(), E4M3, c, rowwise, rowwise),
            check_gemm("input grad", dx, dy, E5M2, r, w, E4M3, c, rowwise, rowwise),
            check_gemm("weight grad", dw, dy.t(), E5M2, r, x, E4M3, c, rowwise, rowwise),
        ]
        print(f"\n{recipe} {kind} expert, {tokens} tokens:\n  " + "\n  ".join(map(str, checks)))
        for check in checks:
            assert check.worst_over_bound <= 1.0, check
            assert 2**-0.5 < check.rms_ratio < 2**0.5, check
    # An expert the router sent no token: empty output, a zero weight gradient, the GEMMs still run (padded).
    layer = _expert_linear(kind, recipe)
    y, dx, dw = forward_backward(layer, torch.zeros(0, K), torch.zeros(0, N))
    assert y.shape == (0, N) and dx.shape == (0, K) and torch.equal(dw, torch.zeros(N, K))
    assert len(scaled_mm_shapes) == 3 * 3, scaled_mm_shapes  # three GEMMs per pass
    for shape in scaled_mm_shapes:
        assert all(size % 16 == 0 for size in shape), scaled_mm_shapes


def _loss_and_grads(overrides: list[str]):
    """Mean next-token loss and every parameter's gradient of the worker's tiny Qwen2-MoE (or a dense model of
    the same shape) at fp32 or in FP8, from the same initial weights, on fixed tokens."""
    from megatron_qwen.config import load_config
    from megatron_qwen.model.qwen import build_model
    from megatron_qwen.platform.runtime import Runtime
    from parallel.moe_worker import MOE_OVERRIDES

    cfg = load_config("configs/tiny.yaml", [*MOE_OVERRIDES, "model.seq_length=64", *overrides])
    model = build_model(cfg, Runtime.cpu())[0]
    tokens = torch.randint(0, 256, (2, 65), generator=torch.Generator().manual_seed(0))
    position_ids = torch.arange(64).expand(2, 64)
    loss = model(tokens[:, :-1], position_ids, None, labels=tokens[:, 1:]).mean()
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.usefixtures("single_rank")
def test_fp8_moe_forward_backward_is_as_close_to_fp32_as_a_dense_model():
    """The tiny Qwen2-MoE (shared expert with its gate, a dense layer; the router and the gate stay fp32) in FP8
    against fp32: the loss within 1e-2 relative and the gradients within 10 % (relative norm of the difference, over
    all parameters), and no further from fp32 than the same model with every layer dense (the dense FP8 path's
    error, twice over for headroom)."""
    report = {}
    for name, extra in (("moe", []), ("dense", ["model.num_experts=null", "model.moe_mlp_only_layers=[]",
                                                "model.moe_shared_expert_ffn_hidden_size=null",
                                                "model.moe_shared_expert_gate=false"])):
        loss32, grads32 = _loss_and_grads(extra)
        loss8, grads8 = _loss_and_grads([*extra, "model.fp8=tensorwise"])
        assert sorted(grads8) == sorted(grads32)
        diff = torch.sqrt(sum(((grads8[k] - grads32[k]) ** 2).sum() for k in grads32))
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads32.values()))
        report[name] = (abs(loss8 - loss32) / loss32, (diff / norm).item())
        assert loss8 != loss32, f"{name}: the FP8 run gave the fp32 loss: its GEMMs did not run in FP8"
    print("\n" + "\n".join(f"{k}: loss rel. diff {a:.1e}, gradient rel. diff {b:.1e}" for k, (a, b) in report.items()))
    (moe_loss, moe_grad), dense_grad = report["moe"], report["dense"][1]
    assert moe_loss < 1e-2 and moe_grad < 0.1, report
    assert moe_grad < 2 * dense_grad, report


@pytest.mark.parametrize("overrides, fragment", [
    (["model.moe_ffn_hidden_size=40"],
     "mlp.experts linear_fc2 has 40 input features per rank (model.moe_ffn_hidden_size=40)"),
    (["model.moe_ffn_hidden_size=64", "parallel.tp=2", "parallel.etp=8"],
     "mlp.experts linear_fc2 has 8 input features per rank (model.moe_ffn_hidden_size=64 / expert tensor "
     "parallelism 8)"),
    (["model.moe_shared_expert_ffn_hidden_size=56"],
     "mlp.shared_experts linear_fc2 has 56 input features per rank (model.moe_shared_expert_ffn_hidden_size=56)"),
])
def test_fp8_dimension_checks_name_the_experts_widths(overrides, fragment):
    from megatron_qwen.config import load_config, validate
    from parallel.moe_worker import MOE_OVERRIDES

    errors, _ = validate(load_config("configs/tiny.yaml", [*MOE_OVERRIDES, "model.fp8=tensorwise", *overrides]))
    assert any(fragment in e for e in errors), errors
    errors, _ = validate(load_config("configs/tiny.yaml", [*MOE_OVERRIDES, "model.fp8=tensorwise"]))
    assert not errors, errors


def test_fp8_sizes_of_the_released_moe_models_pass():
    from megatron_qwen.config import load_config, validate

    for path, tp in (("configs/qwen1.5-moe-a2.7b.yaml", 2), ("configs/qwen2-57b-a14b.yaml", 4),
                     ("configs/qwen3-30b-a3b.yaml", 1), ("configs/qwen3-235b-a22b.yaml", 4)):
        errors, _ = validate(load_config(path, ["model.fp8=tensorwise", f"parallel.tp={tp}", "model.seq_length=4096",
                                                "training.micro_batch_size=1"]))
        assert not errors, (path, errors)
