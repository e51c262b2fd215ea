"""The options of one merge, typed and frozen (:class:`MergeOptions`).

Each field says whether it changes the output bytes. The manifest records the
ones that do (:meth:`MergeOptions.recorded`), a rerun after a crash resumes
only when they are equal, and ``verify`` replays them. The others change
speed, memory or what is hashed, never a byte of the tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Callable

from .errors import ConfigError

__all__ = ["CliFlag", "MergeOptions"]


def _opt(default: Any, help: str, *, bytes_: bool = False, flag: str | None = None, cli_type: type | None = None,
         parse: Callable[[Any], Any] | None = None, cli_default: Any = None) -> Any:
    """A field with its help text, whether it changes bytes, and how the CLI spells it: ``flag``
    (default ``--<name>``), the value's type and default on the command line, and ``parse`` into the field's value."""
    return field(default=default, metadata={"help": help, "bytes": bytes_, "flag": flag, "cli_type": cli_type,
                                            "parse": parse, "cli_default": default if parse is None else cli_default})


def _size(text: str) -> int:
    from .io.writer import parse_size

    return parse_size(text)


def _dtype(name: str | None) -> str | None:
    from .dtypes import config_code

    if name is None:
        return None
    code = config_code(name)
    if code is None:
        raise ConfigError(f"--out-dtype: unsupported dtype {name!r} (use float32, float16 or bfloat16)")
    return code


@dataclass(frozen=True)
class CliFlag:
    """How one :class:`MergeOptions` field appears on the command line (the CLI makes its option from it)."""

    field: str
    flag: str  # "--seed"; a bool gets its "--no-" twin
    type: type
    default: Any  # on the command line
    help: str
    parse: Callable[[Any], Any] | None  # command-line value -> field value


@dataclass(frozen=True)
class MergeOptions:
    """How to run a merge (the config says what to merge)."""

    seed: int = _opt(0, "seed for random masks (DARE, DELLA); same seed, same bytes", bytes_=True)
    shard_size: int = _opt(5_000_000_000, "max bytes per output shard (decimal K/M/B suffixes)", bytes_=True,
                           cli_type=str, parse=_size, cli_default="5B")
    out_dtype: str | None = _opt(None, "dtype of the output tensors, overriding the config's out_dtype", bytes_=True,
                                 cli_type=str, parse=_dtype)
    force: bool = _opt(False, "replace the merge in a non-empty output folder (only the files a merge wrote are "
                              "removed) and start over instead of resuming")
    chunk_elems: int | None = _opt(None, "elements per chunk (memory knob; default 1M on the CPU, 4M on accelerators)",
                                   cli_type=int)
    pass_cache_bytes: int | None = _opt(
        None, "MB a multi-pass method (DARE, TIES, ...) may keep between passes instead of reading again (default 64 "
              "on the CPU; on accelerators an eighth of device memory, at most 4096; 0: none)",
        flag="--pass-cache-mb", cli_type=int, parse=lambda mb: None if mb is None else mb * (1 << 20))
    fsync: bool = _opt(True, "fsync output files before renaming them into place")
    digests: bool = _opt(True, "sha256 of inputs, output tensors and small files in merge_manifest.json")
    file_digests: bool = _opt(False, "also the sha256 of each weight shard file (one more pass over the output bytes)")
    hash_inputs: bool = _opt(True, "sha256 of the input files (cached; free for Hugging Face cache files; otherwise "
                                   "one more read of every input)", flag="--input-digests")
    io_threads: int | None = _opt(None, "threads reading input chunks, and threads hashing and writing output "
                                        "chunks (default: this process's cores but one, 1 to 8; the bytes never depend "
                                        "on it)", cli_type=int)

    def __post_init__(self) -> None:
        if type(self.seed) is not int or self.seed < 0:
            raise ConfigError(f"seed: must be a non-negative integer, got {self.seed!r}")
        if type(self.shard_size) is not int or self.shard_size <= 0:
            raise ConfigError(f"shard size: must be a positive number of bytes, got {self.shard_size!r}")
        if self.chunk_elems is not None and (type(self.chunk_elems) is not int or self.chunk_elems <= 0):
            raise ConfigError(f"chunk elements: must be a positive integer, got {self.chunk_elems!r}")
        if self.io_threads is not None and (type(self.io_threads) is not int or not 1 <= self.io_threads <= 256):
            raise ConfigError(f"io threads: must be an integer in [1, 256], got {self.io_threads!r}")
        if self.pass_cache_bytes is not None and self.pass_cache_bytes < 0:
            raise ConfigError(f"pass cache budget must be >= 0 bytes, got {self.pass_cache_bytes} (--pass-cache-mb)")

    @classmethod
    def cli_flags(cls) -> list[CliFlag]:
        """Every field as a command-line option, in declaration order."""
        out = []
        for f in fields(cls):
            m = f.metadata
            cli_type = m["cli_type"] or type(f.default)
            out.append(CliFlag(f.name, m["flag"] or "--" + f.name.replace("_", "-"), cli_type, m["cli_default"],
                               m["help"], m["parse"]))
        return out

    @classmethod
    def from_cli(cls, values: dict[str, Any]) -> "MergeOptions":
        """Options from command-line values by field name (each parsed as its flag says). Raises ConfigError."""
        kw = {}
        for flag in cls.cli_flags():
            if flag.field in values:
                v = values[flag.field]
                kw[flag.field] = flag.parse(v) if flag.parse is not None and v is not None else v
        return cls(**kw)

    def recorded(self) -> dict[str, Any]:
        """The fields that change the output bytes, by name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["bytes"]}
