"""Counting the calls that make the host wait for the device.

On a GPU each of them drains the queue of launched kernels: the host stops feeding the device
until it catches up. On a CPU they cost nothing, which is why they creep into code tested only
there; :class:`HostSyncCounter` finds them on any device, by the function called: a tensor read
into Python (``item``, ``float()``, ``bool()`` as in ``if t.any():``, ``tolist``), an op whose
output shape depends on the data (``nonzero``, ``unique``, boolean-mask indexing,
``masked_select``), and copies to the host.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.overrides import TorchFunctionMode

_READS = {
    torch.Tensor.item: "item", torch.Tensor.tolist: "tolist",
    torch.Tensor.__bool__: "bool", torch.Tensor.__float__: "float",
    torch.Tensor.__int__: "int", torch.Tensor.__index__: "index",
}
_DATA_SHAPED = {
    torch.nonzero: "nonzero", torch.Tensor.nonzero: "nonzero",
    torch.argwhere: "nonzero", torch.Tensor.argwhere: "nonzero",
    torch.unique: "unique", torch.Tensor.unique: "unique",
    torch.unique_consecutive: "unique", torch.Tensor.unique_consecutive: "unique",
    torch.masked_select: "masked_select", torch.Tensor.masked_select: "masked_select",
}
_COPIES = {torch.Tensor.cpu: "cpu"}


def _is_bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


class HostSyncCounter(TorchFunctionMode):
    """``with HostSyncCounter() as c: ...`` then ``c.total`` and ``c.counts`` (by kind).

    ``torch.unique`` is counted once although it calls further torch functions inside.
    ``paused`` (a flag) stops counting, e.g. while a CPU data pipeline makes its batch."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.paused = False
        self._depth = 0

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = _READS.get(func) or _DATA_SHAPED.get(func) or _COPIES.get(func)
        if kind is None and func is torch.Tensor.__getitem__ and len(args) > 1 \
                and _is_bool_index(args[1]):
            kind = "bool_index"
        if kind is None and func in (torch.Tensor.to, torch.Tensor.copy_):
            kind = "to_host" if _to_host(func, args, kwargs) else None
        if kind is not None and self._depth == 0 and not self.paused:
            self.counts[kind] += 1
        self._depth += kind is not None
        try:
            return func(*args, **kwargs)
        finally:
            self._depth -= kind is not None


def _to_host(func, args, kwargs) -> bool:
    """A copy from an accelerator to the CPU (``t.to('cpu')``, ``cpu_t.copy_(cuda_t)``)."""
    if func is torch.Tensor.copy_:
        dst, src = args[0], args[1]
        return dst.device.type == "cpu" and src.device.type != "cpu"
    src = args[0]
    target = kwargs.get("device", args[1] if len(args) > 1 else None)
    if isinstance(target, (str, torch.device)):
        return src.device.type != "cpu" and torch.device(target).type == "cpu"
    return False
