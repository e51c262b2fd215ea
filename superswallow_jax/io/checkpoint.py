"""The weights of one model folder, in whichever published form they come.

Chosen as transformers chooses (safetensors first):

1. ``model.safetensors.index.json`` and its shards, else ``model.safetensors``,
   else every ``*.safetensors`` file (but shards named ``*-0000k-of-0000N``
   without their index are an incomplete set: refused);
2. ``pytorch_model.bin.index.json`` and its shards, else ``pytorch_model.bin``
   (zip-format ``torch.save`` files, read by :mod:`.torch_zip`).

Other ``*.bin`` files (``training_args.bin``, ...) are never opened. A folder
with none of these names the weight files it did find and what is supported.
An index must agree with the files exactly: every shard present and a plain
file name, every tensor stored in the shard the index names, and no tensor
missing from the index or stored twice.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection

import numpy as np

from ..errors import SafetensorsError
from .reader import INDEX_NAME, SINGLE_NAME, SafetensorsFile
from .tensor_file import TensorFile, TensorInfo
from .model_dir import check_inside
from .torch_zip import TorchFile

__all__ = ["BIN_INDEX_NAME", "BIN_SINGLE_NAME", "Checkpoint", "MAX_INDEX_BYTES", "WeightChoice", "choose_weights",
           "read_index"]

BIN_INDEX_NAME = "pytorch_model.bin.index.json"
BIN_SINGLE_NAME = "pytorch_model.bin"
MAX_INDEX_BYTES = 64 << 20

#: Hugging Face's shard names, ``<prefix>-00001-of-00005.safetensors``: only valid with their index.
_SHARD = re.compile(r".+-\d{5}-of-\d{5}\.safetensors")
#: Weight files we recognise but cannot read, by how their names end.
_UNSUPPORTED = (".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".pkl", ".npz", ".onnx")


class Checkpoint:
    """All weights of one model folder (single file or sharded, safetensors or ``.bin``).

    ``tensors`` maps each tensor name to its :class:`TensorInfo`; ``format``
    is ``"safetensors"`` or ``"pytorch"``. Headers (or pickles) are read and
    validated eagerly (cheap); data is read lazily through :meth:`file`.
    """

    def __init__(self, model_dir: Path):
        self.model_dir = Path(model_dir)
        self._files: dict[Path, TensorFile] = {}
        self.tensors: dict[str, TensorInfo] = {}
        d = self.model_dir
        for name in (INDEX_NAME, SINGLE_NAME, BIN_INDEX_NAME, BIN_SINGLE_NAME):
            if (d / name).is_file():
                check_inside(d / name, d)
        names = [p.name for p in d.iterdir() if p.is_file()] if d.is_dir() else []
        choice = choose_weights(names, str(d))
        if choice is None:
            raise SafetensorsError(_no_weights_message(d))
        self.format = choice.format
        open_file = SafetensorsFile if choice.format == "safetensors" else TorchFile
        if choice.index is not None:
            self._load_index(d / choice.index, open_file)
        else:
            for name in choice.files:
                self._add_file(open_file(d / name))

    def _add_file(self, f: TensorFile) -> None:
        check_inside(f.path, self.model_dir)
        self._files[f.path] = f
        for name, info in f.tensors.items():
            if name in self.tensors:
                raise SafetensorsError(f"{f.path}: tensor {name!r} also in {self.tensors[name].path}")
            self.tensors[name] = info

    def _load_index(self, index: Path, open_file: Callable[[Path], TensorFile]) -> None:
        wmap = read_index(index)
        for shard in sorted(set(wmap.values())):
            p = self.model_dir / shard
            if not p.is_file():
                raise SafetensorsError(f"{index}: shard {shard} listed in the index is missing")
            check_inside(p, self.model_dir)
            self._add_file(open_file(p))
        for name, shard in wmap.items():
            info = self.tensors.get(name)
            if info is None:
                raise SafetensorsError(f"{index}: tensor {name!r} is listed in the index but missing from {shard}")
            if info.path.name != shard:
                raise SafetensorsError(
                    f"{index}: tensor {name!r} is mapped to {shard} but stored in {info.path.name}"
                )
        extra = sorted(set(self.tensors) - set(wmap))
        if extra:
            raise SafetensorsError(f"{index}: tensor {extra[0]!r} in {self.tensors[extra[0]].path.name} is missing from the index")

    @property
    def files(self) -> list[Path]:
        return sorted(self._files)

    def file(self, info: TensorInfo) -> TensorFile:
        return self._files[info.path]

    def view(self, name: str) -> np.ndarray:
        """Zero-copy view of tensor ``name``."""
        info = self.tensors[name]
        return self._files[info.path].view(name)

    def close(self) -> None:
        for f in self._files.values():
            f.close()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class WeightChoice:
    """Which files of a model hold its weights (chosen by name, see the module docstring).

    ``format``: ``"safetensors"`` or ``"pytorch"``. ``index``: the index file
    whose ``weight_map`` names the shards, or None; ``files``: the weight files
    when there is no index (sorted), else empty.
    """

    format: str
    index: str | None
    files: tuple[str, ...]


def choose_weights(names: Collection[str], where: str) -> WeightChoice | None:
    """The weight files among a model's top-level file ``names``, as the reader picks them; None if none.

    The same rule serves a folder on disk and a repo's file list before a
    download. Shards named ``*-0000k-of-0000N.safetensors`` without their index
    are refused (SafetensorsError naming ``where``): the set is incomplete.
    """
    names = set(names)
    if INDEX_NAME in names:
        return WeightChoice("safetensors", INDEX_NAME, ())
    if SINGLE_NAME in names:
        return WeightChoice("safetensors", None, (SINGLE_NAME,))
    loose = sorted(n for n in names if n.endswith(".safetensors"))
    if loose:
        shards = [n for n in loose if _SHARD.fullmatch(n)]
        if shards:
            raise SafetensorsError(
                f"{where}: {len(shards)} shard files named like {shards[0]} but no {INDEX_NAME}; "
                "the shard set is incomplete (an interrupted copy or merge?)")
        return WeightChoice("safetensors", None, tuple(loose))
    if BIN_INDEX_NAME in names:
        return WeightChoice("pytorch", BIN_INDEX_NAME, ())
    if BIN_SINGLE_NAME in names:
        return WeightChoice("pytorch", None, (BIN_SINGLE_NAME,))
    return None


def read_index(index: Path) -> dict[str, str]:
    """The ``weight_map`` of an index file (tensor name -> shard file name), checked:
    a JSON object within :data:`MAX_INDEX_BYTES` whose shards are plain file names."""
    try:
        if index.stat().st_size > MAX_INDEX_BYTES:
            raise SafetensorsError(f"{index}: larger than the {MAX_INDEX_BYTES}-byte limit for an index")
        obj = json.loads(index.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:
        raise SafetensorsError(f"{index}: not valid JSON ({type(e).__name__})") from None
    except OSError as e:
        raise SafetensorsError(f"{index}: cannot read: {e.strerror or e}") from None
    wmap = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(wmap, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wmap.items()):
        raise SafetensorsError(f"{index}: 'weight_map' must map tensor names to file names")
    for shard in sorted(set(wmap.values())):
        if Path(shard).name != shard or shard in (".", ".."):
            raise SafetensorsError(f"{index}: shard name {shard!r} must be a plain file name")
    return wmap


def _no_weights_message(d: Path) -> str:
    if not d.is_dir():
        return f"{d}: not a folder"
    seen = sorted(p.name for p in d.iterdir() if p.name.endswith(_UNSUPPORTED) and p.is_file())
    supported = (f"{INDEX_NAME}, {SINGLE_NAME}, *.safetensors, {BIN_INDEX_NAME} or {BIN_SINGLE_NAME} "
                 "(zip-format torch.save)")
    if not seen:
        return f"{d}: no weights found; expected {supported}"
    shown = ", ".join(seen[:5]) + (f" and {len(seen) - 5} more" if len(seen) > 5 else "")
    return f"{d}: found {shown}, which is not a supported weight format; expected {supported}"
