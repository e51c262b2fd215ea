#!/usr/bin/env python3
"""Run mergekit-yaml with magnitude ties broken by superswallow's rule (parity checks only).

torch's sort/argsort/topk on CPU are unstable, so mergekit breaks ties among
equal magnitudes arbitrarily (ties, breadcrumbs*, della* ranks, sce top-k).
This wrapper redirects the `torch` that `mergekit.sparsify` and
`mergekit.merge_methods.sce` see to a proxy whose sorts order by descending
value, lowest index first among equals (a stable descending sort; ascending
orders are its reverse) -- superswallow's rule. Nothing else changes.

With ``MK_DET_BERNOULLI=<p0>`` the proxy's ``bernoulli(p)`` returns
``p >= p0`` instead of a random draw, to compare della merges without RNG;
run ours with the same substitution, e.g. a wrapper doing
``superswallow_jax.methods.sparsify.bernoulli_keep = lambda key, hi, lo, n, p: p >= p0``
before ``superswallow_jax.cli.app()``.

Run it with mergekit's interpreter, as ``--mergekit-bin`` of mergekit_parity.py::

    printf '#!/bin/sh\\nexec /work/oracle/venv/bin/python scripts/mergekit_tierule.py "$@"\\n' > /tmp/mk && chmod +x /tmp/mk
    .venv/bin/python scripts/mergekit_parity.py --mergekit-bin /tmp/mk --ours .venv/bin/superswallow ... CONFIG
"""

import os
import sys
import types

import torch

import mergekit.merge_methods.sce as sce_mod
import mergekit.sparsify as sp_mod


def _desc_order(x, dim=-1):
    return torch.sort(x, dim=dim, descending=True, stable=True).indices


class _Proxy(types.ModuleType):
    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def argsort(x, dim=-1, descending=False, **kw):
        o = _desc_order(x, dim)
        return o if descending else o.flip(dim)

    @staticmethod
    def sort(x, dim=-1, descending=False, **kw):
        o = _desc_order(x, dim)
        if not descending:
            o = o.flip(dim)
        return torch.return_types.sort((torch.gather(x, dim, o), o))

    @staticmethod
    def topk(x, k, dim=-1, largest=True, **kw):
        if not largest:
            raise NotImplementedError("topk(largest=False)")
        o = _desc_order(x, dim).narrow(dim, 0, k)
        return torch.return_types.topk((torch.gather(x, dim, o), o))

    if os.environ.get("MK_DET_BERNOULLI"):
        _p0 = float(os.environ["MK_DET_BERNOULLI"])

        @staticmethod
        def bernoulli(p, *a, **kw):
            return (p >= _Proxy._p0).to(p.dtype)


_proxy = _Proxy("torch_tierule")
sp_mod.torch = _proxy
sce_mod.torch = _proxy

from mergekit.scripts.run_yaml import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
