"""Old checkpoints are deleted off the critical path: rank 0 renames them at once and a thread removes
them, so a deletion that takes minutes at scale never keeps the other ranks waiting in a collective."""

from __future__ import annotations

import shutil
import threading

import pytest

pytestmark = pytest.mark.usefixtures("single_rank")


def test_old_checkpoints_go_in_the_background(tmp_path, monkeypatch):
    from megatron_qwen.checkpoint import directory as ckdir
    from megatron_qwen.config import load_config
    from megatron_qwen.platform.runtime import Runtime
    from megatron_qwen.checkpoint import io as checkpointing
    from megatron_qwen.training.units import build_unit

    unit = build_unit(load_config("configs/tiny.yaml", ["model.padded_vocab_size=256", "model.num_layers=1"]),
                      Runtime.cpu(), "m")
    release, deleted_by = threading.Event(), []
    rmtree = shutil.rmtree

    def slow_rmtree(path, *args, **kwargs):
        if str(path).endswith(checkpointing.DELETING_SUFFIX):  # a deletion, not the save's own clean-up
            deleted_by.append(threading.current_thread().name)
            assert release.wait(timeout=120)
        return rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", slow_rmtree)
    (tmp_path / "iter_0000000.deleting").mkdir()  # left behind by a deletion a crash interrupted
    for step in (1, 2):
        checkpointing.save_checkpoint(tmp_path, step, [unit], {}, keep_last=1)
    # Saving returned while the deletion is still blocked: step 1 is no checkpoint any more, step 2 is current.
    assert not release.is_set()
    assert ckdir.saved_checkpoints(tmp_path) == [tmp_path / "iter_0000002"]
    assert ckdir.latest_checkpoint(tmp_path) == tmp_path / "iter_0000002"
    assert (tmp_path / "iter_0000001.deleting").is_dir()
    release.set()
    checkpointing.finish_deletions()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000002", "latest"]
    assert deleted_by and set(deleted_by) == {"delete-old-checkpoints"}
