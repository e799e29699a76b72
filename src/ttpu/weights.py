"""Hand a loaded torch module's weights to a backend one tensor at a time, releasing the
host copy of each as soon as the backend has its own.

transformers loads safetensors checkpoints as memory-mapped tensors: reading a weight
pulls its pages of the file into the process. Converting all weights and dropping the
torch module only at the end would hold the whole checkpoint twice (the mapped pages and
the backend's arrays). Here each tensor is replaced by a meta tensor (same shape and
dtype, no storage) right after conversion, and the file pages it was read from are
handed back to the kernel, so host memory peaks near one checkpoint plus one tensor.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from collections.abc import Callable
from functools import cache

import ml_dtypes
import numpy as np
import torch

MADV_DONTNEED = 4  # Linux: drop the pages; file-backed pages are re-read if touched


def host_view(tensor: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor without copying (bfloat16 as ml_dtypes' bfloat16)."""
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def host_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype :func:`host_view` gives tensors of ``dtype``."""
    return host_view(torch.empty(0, dtype=dtype)).dtype


def convert_weights(
    module: torch.nn.Module,
    tensors: dict[str, torch.Tensor],
    convert: Callable[[str, np.ndarray], object],
    release: bool,
) -> dict[str, object]:
    """``{name: convert(name, host_array)}`` for each of ``tensors`` (the module's weights).

    ``convert`` must have copied what it needs when it returns. ``release``: right after
    each conversion, every reference the module holds to that tensor becomes a meta
    tensor, the entry leaves ``tensors``, and the checkpoint file pages it was read from
    are given back to the kernel (for modules ttpu loaded itself; a module the caller
    passed in keeps its weights)."""
    owners: dict[int, list[tuple[torch.nn.Module, str]]] = {}
    checkpoints = _checkpoint_mappings() if release else []
    if release:
        named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
        for name, tensor in named:
            path, _, attribute = name.rpartition(".")
            owners.setdefault(id(tensor), []).append((module.get_submodule(path), attribute))
    converted = {}
    for name in list(tensors):
        tensor = tensors.pop(name) if release else tensors[name]
        converted[name] = convert(name, host_view(tensor))
        if release:
            _to_meta(tensor, owners.get(id(tensor), []))
            _release_file_pages(tensor, checkpoints)
    return converted


def _to_meta(tensor: torch.Tensor, owners: list[tuple[torch.nn.Module, str]]) -> None:
    """Replace ``tensor`` by one meta tensor wherever it is registered (tied weights stay
    tied)."""
    meta = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
    if isinstance(tensor, torch.nn.Parameter):
        meta = torch.nn.Parameter(meta, requires_grad=tensor.requires_grad)
    for owner, attribute in owners:
        registry = owner._parameters if attribute in owner._parameters else owner._buffers
        registry[attribute] = meta


def _release_file_pages(tensor: torch.Tensor, checkpoints: list[tuple[int, int]]) -> None:
    """Give back the whole pages of ``tensor``'s storage if they lie in one of
    ``checkpoints``, the private mappings of ``.safetensors`` files (how transformers
    memory-maps checkpoints). Read
    again, such pages come back from the file; the tensor has been copied and replaced
    by then, so nothing reads them. Anonymous memory is never touched here (the garbage
    collector frees it once the tensor is dropped)."""
    storage = tensor.untyped_storage()
    start, size = storage.data_ptr(), storage.nbytes()
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, (start + size) // page * page
    if last > first and any(low <= first and last <= high for low, high in checkpoints):
        _libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_DONTNEED)


def _checkpoint_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process' private mappings of ``.safetensors`` files (read
    once per conversion: the checkpoint stays mapped while its tensors are converted)."""
    if not sys.platform.startswith("linux"):
        return []
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) > 5 and fields[1].endswith("p") and fields[5].endswith(".safetensors"):
                low, high = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((low, high))
    return ranges


@cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc
