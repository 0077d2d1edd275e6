"""LoRA adapters through conversion, against transformers and `peft` (fp32, CPU).

A random transformers Qwen3 (GQA, q/k norms) is the base, converted to a checkpoint. One launch of this file on 4
gloo ranks at TP=2 x PP=2 with SP builds the project's model with adapters and writes:
- the logits of the base with a `peft` adapter made by peft itself (random non-zero lora_B on q, v, o, up, down),
  imported with `peft-to-mcore`: they must equal peft's own logits;
- the logits of the base with adapters of the project's own (every projection, non-zero B), saved as a full
  checkpoint (base and adapters) and as an adapter-only one: the merged export loaded by transformers, and the
  `peft` export loaded by peft onto the exported base, must give the same logits.
The peft adapter, imported and exported again, comes back bit-identical; what the project's adapters cannot
represent is refused, naming the key, and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import zlib
from pathlib import Path

import pytest
import torch

from qwen_reference import randomize_weights
from spawn import run_torchrun

VOCAB, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS = 1024, 128, 4, 2, 64, 256, 4
TP, PP = 2, 2
ATOL = 1e-5
# The peft adapter (made by peft): some projections only, so that k's rows and gate's stay unadapted.
PEFT_R, PEFT_ALPHA, PEFT_TARGETS = 4, 8, ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
# The project's own adapters: every projection, another rank and a scale (alpha / rank) of 4.
OWN_PEFT = ["peft.method=lora", "peft.rank=3", "peft.alpha=12",
            "peft.target=[linear_qkv,linear_proj,linear_fc1,linear_fc2]"]


def tokens() -> torch.Tensor:
    """The (2, 23) batch every logit comparison uses (an odd length: SP at TP=2 pads it)."""
    return torch.randint(0, VOCAB, (2, 23), generator=torch.Generator().manual_seed(3))


def hf_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens()).logits.float()


def load_hf(directory: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager").eval()


def safetensors_dir(directory: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v for file in sorted(directory.glob("*.safetensors")) for k, v in load_file(file).items()}


# --------------------------------------------------------------------------- the launched worker


def _load(chunks, base: Path, adapters: Path | None) -> None:
    """Load the base weights from `base` and the adapters from `adapters` (when given) into `chunks`, each
    checkpoint entry copied into the tensor it was made from (an adapted linear's state-dict names are not its
    checkpoint names)."""
    from megatron.core import dist_checkpointing

    from megatron_qwen.checkpoint.adapters import is_adapter_key

    for chunk in chunks:
        sharded = chunk.sharded_state_dict()
        for path, adapter_part in ((base, False), (adapters, True)):
            if path is None:
                continue
            part = {n: v for n, v in sharded.items() if is_adapter_key(getattr(v, "key", "")) == adapter_part}
            targets = {n: v.data for n, v in part.items() if isinstance(getattr(v, "data", None), torch.Tensor)}
            loaded = dist_checkpointing.load(part, str(path))
            with torch.no_grad():
                for name, target in targets.items():
                    target.copy_(loaded[name])


def _fill_adapters(chunks) -> None:
    """Random A and non-zero B drawn per checkpoint key at full shape, each rank keeping its slice: the same
    adapters at every layout."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_qwen.checkpoint.adapters import is_adapter_key

    with torch.no_grad():
        for chunk in chunks:
            for item in chunk.sharded_state_dict().values():
                if isinstance(item, ShardedTensor) and is_adapter_key(item.key):
                    generator = torch.Generator().manual_seed(zlib.crc32(item.key.encode()))
                    full = torch.randn(item.global_shape, generator=generator) * 0.05
                    sizes = (1,) * item.prepend_axis_num + tuple(item.local_shape)
                    piece = full[tuple(slice(o, o + s) for o, s in zip(item.global_offset, sizes))]
                    item.data.copy_(piece.reshape(item.local_shape))


def worker(workdir: Path, base: Path, imported: Path) -> None:
    import yaml

    from megatron_qwen.checkpoint.io import chunks_state, save_model, save_sharded
    from megatron_qwen.config import load_config, resolve
    from megatron_qwen.inference.forward import ForwardPlan, forward_logits, is_writer
    from megatron_qwen.checkpoint.adapters import is_adapter_key
    from megatron_qwen.model.qwen import build_model
    from megatron_qwen.platform.launch import detect_launch, init_distributed
    from megatron_qwen.platform.runtime import Runtime

    layout = [f"parallel.tp={TP}", f"parallel.pp={PP}", "parallel.sp=true", "training.micro_batch_size=1",
              f"training.global_batch_size={PP}"]
    world = detect_launch().world_size
    imported_cfg, resolved, _ = resolve(load_config(imported / "model_config.yaml", layout), world)
    own_cfg, _, _ = resolve(load_config(base / "model_config.yaml", [*layout, *OWN_PEFT]), world)
    init_distributed(resolved.tp, resolved.pp, resolved.vpp, device="cpu")
    plan = ForwardPlan(imported_cfg, resolved, VOCAB, VOCAB)

    # The imported peft adapter on its base.
    chunks = build_model(imported_cfg, Runtime.cpu(), rope_at_positions=True, adapters=True)
    _load(chunks, base, imported)
    logits = forward_logits([c.eval() for c in chunks], plan, tokens())
    if is_writer():
        torch.save(logits, workdir / "imported_logits.pt")

    # The project's own adapters: logits, a full checkpoint and an adapter-only one.
    chunks = build_model(own_cfg, Runtime.cpu(), rope_at_positions=True, adapters=True)
    _load(chunks, base, None)
    _fill_adapters(chunks)
    logits = forward_logits([c.eval() for c in chunks], plan, tokens())
    if is_writer():
        torch.save(logits, workdir / "own_logits.pt")
    config = yaml.safe_dump(own_cfg.to_dict(), sort_keys=False)
    save_model(chunks, workdir / "full")
    state = chunks_state(chunks)
    adapters_only = {name: {k: v for k, v in sharded.items() if is_adapter_key(getattr(v, "key", ""))}
                     for name, sharded in state.items()}

    def files(tmp: Path) -> None:
        if torch.distributed.get_rank() == 0:
            (tmp / "model_config.yaml").write_text(config)
            (tmp / "adapter_base.json").write_text(json.dumps({"base": str(base), "fingerprint": "test"}))

    save_sharded(adapters_only, workdir / "adapters", write_extra=files)
    if torch.distributed.get_rank() == 0:
        (workdir / "full" / "model_config.yaml").write_text(config)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


# --------------------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The base (transformers, then converted), peft's adapter and its logits, the import, and one launch."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from megatron_qwen.convert import hf_to_mcore
    from megatron_qwen.convert.lora import peft_to_mcore

    root = tmp_path_factory.mktemp("lora_convert")
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                         max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = Qwen3ForCausalLM(config).eval()
    randomize_weights(hf)
    hf.save_pretrained(root / "hf")
    base_logits = hf_logits(hf)

    lora = get_peft_model(hf, LoraConfig(r=PEFT_R, lora_alpha=PEFT_ALPHA, target_modules=PEFT_TARGETS,
                                         lora_dropout=0.0, task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_" in name:  # peft starts B at zero: make every adapter count
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    lora.eval().save_pretrained(root / "peft")
    peft_logits = hf_logits(lora)

    hf_to_mcore(root / "hf", root / "base", tp=TP, pp=PP, log=lambda _: None)
    peft_to_mcore(root / "peft", root / "base", root / "imported", tp=TP, pp=PP, log=lambda _: None)
    run_torchrun(4, [__file__, "--workdir", str(root), "--base", str(root / "base"),
                     "--imported", str(root / "imported")], timeout=600)
    return {"root": root, "base_logits": base_logits, "peft_logits": peft_logits,
            "imported_logits": torch.load(root / "imported_logits.pt"),
            "own_logits": torch.load(root / "own_logits.pt")}


@pytest.mark.parallel
def test_imported_peft_adapter_gives_peft_logits_and_exports_back_bit_identical(built):
    from megatron_qwen.convert.lora import mcore_to_peft

    root = built["root"]
    assert (built["peft_logits"] - built["base_logits"]).abs().max() > 1e-2  # the adapter changes the model
    diff = (built["imported_logits"] - built["peft_logits"]).abs().max().item()
    assert diff < ATOL, f"imported adapter at TP={TP} x PP={PP}: max |logit difference| {diff:.3e} against peft"
    print(f"imported peft adapter at TP={TP} x PP={PP} with SP: max |logit difference| {diff:.2e} against peft")

    mcore_to_peft(root / "imported", root / "roundtrip", log=lambda _: None)
    original, back = safetensors_dir(root / "peft"), safetensors_dir(root / "roundtrip")
    assert back.keys() == original.keys()
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    config = json.loads((root / "roundtrip" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (PEFT_R, PEFT_ALPHA, 0.0)
    assert sorted(config["target_modules"]) == sorted(PEFT_TARGETS)
    imported = yaml_section(root / "imported", "peft")
    assert (imported["method"], imported["rank"], imported["alpha"]) == ("lora", PEFT_R, PEFT_ALPHA)
    from megatron_qwen.checkpoint.adapters import base_fingerprint

    # The record training checks: the base's path and its fingerprint (computed here from the base itself).
    assert json.loads((root / "imported" / "adapter_base.json").read_text()) == {
        "base": str((root / "base").resolve()), "fingerprint": base_fingerprint(root / "base")}


def yaml_section(ckpt: Path, section: str) -> dict:
    import yaml

    return yaml.safe_load((ckpt / "model_config.yaml").read_text())[section]


@pytest.mark.parallel
def test_merged_and_peft_exports_give_the_models_logits(built):
    from peft import PeftModel

    from megatron_qwen.cli.convert import main
    from megatron_qwen.convert import mcore_to_hf
    from megatron_qwen.convert.lora import mcore_to_peft

    root, own = built["root"], built["own_logits"]
    assert (own - built["base_logits"]).abs().max() > 1e-2  # the adapters change the model
    mcore_to_hf(root / "full", root / "merged", log=lambda _: None)
    merged_logits = hf_logits(load_hf(root / "merged"))
    diff = (merged_logits - own).abs().max().item()
    assert diff < ATOL, f"merged export: max |logit difference| {diff:.3e} against the model at TP={TP} x PP={PP}"
    print(f"merged export in transformers: max |logit difference| {diff:.2e} against the model at TP={TP} x PP={PP}")

    # An adapter-only checkpoint merges onto the base its adapter_base.json names, or the one --base names.
    mcore_to_hf(root / "adapters", root / "merged_from_adapters", log=lambda _: None)
    assert main(["mcore-to-hf", "--ckpt", str(root / "adapters"), "--base", str(root / "base"),
                 "--out", str(root / "merged_with_base")]) == 0
    merged = safetensors_dir(root / "merged")
    for other in ("merged_from_adapters", "merged_with_base"):
        tensors = safetensors_dir(root / other)
        assert tensors.keys() == merged.keys() and all(torch.equal(tensors[k], merged[k]) for k in merged), other

    # The peft adapter, loaded by peft onto the base exported from the base checkpoint.
    mcore_to_hf(root / "base", root / "base_hf", log=lambda _: None)
    assert main(["mcore-to-peft", "--ckpt", str(root / "adapters"), "--out", str(root / "own_peft"),
                 "--base-model", str(root / "base_hf")]) == 0
    mcore_to_peft(root / "full", root / "own_peft_full", log=lambda _: None)
    assert safetensors_dir(root / "own_peft").keys() == safetensors_dir(root / "own_peft_full").keys()
    peft_logits = hf_logits(PeftModel.from_pretrained(load_hf(root / "base_hf"), root / "own_peft").eval())
    diff = (peft_logits - merged_logits).abs().max().item()
    assert diff < ATOL, f"peft export on the exported base: max |logit difference| {diff:.3e} against the merged one"
    print(f"peft export on the exported base: max |logit difference| {diff:.2e} against the merged export, "
          f"{(peft_logits - own).abs().max().item():.2e} against the model")


# A Qwen2-MoE-shaped model whose layer 1 is dense among MoE layers (the experts take no adapters).
MOE = ["model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2", "model.ffn_hidden_size=96",
       "model.num_experts=4", "model.moe_router_topk=2", "model.moe_ffn_hidden_size=32",
       "model.moe_shared_expert_ffn_hidden_size=48", "model.moe_shared_expert_gate=true",
       "model.moe_mlp_only_layers=[1]", "model.padded_vocab_size=256"]


@pytest.mark.parametrize("overrides", [[], MOE], ids=["dense", "moe"])
def test_adapter_key_table_is_the_models_checkpoint_layout(overrides):
    """The keys and full shapes the converter expects equal what megatron-core's sharded state dict of the model
    with adapters lays out (stacked for a dense model, per layer for a mixture of experts, MLP adapters on dense
    layers only)."""
    from megatron_qwen.config import load_config
    from megatron_qwen.convert.lora import stored_adapter_shapes
    from megatron_qwen.convert.mcore_layout import stored_layout
    from megatron_qwen.checkpoint.adapters import is_adapter_key

    cfg = load_config("configs/tiny.yaml", [*overrides, *OWN_PEFT])
    laid_out = {piece.key: piece.global_shape for piece in stored_layout(cfg, adapters=True)[0]
                if is_adapter_key(piece.key)}
    assert laid_out == stored_adapter_shapes(cfg.model, cfg.peft)
    assert any("linear_fc1.adapter" in key for key in laid_out)


def _refused(capsys, argv: list[str], out: Path, *words: str) -> None:
    from megatron_qwen.cli.convert import main

    assert main(argv) == 2
    message = capsys.readouterr().err
    assert all(word in message for word in words), message
    assert not out.exists() and not out.with_name(out.name + ".tmp").exists()


# adapter_config.json changes the project's adapters cannot represent: (key, value).
UNREPRESENTABLE = [
    ("use_rslora", True), ("use_dora", True), ("rank_pattern", {"q_proj": 8}), ("alpha_pattern", {"v_proj": 4}),
    ("bias", "lora_only"), ("modules_to_save", ["lm_head"]), ("target_modules", ["q_proj", "embed_tokens"]),
    ("target_modules", ".*proj"), ("layers_to_transform", [0, 1]),
]


@pytest.mark.parallel
@pytest.mark.parametrize("key, value", UNREPRESENTABLE, ids=[f"{k}={v}" for k, v in UNREPRESENTABLE])
def test_import_refuses_what_the_adapters_cannot_represent(built, tmp_path, capsys, key, value):
    adapter = tmp_path / "adapter"
    shutil.copytree(built["root"] / "peft", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(dict(config, **{key: value})))
    out = tmp_path / "out"
    _refused(capsys, ["peft-to-mcore", "--adapter", str(adapter), "--base", str(built["root"] / "base"),
                      "--out", str(out)], out, key)


@pytest.mark.parallel
def test_refusals_of_adapter_checkpoints(built, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    root, out = built["root"], tmp_path / "out"
    # A tensor beyond the projections' adapters (peft on the embedding, say).
    adapter = tmp_path / "adapter"
    shutil.copytree(root / "peft", adapter)
    tensors = load_file(adapter / "adapter_model.safetensors")
    tensors["base_model.model.model.embed_tokens.lora_A.weight"] = torch.zeros(PEFT_R, VOCAB)
    save_file(tensors, adapter / "adapter_model.safetensors")
    _refused(capsys, ["peft-to-mcore", "--adapter", str(adapter), "--base", str(root / "base"), "--out", str(out)],
             out, "embed_tokens.lora_A")
    # An adapter of another model: the rank in the config differs from the tensors'.
    shutil.copytree(root / "peft", tmp_path / "rank")
    config = json.loads((tmp_path / "rank" / "adapter_config.json").read_text())
    (tmp_path / "rank" / "adapter_config.json").write_text(json.dumps(dict(config, r=8)))
    _refused(capsys, ["peft-to-mcore", "--adapter", str(tmp_path / "rank"), "--base", str(root / "base"),
                      "--out", str(out)], out, "lora_A.weight has shape [4, 128]")
    # An adapter-only checkpoint whose adapter_base.json is gone, and a full one given a --base.
    shutil.copytree(root / "adapters", tmp_path / "orphan")
    (tmp_path / "orphan" / "adapter_base.json").unlink()
    _refused(capsys, ["mcore-to-hf", "--ckpt", str(tmp_path / "orphan"), "--out", str(out)], out, "--base")
    _refused(capsys, ["mcore-to-hf", "--ckpt", str(root / "full"), "--base", str(root / "base"), "--out", str(out)],
             out, "drop --base")
    # Adapters the reward export would drop; no adapters to export as peft.
    _refused(capsys, ["mcore-to-hf", "--ckpt", str(root / "full"), "--task", "reward", "--out", str(out)], out,
             "LoRA adapters")
    _refused(capsys, ["mcore-to-peft", "--ckpt", str(root / "base"), "--out", str(out)], out, "no LoRA adapters")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--imported", type=Path, required=True)
    args = parser.parse_args()
    sys.exit(worker(args.workdir, args.base, args.imported))


@pytest.mark.parallel
@pytest.mark.usefixtures("single_rank")
def test_training_starts_its_adapters_from_an_imported_peft_adapter(built, tmp_path):
    """`peft.adapters_from` on an imported peft adapter: the training unit starts with exactly the imported adapters
    on its base (the import's adapter_base.json passes training's base check)."""
    from types import SimpleNamespace

    from megatron_qwen.checkpoint.io import read_full_state_dict, save_model
    from megatron_qwen.config import load_config
    from megatron_qwen.platform.runtime import Runtime
    from megatron_qwen.training.checkpointer import Checkpointer
    from megatron_qwen.training.units import build_unit

    root = built["root"]
    cfg = load_config(root / "imported" / "model_config.yaml",
                      ["parallel.tp=1", "parallel.pp=1", "parallel.vpp=1", "parallel.sp=false",
                       f"training.init_from={root / 'base'}", f"peft.adapters_from={root / 'imported'}"])
    said = []
    unit = build_unit(cfg, Runtime.cpu(), "policy")
    Checkpointer(SimpleNamespace(cfg=cfg, say=said.append)).init_from(unit, str(root / "base"),
                                                                      f"training.init_from={root / 'base'}")
    save_model(unit.chunks, tmp_path / "started")
    started, imported, base = (read_full_state_dict(p) for p in (tmp_path / "started", root / "imported",
                                                                  root / "base"))
    assert sorted(k for k in started if ".adapter." in k) == sorted(imported)
    assert all(torch.equal(started[k], imported[k] if ".adapter." in k else base[k]) for k in started)
    assert "peft.adapters_from" in said[-1], said


@pytest.mark.usefixtures("single_rank")
def test_a_qwen2_moe_peft_adapter_on_attention_dense_mlp_and_shared_expert(tmp_path):
    """peft's LoRA on a tiny transformers Qwen2-MoE with the usual targets adapts the attention, the dense layer's
    MLP and each MoE layer's shared expert (the routed experts are fused parameters there). Imported, the
    project's model gives peft's logits; exported again it is bit-identical; merged into the base it gives them
    in transformers."""
    from peft import LoraConfig, get_peft_model

    from megatron_qwen.config import load_config
    from megatron_qwen.convert import hf_to_mcore, mcore_to_hf
    from megatron_qwen.convert.lora import mcore_to_peft, peft_to_mcore
    from megatron_qwen.model.qwen import build_model
    from megatron_qwen.platform.runtime import Runtime
    from moe_reference import VOCAB as MOE_VOCAB
    from moe_reference import make_moe_model

    hf = make_moe_model("qwen2_moe", tmp_path / "hf")
    batch = torch.randint(0, MOE_VOCAB, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base_logits = hf(input_ids=batch).logits.float()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0,
                                         task_type="CAUSAL_LM"))
    adapted = {name.split(".lora_")[0] for name, _ in lora.named_parameters() if "lora_A" in name}
    assert any(".mlp.shared_expert.gate_proj" in name for name in adapted), sorted(adapted)
    assert any(".layers.1.mlp.down_proj" in name for name in adapted), sorted(adapted)  # the dense layer
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_" in name:  # peft starts B at zero: make every adapter count
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        peft_logits = lora.eval()(input_ids=batch).logits.float()
    assert (peft_logits - base_logits).abs().max() > 1e-2
    lora.save_pretrained(tmp_path / "peft")

    hf_to_mcore(tmp_path / "hf", tmp_path / "base", log=lambda _: None)
    peft_to_mcore(tmp_path / "peft", tmp_path / "base", tmp_path / "imported", log=lambda _: None)
    cfg = load_config(tmp_path / "imported" / "model_config.yaml")
    chunks = build_model(cfg, Runtime.cpu(), rope_at_positions=True, adapters=True)
    _load(chunks, tmp_path / "base", tmp_path / "imported")
    positions = torch.arange(batch.shape[1]).expand_as(batch)
    with torch.no_grad():
        own = chunks[0].eval()(batch, positions, None)[..., :MOE_VOCAB].float()
    diff = (own - peft_logits).abs().max().item()
    assert diff < ATOL, f"imported Qwen2-MoE adapter: max |logit difference| {diff:.3e} against peft"

    mcore_to_peft(tmp_path / "imported", tmp_path / "back", log=lambda _: None)
    original, back = safetensors_dir(tmp_path / "peft"), safetensors_dir(tmp_path / "back")
    assert back.keys() == original.keys()
    assert any(".shared_expert." in name for name in back)
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name

    mcore_to_hf(tmp_path / "imported", tmp_path / "merged", log=lambda _: None)
    with torch.no_grad():
        merged = load_hf(tmp_path / "merged")(input_ids=batch).logits.float()
    merged_diff = (merged - peft_logits).abs().max().item()
    assert merged_diff < ATOL, f"merged Qwen2-MoE export: max |logit difference| {merged_diff:.3e} against peft"
    print(f"Qwen2-MoE peft adapter (attention, dense MLP, shared expert): imported {diff:.2e}, merged export "
          f"{merged_diff:.2e} max |logit difference| against peft")
