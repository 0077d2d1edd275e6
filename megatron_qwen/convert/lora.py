"""LoRA adapters in conversion: merged into a Hugging Face export, written as a `peft` adapter, and a `peft` adapter
read into an adapter-only checkpoint.

An adapter on a Hugging Face projection (q, k, v, o, gate, up, down) changes its weight by
``(alpha / rank) * B @ A`` (A [rank, in], B [out, rank]), `peft`'s definition. A checkpoint stores A and B at
their full shapes under ``<linear>.adapter.<part>.lora_a`` / ``.lora_b`` (`megatron_qwen.model.lora`), rows and
columns already in Hugging Face order, so neither direction regroups them: q/k/v's products are added to
q_proj/k_proj/v_proj after the converter has split linear_qkv, gate/up's to gate_proj/up_proj.

Adapters come in a full checkpoint (a model built with adapters, saved whole: base weights and adapters) or an
adapter-only one (the adapter tensors alone, its base checkpoint named in ``adapter_base.json``); either's
``model_config.yaml`` carries the ``peft`` section (rank, alpha, dropout, targets). A `peft` adapter directory is
``adapter_config.json`` + ``adapter_model.safetensors`` with names
``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`` ... (A = lora_A, B = lora_B).

Adapters sit on every layer's attention and on the MLP of dense layers; in a Qwen2-MoE layer the MLP targets adapt
the shared expert, named here as in transformers (``shared_expert.gate_proj``: peft's
``mlp.shared_expert.gate_proj``, the checkpoint's ``mlp.shared_experts.linear_fc1.adapter.gate``). The routed
experts take none.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Callable

import torch
import yaml

from megatron_qwen.checkpoint import directory as ckdir
from megatron_qwen.checkpoint.adapters import (ADAPTER_BASE_FILE, adapter_base_record, base_fingerprint,
                                               is_adapter_key, read_adapter_base)
from megatron_qwen.checkpoint.dcp_io import Chunk, read_chunks, tensor_metadata, write_checkpoint
from megatron_qwen.config import LORA_PROJECTIONS, ModelConfig, PeftConfig, load_config, validate
from megatron_qwen.convert import mcore_keys as K
from megatron_qwen.convert.hf_io import (
    PlannedTensor,
    read_safetensors_header,
    read_safetensors_tensor,
    write_safetensors,
)
from megatron_qwen.convert.mcore_layout import stored_layout
from megatron_qwen.errors import CheckpointError, ConfigError, ConversionError
from megatron_qwen.model.lora import PART

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
# The logical (stacked) checkpoint key of each megatron-core linear that holds adapted projections.
LINEAR_KEYS = {"linear_qkv": "decoder.layers.self_attention.linear_qkv",
               "linear_proj": "decoder.layers.self_attention.linear_proj",
               "linear_fc1": "decoder.layers.mlp.linear_fc1", "linear_fc2": "decoder.layers.mlp.linear_fc2"}
# A MoE layer's shared expert: its projections are named "shared_expert.gate_proj" ... (transformers' module path
# under the layer's mlp), its checkpoint keys lie under mlp.shared_experts.
SHARED = "shared_expert."
_PROJECTION_OF_PART = {part: hf for hf, part in PART.items()}
_ADAPTER_KEY = re.compile(r".*\.adapter\.(\w+)\.lora_([ab])")
_HF_WEIGHT = re.compile(r"model\.layers\.(\d+)\.(?:self_attn|mlp)\.((?:shared_expert\.)?\w+_proj)\.weight")

# adapter_config.json keys whose value must be plain LoRA's: (what other values mean, the values accepted).
_PLAIN_LORA = {
    "peft_type": ("another adapter type than LoRA", ("LORA",)),
    "task_type": ("a task other than causal language modelling", (None, "CAUSAL_LM")),
    "use_rslora": ("rank-stabilised scaling, alpha / sqrt(r)", (False, None)),
    "use_dora": ("DoRA's magnitude vectors", (False, None)),
    "bias": ("trained biases", ("none", None)),
    "lora_bias": ("a bias on lora_B", (False, None)),
    "fan_in_fan_out": ("transposed (Conv1D) weights", (False, None)),
    "rank_pattern": ("per-module ranks", ({}, None)),
    "alpha_pattern": ("per-module alphas", ({}, None)),
    "modules_to_save": ("fully trained modules beside the adapters", (None, [])),
    "layers_to_transform": ("adapters on some layers only", (None, [])),
    "layer_replication": ("replicated layers", (None, [])),
    "target_parameters": ("adapters on parameters (fused experts)", (None, [])),
    "trainable_token_indices": ("trained token embeddings", (None, [], {})),
    "alora_invocation_tokens": ("activated LoRA", (None, [])),
    "use_qalora": ("quantisation-aware pooling of the input", (False, None)),
}


def adapter_key(projection: str, matrix: str) -> str:
    """The logical (stacked) checkpoint key of `projection`'s (Hugging Face name, ``shared_expert.`` in front for
    a MoE layer's shared expert) A (`matrix` "a") or B ("b")."""
    hf = projection.removeprefix(SHARED)
    linear = LINEAR_KEYS[LORA_PROJECTIONS[hf]]
    if projection.startswith(SHARED):
        linear = linear.replace(".mlp.", ".mlp.shared_experts.")
    return f"{linear}.adapter.{PART[hf]}.lora_{matrix}"


def projection_of(logical_key: str) -> tuple[str, str]:
    """(projection, "a" or "b") of a logical adapter checkpoint key (the inverse of `adapter_key`)."""
    part, matrix = _ADAPTER_KEY.fullmatch(logical_key).groups()
    shared = SHARED if ".shared_experts." in logical_key else ""
    return shared + _PROJECTION_OF_PART[part], matrix


def peft_name(projection: str, layer: int, matrix: str) -> str:
    """`peft`'s tensor name of `projection`'s A ("a") or B ("b") in layer `layer`."""
    module = "self_attn" if projection in ATTENTION else "mlp"
    return f"base_model.model.model.layers.{layer}.{module}.{projection}.lora_{matrix.upper()}.weight"


def adapter_shapes(m: ModelConfig, peft: PeftConfig) -> dict[tuple[str, int, str], tuple[int, int]]:
    """(projection, layer, "a" or "b") -> full shape of every adapter matrix of model `m` with `peft`'s settings:
    every layer's attention, the MLPs of dense layers and the shared expert of mixture-of-experts layers (whose
    projections are named ``shared_expert.gate_proj`` ...; the routed experts take none)."""
    H, d = m.hidden_size, m.head_dim
    q, kv = m.num_attention_heads * d, m.kv_heads * d
    attention = {"q_proj": (H, q), "k_proj": (H, kv), "v_proj": (H, kv), "o_proj": (q, H)}

    def mlp(F: int) -> dict:
        return {"gate_proj": (H, F), "up_proj": (H, F), "down_proj": (F, H)}

    out = {}
    for layer in range(m.num_layers):
        if not m.moe_layers[layer]:
            fans = {**attention, **mlp(m.ffn_hidden_size)}
        elif m.moe_shared_expert_ffn_hidden_size:
            fans = {**attention, **{SHARED + hf: fan for hf, fan in mlp(m.moe_shared_expert_ffn_hidden_size).items()}}
        else:
            fans = attention
        for projection in peft.projections():
            for name in (projection, SHARED + projection):
                if name in fans:
                    fan_in, fan_out = fans[name]
                    out[(name, layer, "a")] = (peft.rank, fan_in)
                    out[(name, layer, "b")] = (fan_out, peft.rank)
    return out


def stored_adapter_shapes(m: ModelConfig, peft: PeftConfig) -> dict[str, tuple]:
    """The adapter tensors a checkpoint of `m` stores, by global key: stacked over the layers, or per layer for a
    mixture-of-experts model (as the base weights, `megatron_qwen.convert.mcore_keys`)."""
    out = {}
    for (projection, layer, matrix), shape in adapter_shapes(m, peft).items():
        key = adapter_key(projection, matrix)
        if m.is_moe:
            out[K.layer_key(key, layer)] = shape
        else:
            out[key] = (m.num_layers, *shape)
    return out


def read_peft_section(ckpt: Path, config_path: str | os.PathLike | None = None) -> PeftConfig:
    """The ``peft`` section of a checkpoint's ``model_config.yaml`` (or of `config_path`)."""
    file = Path(config_path) if config_path is not None else ckpt / ckdir.MODEL_CONFIG_FILE
    try:
        return load_config(file).peft
    except ConfigError as exc:
        raise ConversionError(f"{file}: {exc}") from exc


@dataclasses.dataclass
class Adapters:
    """The LoRA adapters a checkpoint holds: their settings and a reader of their matrices."""

    ckpt: Path
    peft: PeftConfig
    m: ModelConfig
    stored: dict  # adapter key -> StoredInfo
    full: bool  # the checkpoint also holds the base weights
    trust: bool = False

    @property
    def scale(self) -> float:
        return self.peft.alpha / self.peft.rank

    def matrix(self, projection: str, layer: int, matrix: str) -> torch.Tensor:
        """`projection`'s A ("a") or B ("b") in layer `layer`, at its full shape, as stored."""
        key = adapter_key(projection, matrix)
        if key not in self.stored:  # stored per layer (a mixture-of-experts model)
            key = K.layer_key(key, layer)
            info = self.stored[key]
            return read_chunks(self.ckpt, {key: ((0, 0), info.shape, info.dtype)}, self.trust)[key]
        info = self.stored[key]
        block = read_chunks(self.ckpt, {key: ((layer, 0, 0), (1, *info.shape[1:]), info.dtype)}, self.trust)[key]
        return block[0]

    def merge(self, weight: torch.Tensor, projection: str, layer: int) -> torch.Tensor:
        """``weight + (alpha / rank) * B @ A`` in `weight`'s dtype, summed in at least fp32."""
        acc = torch.promote_types(weight.dtype, torch.float32)
        a, b = self.matrix(projection, layer, "a").to(acc), self.matrix(projection, layer, "b").to(acc)
        return (weight.to(acc) + self.scale * (b @ a)).to(weight.dtype)


def open_adapters(ckpt: Path, config_path: str | os.PathLike | None = None, trust: bool = False,
                  stored: dict | None = None) -> Adapters | None:
    """The adapters of checkpoint `ckpt` (None when it has none), checked against its config's model and ``peft``
    sections: every targeted projection of every adapted layer present at its shape, nothing else."""
    stored = tensor_metadata(ckpt, trust) if stored is None else stored
    found = {key: info for key, info in stored.items() if is_adapter_key(key)}
    if not found:
        return None
    config_file = Path(config_path) if config_path is not None else ckpt / ckdir.MODEL_CONFIG_FILE
    m = ckdir.read_model_config(ckpt, config_path)
    peft = read_peft_section(ckpt, config_path)
    if peft.method != "lora":
        raise ConversionError(
            f"--ckpt {ckpt} holds LoRA adapters ({next(iter(found))}), but {config_file} has peft.method="
            f"{peft.method!r}, so their rank, alpha and targets are unknown; pass the config they were trained with "
            "(--config)"
        )
    expected = stored_adapter_shapes(m, peft)
    settings = f"peft.rank={peft.rank}, peft.target={peft.target} of {config_file}"
    for key, shape in expected.items():
        if key not in found:
            raise ConversionError(f"--ckpt {ckpt} has no adapter tensor {key}, which {settings} needs; pass the "
                                  "config the adapters were trained with (--config)")
        if tuple(found[key].shape) != shape:
            raise ConversionError(f"--ckpt {ckpt}: adapter tensor {key} has shape {list(found[key].shape)}, but "
                                  f"{settings} needs {list(shape)}; pass the config the adapters were trained with")
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        raise ConversionError(f"--ckpt {ckpt} holds adapter tensor {unexpected[0]}, which {settings} does not "
                              "have; exporting would drop it: pass the config the adapters were trained with")
    full = any(not is_adapter_key(key) for key in stored)
    return Adapters(ckpt, peft, m, found, full, trust)


def base_checkpoint(adapters: Adapters, base: str | os.PathLike | None = None) -> Path:
    """The checkpoint holding the base weights of `adapters`: their own for a full checkpoint, else `base` or the
    one ``adapter_base.json`` names."""
    ckpt = adapters.ckpt
    if adapters.full:
        if base is not None:
            raise ConversionError(f"--base {base}: --ckpt {ckpt} holds its base weights beside the adapters; drop "
                                  "--base (it names the base of an adapter-only checkpoint)")
        return ckpt
    if base is None:
        try:
            record = read_adapter_base(ckpt)
        except CheckpointError as exc:
            raise ConversionError(f"{exc}; or pass the base with --base CKPT") from None
        if record is None:
            raise ConversionError(f"--ckpt {ckpt} holds adapters only and has no {ADAPTER_BASE_FILE} naming its "
                                  "base checkpoint; pass the base with --base CKPT")
        base = record["base"]
        what = f"{ckpt / ADAPTER_BASE_FILE}'s base {base}"
    else:
        what = f"--base {base}"
    if not ckdir.is_checkpoint(base):
        raise ConversionError(f"{what} is not a megatron-core checkpoint (no {ckdir.COMPLETE_MARKER}); pass the base "
                              "checkpoint the adapters were trained on with --base CKPT")
    if any(is_adapter_key(key) for key in tensor_metadata(base, adapters.trust)):
        raise ConversionError(f"{what} holds adapters itself; name a checkpoint of the base model alone")
    return Path(base)


def merged(tensors: list[PlannedTensor], adapters: Adapters) -> list[PlannedTensor]:
    """`tensors` (a transformers Qwen layout's, `megatron_qwen.convert.to_hf.plan_tensors`) with every adapter
    merged into its projection's weight, one weight at a time."""
    shapes = adapter_shapes(adapters.m, adapters.peft)
    out, done = [], 0
    for tensor in tensors:
        match = _HF_WEIGHT.fullmatch(tensor.name)
        if match and (match.group(2), int(match.group(1)), "a") in shapes:
            tensor = dataclasses.replace(tensor, blocks=_merged_blocks(tensor, adapters, match.group(2),
                                                                        int(match.group(1))))
            done += 1
        out.append(tensor)
    if done * 2 != len(shapes):
        raise AssertionError(f"merged {done} adapters of {len(shapes) // 2}: the layout's names changed")
    return out


def _merged_blocks(tensor: PlannedTensor, adapters: Adapters, projection: str, layer: int):
    def blocks():
        weight = torch.cat(list(tensor.blocks()))
        return iter([adapters.merge(weight, projection, layer)])

    return blocks


def peft_config_json(peft: PeftConfig, base_model: str | None) -> dict:
    """`peft`'s adapter_config.json (LoraConfig's fields) for the project's adapter settings `peft`."""
    alpha = int(peft.alpha) if float(peft.alpha).is_integer() else peft.alpha
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": peft.rank, "lora_alpha": alpha, "lora_dropout": peft.dropout, "target_modules": peft.projections(),
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "lora_bias": False,
        "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
        "layers_pattern": None, "init_lora_weights": True, "inference_mode": True, "revision": None,
    }


def _new_directory(out: Path, write: Callable[[Path], None]) -> None:
    """Run `write` into ``OUT.tmp`` and rename it to `out` when complete; nothing is left behind on failure."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def mcore_to_peft(
    ckpt: str | os.PathLike,
    out: str | os.PathLike,
    base_model: str | None = None,
    config_path: str | os.PathLike | None = None,
    log: Callable[[str], None] = print,
    trust_checkpoint: bool = False,
) -> Path:
    """Write the adapters of checkpoint `ckpt` (full or adapter-only, saved at any layout) as a `peft` adapter
    directory `out`: adapter_config.json and adapter_model.safetensors, the tensors as stored.
    `base_model` goes into adapter_config.json's base_model_name_or_path (the exported base's directory or hub
    name). `out` must not exist; it appears only when complete."""
    out = Path(out)
    if out.exists():
        raise ConversionError(f"--out {out} already exists; choose a new directory or remove it first")
    ckpt = ckdir.require_checkpoint(ckpt, f"--ckpt {ckpt}")
    adapters = open_adapters(ckpt, config_path, trust_checkpoint)
    if adapters is None:
        raise ConversionError(f"--ckpt {ckpt} holds no LoRA adapters (no tensor key contains '.adapter.'); export "
                              "the model itself with mcore-to-hf")
    tensors = [
        PlannedTensor(peft_name(projection, layer, matrix), shape, adapters.stored[_stored_key(adapters, projection,
                                                                                               layer, matrix)].dtype,
                      lambda p=projection, i=layer, x=matrix: iter([adapters.matrix(p, i, x)]))
        for (projection, layer, matrix), shape in adapter_shapes(adapters.m, adapters.peft).items()
    ]

    def write(tmp: Path) -> None:
        write_safetensors(tmp, tensors, sys.maxsize, single_name=PEFT_WEIGHTS_FILE)  # peft reads one file
        config = peft_config_json(adapters.peft, base_model)
        (tmp / PEFT_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")

    _new_directory(out, write)
    peft = adapters.peft
    log(f"wrote {out}: peft LoRA adapter, r={peft.rank}, lora_alpha={peft.alpha}, target_modules "
        f"{peft.projections()}, {len(tensors)} tensors, {sum(t.nbytes for t in tensors) / 2**20:.2f} MiB")
    return out


def _stored_key(adapters: Adapters, projection: str, layer: int, matrix: str) -> str:
    key = adapter_key(projection, matrix)
    return key if key in adapters.stored else K.layer_key(key, layer)


def peft_settings(config: dict, where: str) -> PeftConfig:
    """The project's adapter settings of a `peft` adapter_config.json; refuses what plain per-projection LoRA
    with one rank and alpha cannot represent, naming the key."""
    for key, (meaning, accepted) in _PLAIN_LORA.items():
        if key in config and config[key] not in accepted:
            raise ConversionError(
                f"{where}: {key}={config[key]!r} ({meaning}) cannot be represented by this project's adapters "
                f"(LoRA with one rank and alpha for every projection, scale lora_alpha / r, no bias; {key} must be "
                f"{' or '.join(map(repr, accepted))}); merge the adapter into its base with peft's merge_and_unload() "
                "and convert the merged model with hf-to-mcore"
            )
    targets = config.get("target_modules")
    if isinstance(targets, str) or not targets:
        raise ConversionError(
            f"{where}: target_modules={targets!r}: name the adapted projections as a list of "
            f"{', '.join(LORA_PROJECTIONS)} (a regular expression or 'all-linear' is not read)"
        )
    unknown = sorted(set(targets) - set(LORA_PROJECTIONS))
    if unknown:
        raise ConversionError(
            f"{where}: target_modules has {', '.join(map(repr, unknown))}: the project's adapters go on "
            f"{', '.join(LORA_PROJECTIONS)} only; merge the adapter with peft's merge_and_unload() and convert the "
            "merged model with hf-to-mcore"
        )
    rank, alpha, dropout = config.get("r"), config.get("lora_alpha"), config.get("lora_dropout") or 0.0
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ConversionError(f"{where}: r={rank!r} and lora_alpha={alpha!r} must be a whole number >= 1 and a "
                              "number > 0")
    target = [hf for hf in LORA_PROJECTIONS if hf in targets]
    return PeftConfig(method="lora", rank=rank, alpha=float(alpha), dropout=float(dropout), target=target)


def peft_to_mcore(
    adapter_dir: str | os.PathLike,
    base: str | os.PathLike,
    out: str | os.PathLike,
    tp: int = 1,
    pp: int = 1,
    vpp: int = 1,
    ep: int = 1,
    log: Callable[[str], None] = print,
    trust_checkpoint: bool = False,
) -> Path:
    """Convert the `peft` LoRA adapter in `adapter_dir` (adapter_config.json + adapter_model.safetensors, as
    peft's save_pretrained writes) for the model of checkpoint `base` into an adapter-only checkpoint `out`.

    `out` holds the adapter tensors (loadable at any layout), model_config.yaml (`base`'s config with the
    ``peft`` section from adapter_config.json and the layout `tp`, `pp`, `vpp`, `ep`, checked against the model)
    and adapter_base.json naming `base`. What the project's adapters cannot represent is refused before anything
    is written. `out` must not exist; it appears only when complete.
    """
    adapter_dir, out = Path(adapter_dir), Path(out)
    if out.exists():
        raise ConversionError(f"--out {out} already exists; choose a new directory or remove it first")
    config_file, weights = adapter_dir / PEFT_CONFIG_FILE, adapter_dir / PEFT_WEIGHTS_FILE
    if not config_file.is_file():
        raise ConversionError(f"--adapter {adapter_dir}: no {PEFT_CONFIG_FILE}; point it at the directory peft's "
                              "save_pretrained wrote")
    if not weights.is_file():
        raise ConversionError(f"--adapter {adapter_dir}: no {PEFT_WEIGHTS_FILE}; save the adapter with peft's "
                              "save_pretrained(..., safe_serialization=True)")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConversionError(f"{config_file}: not valid JSON ({exc})") from exc
    peft = peft_settings(config, str(config_file))
    base = ckdir.require_checkpoint(base, f"--base {base}")
    try:
        cfg = load_config(base / ckdir.MODEL_CONFIG_FILE)
    except ConfigError as exc:
        raise ConversionError(f"--base {base}: {base / ckdir.MODEL_CONFIG_FILE}: {exc}") from exc
    base_stored = tensor_metadata(base, trust_checkpoint)
    if not any(K.split_layer_key(key)[0] == K.QKV_WEIGHT for key in base_stored):
        raise ConversionError(f"--base {base} holds no base weights ({K.QKV_WEIGHT}); name the checkpoint of the "
                              "model the adapter was trained on")
    cfg = dataclasses.replace(cfg, peft=peft,
                              parallel=dataclasses.replace(cfg.parallel, tp=tp, pp=pp, vpp=vpp, ep=ep))
    errors, _ = validate(cfg)
    if errors:
        raise ConversionError(f"layout --tp {tp} --pp {pp} --vpp {vpp} --ep {ep} with the adapter's settings does not "
                              "fit the model: " + "; ".join(errors))
    tensors = read_safetensors_header(weights)
    expected = {peft_name(p, i, x): shape for (p, i, x), shape in adapter_shapes(cfg.model, peft).items()}
    m = cfg.model
    described = (f"{m.num_layers} layers, hidden_size={m.hidden_size}, {m.num_attention_heads} heads "
                 f"({m.kv_heads} key/value) of {m.head_dim}, intermediate_size={m.ffn_hidden_size}, r={peft.rank}")
    for name, shape in expected.items():
        if name not in tensors:
            raise ConversionError(f"{weights} has no tensor {name}, which target_modules {peft.target} of the model "
                                  f"of --base {base} ({described}) needs; it is an adapter of another model")
        if tensors[name].shape != shape:
            raise ConversionError(f"{weights}: tensor {name} has shape {list(tensors[name].shape)}, but the model of "
                                  f"--base {base} ({described}) needs {list(shape)}; it is an adapter of another model")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise ConversionError(
            f"{weights} holds {unexpected[0]} ({len(unexpected)} tensor(s) beyond the projections' adapters); the "
            "project's adapters cover the attention of every layer, dense MLPs and shared experts only (not routed "
            "experts, embeddings or the output layer): merge the adapter with peft's merge_and_unload() and convert "
            "the merged model with hf-to-mcore"
        )
    chunks = []
    for piece in stored_layout(cfg, adapters=True)[0]:
        if not is_adapter_key(piece.key):
            continue
        logical, layer = K.split_layer_key(piece.key)
        layer = piece.offsets[0] if layer is None else layer
        projection, matrix = projection_of(logical)
        name = peft_name(projection, layer, matrix)
        dtypes = {tensors[peft_name(projection, i, matrix)].dtype for i in range(m.num_layers)
                  if peft_name(projection, i, matrix) in tensors}
        if len(dtypes) > 1:
            raise ConversionError(f"{weights}: the layers' {projection}.lora_{matrix.upper()} tensors have "
                                  f"different dtypes ({sorted(map(str, dtypes))}); save the adapter in one dtype")
        chunks.append(Chunk(piece.key, piece.global_shape, piece.offsets, piece.sizes, tensors[name].dtype,
                            lambda info=tensors[name], name=name, sizes=piece.sizes:
                            read_safetensors_tensor(info, name).reshape(sizes)))

    fingerprint = base_fingerprint(base, trust_checkpoint)  # what training checks the base against

    def write(tmp: Path) -> None:
        write_checkpoint(tmp, chunks, {})
        (tmp / ckdir.MODEL_CONFIG_FILE).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        (tmp / ADAPTER_BASE_FILE).write_text(adapter_base_record(Path(base).resolve(), fingerprint))

    _new_directory(out, write)
    log(f"wrote {out}: LoRA adapters r={peft.rank}, alpha={peft.alpha}, target {peft.target} on base {base}, for "
        f"--tp {tp} --pp {pp} --vpp {vpp} --ep {ep}")
    return out


__all__ = ["ADAPTER_BASE_FILE", "Adapters", "PEFT_CONFIG_FILE", "PEFT_WEIGHTS_FILE", "adapter_key",
           "adapter_shapes", "base_checkpoint", "mcore_to_peft", "merged", "open_adapters", "peft_name",
           "peft_settings", "peft_to_mcore", "projection_of"]
