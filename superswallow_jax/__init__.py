"""superswallow_jax: a memory-mapped, streaming LLM weight merger in JAX.

Data flows one way: config -> plan -> read -> merge -> write.

The public API, imported on first use (so that ``import superswallow_jax``
and ``superswallow --help`` stay fast)::

    cfg = superswallow_jax.load_config("configs/superswallow-tiny.yaml")
    superswallow_jax.run_merge(cfg, "out/", superswallow_jax.MergeOptions(seed=0))
    report = superswallow_jax.verify_folder(cfg, "out/")
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> module that defines it
_EXPORTS = {
    "MergeConfig": "config", "load_config": "config", "parse_config": "config",
    "MergeOptions": "options",
    "Plan": "plan", "Step": "plan", "build_plan": "plan",
    "MergeResult": "merge", "run_merge": "merge", "verify_stream": "merge",
    "Report": "verify", "verify_folder": "verify",
    "METHODS": "registry", "MethodSpec": "registry",
    "Checkpoint": "io.checkpoint", "HubAccess": "io.hub",
    "folder_digests": "manifest", "model_digest": "manifest",
    "make_tiny_models": "tiny",
    "SuperswallowError": "errors", "ConfigError": "errors", "ModelError": "errors", "PlanError": "errors",
    "OutputError": "errors", "SafetensorsError": "errors", "TokenizerError": "errors", "VerifyError": "errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'superswallow_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
