"""A PEFT LoRA adapter folder: its config and the tensors of its weight file, validated, data read lazily.

The folder holds ``adapter_config.json`` and ``adapter_model.safetensors``
(or a zip-format ``adapter_model.bin``, read without torch). PEFT names each
saved tensor ``base_model.model.<module>.<what>``:

* ``lora_A.weight`` ``[r, in]`` and ``lora_B.weight`` ``[out, r]``: the factors
  of a linear (or GPT-2 ``Conv1D``) module;
* ``lora_embedding_A`` ``[r, vocab]`` and ``lora_embedding_B`` ``[dim, r]``: of an embedding;
* ``base_layer.weight``: the whole weight of a module carrying a LoRA, saved
  too (an embedding's, by default): it replaces the base's;
* ``<param>`` of a module in ``modules_to_save``: replaces the base's.

Anything else (a DoRA magnitude, a LoRA bias, an unknown name) is refused in
one line naming the tensor. Factors of a module the config does not target
are left out, as PEFT leaves them out, with a warning.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..dtypes import FLOAT_CODES
from ..errors import ModelError
from ..io.model_dir import check_inside
from ..io.reader import SafetensorsFile
from ..io.tensor_file import TensorFile, TensorInfo
from ..io.torch_zip import TorchFile
from .config import CONFIG_NAME, AdapterConfig, read_adapter_config

PREFIX = "base_model.model."
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
_FACTOR = re.compile(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)")
_REFUSED = {
    re.compile(r".+\.lora_magnitude_vector(\.weight)?"): "a DoRA magnitude (use_dora) is not supported",
    re.compile(r".+\.lora_[AB]\.bias"): "a LoRA bias (lora_bias) is not supported",
}


@dataclass(frozen=True)
class LoraFactors:
    """One module's LoRA: ``a`` ``[r, in]`` and ``b`` ``[out, r]`` (embeddings: ``[r, vocab]``, ``[dim, r]``)."""

    module: str
    a: TensorInfo
    b: TensorInfo
    embedding: bool

    @property
    def rank(self) -> int:
        return self.a.shape[0]


def _open_weights(folder: Path) -> TensorFile:
    for name in WEIGHT_NAMES:
        p = folder / name
        if p.is_file():
            check_inside(p, folder)
            return SafetensorsFile(p) if name.endswith(".safetensors") else TorchFile(p)
    raise ModelError(f"{folder}: no adapter weights (expected {' or '.join(WEIGHT_NAMES)})")


class Adapter:
    """A validated LoRA adapter: ``factors`` by module, ``saved`` replacement tensors by model tensor name."""

    def __init__(self, ref: str, folder: Path):
        self.ref, self.dir = ref, Path(folder)
        cfg_path = self.dir / CONFIG_NAME
        if cfg_path.is_file():
            check_inside(cfg_path, self.dir)
        self.config: AdapterConfig = read_adapter_config(self.dir)
        self.file = _open_weights(self.dir)
        self.factors: dict[str, LoraFactors] = {}
        self.saved: dict[str, TensorInfo] = {}
        self.warnings: list[str] = []
        self._classify()

    @property
    def files(self) -> list[Path]:
        """The adapter's files (config first), for digests."""
        return [self.dir / CONFIG_NAME, self.file.path]

    def _fail(self, key: str, msg: str) -> ModelError:
        return ModelError(f"{self.file.path}: tensor {key}: {msg}")

    def _classify(self) -> None:
        pending: dict[str, dict[str, TensorInfo]] = {}
        for key, info in self.file.tensors.items():
            if not key.startswith(PREFIX):
                raise self._fail(key, f"not a PEFT adapter tensor (names start with {PREFIX})")
            name = key[len(PREFIX):]
            for pat, why in _REFUSED.items():
                if pat.fullmatch(name):
                    raise self._fail(key, why)
            if info.dtype not in FLOAT_CODES:
                raise self._fail(key, f"dtype {info.dtype} is not a float type")
            m = _FACTOR.fullmatch(name)
            if m:
                letter = "A" if m.group(2) in ("lora_A.weight", "lora_embedding_A") else "B"
                pending.setdefault(m.group(1), {})[letter] = info
                continue
            self._replacement(key, name, info)
        for module, parts in pending.items():
            self._factors(module, parts)

    def _replacement(self, key: str, name: str, info: TensorInfo) -> None:
        """A whole tensor the merged model takes from the adapter (``base_layer`` or ``modules_to_save``)."""
        module, _, param = name.rpartition(".")
        if module.endswith(".base_layer"):
            module = module[: -len(".base_layer")]
            if not self.config.targets(module):
                self.warnings.append(f"{self.file.path}: {key}: module {module} is not a target of the adapter; left out")
                return
        elif not self.config.saved_module(module):
            raise self._fail(key, "neither a LoRA factor (lora_A/lora_B) nor a tensor of modules_to_save")
        self.saved[f"{module}.{param}"] = info

    def _factors(self, module: str, parts: dict[str, TensorInfo]) -> None:
        where = f"{PREFIX}{module}"
        if "A" not in parts or "B" not in parts:
            missing = "B" if "A" in parts else "A"
            raise ModelError(f"{self.file.path}: module {where}: lora_{missing} is missing")
        a, b = parts["A"], parts["B"]
        embedding = a.name.endswith("lora_embedding_A")
        if embedding != b.name.endswith("lora_embedding_B"):
            raise ModelError(f"{self.file.path}: module {where}: mixes linear and embedding factors")
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
            raise ModelError(f"{self.file.path}: module {where}: factors of shapes {list(a.shape)} and {list(b.shape)} "
                             "do not multiply (expected A [r, in], B [out, r])")
        if not self.config.targets(module):
            self.warnings.append(f"{self.file.path}: module {module} is not a target of the adapter; its LoRA is left out")
            return
        r, _ = self.config.rank_alpha(module)
        if a.shape[0] != r:
            raise ModelError(f"{self.file.path}: module {where}: rank {a.shape[0]} in the file, {r} in {CONFIG_NAME}")
        self.factors[module] = LoraFactors(module, a, b, embedding)

    def close(self) -> None:
        self.file.close()
