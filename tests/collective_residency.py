"""Where each tensor handed to a collective would live on a GPU run, tracked on CPU ranks.

On GPUs megatron-core's groups (and the group of all ranks) are NCCL's, which refuses host tensors; on CPU ranks
every group is gloo's and every tensor is a CPU tensor, so a host tensor given to a collective goes unnoticed.
Here a run's tensors carry the residency they would have on GPUs:

- `ResidencyMode` (a TorchFunctionMode) marks a tensor *host* when it is born there: ``.cpu()``, ``.to("cpu")``,
  a factory or conversion (``torch.tensor``, ``torch.from_numpy``, ``torch.zeros``) without a device, or an op
  whose tensor inputs are all host tensors. Every other tensor is *device*: the model's parameters, factories
  given the run's device, ``.to(runtime.device)``, results of ops that read a device tensor. In-place ops keep
  their tensor's residency.
- The run's device is `RUN_DEVICE`, ``cpu:0``: a factory or ``.to()`` naming it makes a device tensor, and a
  device tensor's ``.device`` answers it (so ``x.to(param.device)`` moves to the device), while ``cpu`` names the
  host. `route_cpu_harness_to_run_device` makes megatron-core's ``torch.cuda.current_device()`` and its literal
  ``device="cuda"`` factories (which the CPU harness sends to the CPU) give it too.
- `CollectiveRecorder` wraps torch.distributed's tensor collectives and records, per call, the operation, whether
  its group would be NCCL's (every group but those megatron-core creates with ``backend="gloo"``), the host
  tensors it was given and the project or megatron-core function that called it. The object collectives
  (``all_gather_object`` ...) pick their tensors' device from the group themselves and are left out, with the
  collectives they make inside.
"""

from __future__ import annotations

import inspect
import threading
import traceback

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

RUN_DEVICE = torch.device("cpu", 0)
_HOST = "_born_on_host"  # attribute set on tensors that would live in host memory on a GPU run
_DEVICE_GETTER = torch.Tensor.device.__get__


def is_host(tensor: torch.Tensor) -> bool:
    return getattr(tensor, _HOST, False)


def _device_residency(device) -> bool | None:
    """True (host), False (device) or None (not a device) for a device argument."""
    if isinstance(device, str):
        device = torch.device(device)
    if isinstance(device, torch.device):
        return device.type == "cpu" and device.index is None
    if isinstance(device, int) and not isinstance(device, bool):
        return False  # a CUDA ordinal
    return None


def _is_inplace(name: str) -> bool:
    return name == "__setitem__" or name.startswith("__i") or (name.endswith("_") and not name.endswith("__"))


class ResidencyMode(TorchFunctionMode):
    """Marks every tensor made while active with the residency it would have on a GPU run (module docstring).
    ``torch.from_numpy`` does not pass through torch-function modes: it is wrapped while the mode is active."""

    def __enter__(self):
        self._from_numpy = torch.from_numpy

        def host_from_numpy(array):
            tensor = self._from_numpy(array)
            setattr(tensor, _HOST, True)
            return tensor

        torch.from_numpy = host_from_numpy
        return super().__enter__()

    def __exit__(self, *exc):
        torch.from_numpy = self._from_numpy
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.type or getattr(func, "__name__", "") == "type":
            # torch dispatches to the current Tensor.type, which the CPU harness may have replaced by a function that
            # calls back here: answer with the original, which the harness's function then renames itself.
            return torch._C.TensorBase.type(*args, **kwargs)
        out = func(*args, **kwargs)
        if func == _DEVICE_GETTER:
            return out if is_host(args[0]) else RUN_DEVICE
        host = self._residency(func, args, kwargs)
        if host is None:
            return out
        inputs = {id(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        leaves, spec = tree_flatten(out)
        changed = False
        for i, leaf in enumerate(leaves):
            if not isinstance(leaf, torch.Tensor) or is_host(leaf) == host:
                continue
            if id(leaf) in inputs:  # e.g. .to() of a tensor already there returns it: mark an alias, not the input
                leaf = leaves[i] = leaf.view_as(leaf)
                changed = True
            if host:
                setattr(leaf, _HOST, True)
            elif is_host(leaf):
                delattr(leaf, _HOST)
        if changed:
            return tree_unflatten(leaves, spec)
        return out

    @staticmethod
    def _residency(func, args, kwargs) -> bool | None:
        """Whether `func`'s tensor results are host tensors (None: leave them as they are)."""
        name = getattr(func, "__name__", "")
        if name == "cpu":
            return True
        if name == "cuda":
            return False
        if _is_inplace(name):
            return None
        if name == "to":
            for arg in (*args[1:], kwargs.get("device"), kwargs.get("other")):
                if isinstance(arg, torch.Tensor):
                    return is_host(arg)
                target = _device_residency(arg)
                if target is not None:
                    return target
        elif kwargs.get("device") is not None:
            return _device_residency(kwargs["device"])
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if not tensors:
            return True  # a factory or a conversion from Python or numpy without a device
        return all(is_host(t) for t in tensors)


def route_cpu_harness_to_run_device() -> None:
    """Make the CPU harness give megatron-core's CUDA allocations `RUN_DEVICE` instead of ``cpu`` (call before
    the harness is applied): what megatron-core puts on the GPU counts as device memory."""
    from megatron_qwen.platform import cpu

    cpu._cpu_current_device = lambda: RUN_DEVICE

    def wrap(factory):
        def run_device_factory(*args, **kwargs):
            if cpu._is_cuda(kwargs.get("device")):
                kwargs["device"] = RUN_DEVICE
            return factory(*args, **kwargs)

        return run_device_factory

    cpu._CpuFactoryTorch._wrap = staticmethod(wrap)


COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "_all_gather_base", "reduce_scatter",
               "reduce_scatter_tensor", "_reduce_scatter_base", "all_to_all_single", "reduce", "send", "recv", "isend",
               "irecv")
OBJECT_COLLECTIVES = ("all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list")


class CollectiveRecorder:
    """Wraps torch.distributed's collectives (install before megatron-core is imported: some of its modules bind
    them at import) and records every call; see the module docstring."""

    def __init__(self):
        self.calls: list[dict] = []
        self.gloo_groups: list = []
        self._inside_object_collective = threading.local()

    def install(self) -> None:
        import torch.distributed as dist
        from torch.distributed import distributed_c10d as c10d

        for name in COLLECTIVES:
            wrapped = self._recording(name, getattr(c10d, name))
            setattr(c10d, name, wrapped)
            setattr(dist, name, wrapped)
        for name in OBJECT_COLLECTIVES:
            wrapped = self._excluding(getattr(c10d, name))
            setattr(c10d, name, wrapped)
            setattr(dist, name, wrapped)
        new_group = c10d.new_group

        def recording_new_group(*args, **kwargs):
            group = new_group(*args, **kwargs)
            backend = inspect.signature(new_group).bind(*args, **kwargs).arguments.get("backend")
            if backend is not None and str(backend).lower() == "gloo":
                self.gloo_groups.append(group)
            return group

        c10d.new_group = dist.new_group = recording_new_group

    def _excluding(self, fn):
        def object_collective(*args, **kwargs):
            depth = getattr(self._inside_object_collective, "depth", 0)
            self._inside_object_collective.depth = depth + 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._inside_object_collective.depth = depth

        return object_collective

    def _recording(self, name: str, fn):
        signature = inspect.signature(fn)

        def collective(*args, **kwargs):
            if not getattr(self._inside_object_collective, "depth", 0):
                bound = signature.bind(*args, **kwargs).arguments
                group = bound.get("group")
                tensors = [t for t in tree_flatten([v for k, v in bound.items() if k != "group"])[0]
                           if isinstance(t, torch.Tensor)]
                self.calls.append({
                    "op": name,
                    "nccl_on_gpus": not any(group is g for g in self.gloo_groups),
                    "tensors": len(tensors),
                    "host_tensors": [list(t.shape) for t in tensors if is_host(t)],
                    "caller": _caller(),
                })
            return fn(*args, **kwargs)

        return collective


def _caller() -> str:
    """The innermost project or megatron-core function on the stack: ``package/file.py:function``."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        for root in ("megatron_qwen/", "megatron/core/"):
            if root in frame.filename:
                return f"{root}{frame.filename.split(root, 1)[1]}:{frame.name}"
    return "?"
