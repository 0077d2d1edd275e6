"""Where a job's checkpoints go and come from: the resume point, initial weights, frozen models, periodic saves
and the files every save carries. Every stage (the skeleton in `training.loop`, PPO) uses one `Checkpointer`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from megatron_qwen.checkpoint import directory as ckdir
from megatron_qwen.checkpoint import io as checkpointing
from megatron_qwen.errors import CheckpointError
from megatron_qwen.training.context import RunContext
from megatron_qwen.training.units import ModelUnit


class Checkpointer:
    """Resume, initial and frozen weights, periodic saves and carried files of one job (`RunContext`)."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.carried_files: dict[str, str] = {}  # e.g. a converted model's hf_source.json, kept in every save

    def resume(self, units: list[ModelUnit]) -> dict | None:
        """Load the checkpoint the run continues from (any layout) into `units`; its loop state, or None."""
        ctx = self.ctx
        if ctx.resume_from is None:
            return None
        layout = dataclasses.asdict(ctx.layout)
        saved_layout = filled_layout(ctx.saved_state.get("layout"))
        check_expert_split(ctx.cfg.model.is_moe, (saved_layout or {}).get("ep", 1), layout["ep"], ctx.resume_from)
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
        """Start `unit` from the weights of checkpoint `path` (named `what` in messages)."""
        trust = self.ctx.cfg.training.trust_checkpoint
        started_fresh = checkpointing.load_weights(unit.modules, path, what, fresh=fresh, trust=trust)
        note = f" ({', '.join(started_fresh)} started fresh)" if started_fresh else ""
        self.ctx.say(f"initialised {unit.name} weights from {path}{note}")
        self.carry_from(Path(path))

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


def check_expert_split(moe: bool, saved_ep: int, ep: int, path) -> None:
    """CheckpointError for a MoE run resumed across EP = 1 and EP > 1: megatron-core gives the expert parameters an
    optimizer of their own only when EP > 1, so the saved optimizer state does not load across that change (it
    fails deep in megatron-core's state merge otherwise)."""
    if moe and (saved_ep > 1) != (ep > 1):
        raise CheckpointError(
            f"{path} was saved at parallel.ep={saved_ep} and this run has parallel.ep={ep}: the optimizer state of "
            "a mixture-of-experts model does not carry across EP = 1 and EP > 1 (the experts have an optimizer of "
            f"their own only when EP > 1); resume at an EP {'> 1' if saved_ep > 1 else 'of 1'}, or start a new run "
            f"from its weights with training.init_from={path}"
        )


def filled_layout(saved: dict | None) -> dict | None:
    """A saved layout with the sizes checkpoints written before context and expert parallelism lack (CP = EP = 1,
    ETP = TP), so that a resume at the same layout still restores its RNG streams."""
    if saved is None:
        return None
    return {"cp": 1, "ep": 1, "etp": saved.get("tp", 1), **saved}

