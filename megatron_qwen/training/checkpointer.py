"""Where a job's checkpoints go and come from: the resume point, initial weights, frozen models, periodic saves
and the files every save carries. Every stage (the skeleton in `training.loop`, PPO) uses one `Checkpointer`.

A unit trained with low-rank adapters (``peft.method``) saves its adapters alone; its base weights come from the
checkpoint its config key names (``training.init_from``, ``ppo.policy_from``), recorded with its fingerprint in
every save's ``adapter_base.json`` (`megatron_qwen.checkpoint.adapters`). A resume loads that base first (the
config key, when set, overrides the recorded path; a base with another fingerprint is refused), then the adapters
and their optimizer state. ``peft.adapters_from`` starts the adapters from an adapter checkpoint.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from megatron_qwen.checkpoint import directory as ckdir
from megatron_qwen.checkpoint import io as checkpointing
from megatron_qwen.checkpoint.adapters import (ADAPTER_BASE_FILE, adapter_base_record, base_fingerprint, check_base,
                                               is_adapter_key, read_adapter_base)
from megatron_qwen.errors import CheckpointError
from megatron_qwen.training.context import RunContext
from megatron_qwen.training.units import ModelUnit


class Checkpointer:
    """Resume, initial and frozen weights, periodic saves and carried files of one job (`RunContext`)."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.carried_files: dict[str, str] = {}  # e.g. a converted model's hf_source.json, kept in every save

    def resume(self, units: list[ModelUnit], bases: dict[str, tuple[str, str | None]] | None = None) -> dict | None:
        """Load the checkpoint the run continues from (any layout) into `units`; its loop state, or None.

        `bases`: for each unit with adapters, (config key, path or None) of its base checkpoint; a path overrides
        the one the checkpoint's ``adapter_base.json`` records."""
        ctx = self.ctx
        if ctx.resume_from is None:
            return None
        for unit in units:
            if unit.adapters:
                key, path = (bases or {}).get(unit.name, ("training.init_from", None))
                self._resume_base(unit, key, path)
        layout = dataclasses.asdict(ctx.layout)
        saved_layout = filled_layout(ctx.saved_state.get("layout"))
        # RNG streams are per rank: they are restored only at the layout that wrote them.
        saved = checkpointing.load_checkpoint(ctx.resume_from, units, restore_rng=saved_layout == layout,
                                              trust=ctx.cfg.training.trust_checkpoint)
        change = "" if saved_layout == layout else f"; layout changed from {saved_layout} to {layout}"
        consumed = ", ".join(f"{v} {k.removeprefix('consumed_').replace('_', ' ')} consumed"
                             for k, v in saved.items() if k.startswith("consumed_"))
        ctx.say(f"resumed from {ctx.resume_from} at step {saved['step']} ({consumed}){change}")
        self.carry_from(ctx.resume_from)
        return saved

    def init_from(self, unit: ModelUnit, path: str, what: str, fresh: tuple[str, ...] = ()) -> None:
        """Start `unit` from the weights of checkpoint `path` (named `what` in messages). A unit with adapters takes
        its base from there, and its adapters from ``peft.adapters_from`` when set, else from `path` when it holds
        some (a full save of a model with adapters), else fresh."""
        trust = self.ctx.cfg.training.trust_checkpoint
        if not unit.adapters:
            started_fresh = checkpointing.load_weights(unit.modules, path, what, fresh=fresh, trust=trust)
            note = f" ({', '.join(started_fresh)} started fresh)" if started_fresh else ""
            self.ctx.say(f"initialised {unit.name} weights from {path}{note}")
            self.carry_from(Path(path))
            return
        record = read_adapter_base(path) if ckdir.is_checkpoint(path) else None
        if record is not None:
            raise CheckpointError(
                f"{what} holds adapters alone (its base is {record['base']}): set {what.split('=')[0]}="
                f"{record['base']} and peft.adapters_from={path}"
            )
        started_fresh = checkpointing.load_weights(unit.modules, path, what, fresh=fresh, trust=trust,
                                                   optional=is_adapter_key)
        fingerprint = self._record_base(path)
        adapters_from = self.ctx.cfg.peft.adapters_from
        if adapters_from:
            self.load_adapters(unit, adapters_from, path, fingerprint, what.split("=")[0])
            note = f"; adapters from peft.adapters_from={adapters_from}"
        else:
            fresh_adapters = any(is_adapter_key(name) for name in started_fresh)
            note = "; adapters started fresh" if fresh_adapters else f"; adapters from {path}"
        self.ctx.say(f"initialised the base weights of {unit.name} from {path}{note}")
        self.carry_from(Path(path))

    def load_adapters(self, unit: ModelUnit, path: str, base: str, fingerprint: str, base_key: str) -> None:
        """Load `unit`'s adapters from adapter checkpoint `path` (``peft.adapters_from``), refused when it records
        another base than `base` (fingerprint `fingerprint`, named by config key `base_key`)."""
        what = f"peft.adapters_from={path}"
        ckdir.require_checkpoint(path, what)
        record = read_adapter_base(path)
        if record is not None:
            check_base(path, record, base, fingerprint, base_key)
        checkpointing.load_weights(unit.modules, path, what, trust=self.ctx.cfg.training.trust_checkpoint,
                                   select=is_adapter_key)

    def _record_base(self, path: str, fingerprint: str | None = None) -> str:
        """Name checkpoint `path` (fingerprint `fingerprint`, computed when not given) as the adapters' base in every
        save; returns its fingerprint."""
        if fingerprint is None:
            fingerprint = base_fingerprint(path, self.ctx.cfg.training.trust_checkpoint)
        self.carried_files[ADAPTER_BASE_FILE] = adapter_base_record(Path(path).resolve(), fingerprint)
        return fingerprint

    def _resume_base(self, unit: ModelUnit, key: str, path: str | None) -> None:
        """Load the base weights of adapter unit `unit` before its adapters are resumed (see the module docstring)."""
        resume_from = self.ctx.resume_from
        record = read_adapter_base(resume_from)
        if record is None:
            raise CheckpointError(
                f"{resume_from} has no {ADAPTER_BASE_FILE}: it was not saved by a run with adapters, so this run "
                f"(peft.method={self.ctx.cfg.peft.method}) cannot resume from it; start from its weights with "
                f"{key}={resume_from} in a new run directory"
            )
        base = path or record["base"]
        what = f"{key}={base}" if path else f"the base {base} recorded in {resume_from / ADAPTER_BASE_FILE}"
        fingerprint = checkpointing.load_adapter_base(unit.modules, resume_from, record, base, what, key,
                                                      self.ctx.cfg.training.trust_checkpoint)
        self._record_base(base, fingerprint)
        self.ctx.say(f"loaded the base weights of {unit.name} from {base}")
        self.carry_from(Path(base))

    def load_frozen(self, unit: ModelUnit, path: str, what: str, offload: bool) -> None:
        """Load a frozen unit's weights from `path` (every start and resume: frozen models are never saved), then
        move it off the device until it is used when `offload`."""
        checkpointing.load_weights(unit.modules, path, what, trust=self.ctx.cfg.training.trust_checkpoint)
        if offload:
            unit.offload()
        self.ctx.say(f"loaded the frozen {unit.name} model from {path}")

    def carry_from(self, path: Path) -> None:
        # A model converted from Hugging Face records its source vocabulary; exports after training need it.
        source = path / ckdir.HF_SOURCE_FILE
        if source.is_file():
            self.carried_files[source.name] = source.read_text()

    def save(self, step: int, units: list[ModelUnit], train_state: dict) -> None:
        """Write checkpoint `step` of the trained `units` with the loop state (atomic: temporary name, rename,
        then ``latest``)."""
        ctx, t = self.ctx, self.ctx.cfg.training
        train_state = dict(train_state, layout=dataclasses.asdict(ctx.layout), config=ctx.cfg.to_dict())
        files = {ckdir.MODEL_CONFIG_FILE: yaml.safe_dump(ctx.cfg.to_dict(), sort_keys=False), **self.carried_files}
        path = checkpointing.save_checkpoint(ctx.save_dir, step, units, train_state, t.keep_last, files,
                                             ctx.faults.before_commit)
        ctx.say(f"saved checkpoint {path}")


def filled_layout(saved: dict | None) -> dict | None:
    """A saved layout with the sizes checkpoints written before context and expert parallelism lack (CP = EP = 1,
    ETP = TP), so that a resume at the same layout still restores its RNG streams."""
    if saved is None:
        return None
    return {"cp": 1, "ep": 1, "etp": saved.get("tp", 1), **saved}

