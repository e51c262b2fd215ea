"""Host-side numerics: float32 and float64 arithmetic on the CPU in the order torch
(or a chunk-independent definition) fixes, for the statistics the kernels need.

* :mod:`.scalar`: one Python or float32 scalar rounded as torch rounds it;
* :mod:`.blocks`: fixed 1024-element block sums (DARE's L1 rescale) and their total;
* :mod:`.histogram`: exact bit-pattern histograms of magnitudes (TIES, breadcrumbs);
* :mod:`.vecsum`: torch's float32 lane order for the norms of flat vectors;
* :mod:`.torch_sum`: torch's CPU ``sum(dim=0)`` (embedding padding means).

Nothing here is traced by JAX; :mod:`superswallow_jax.methods` holds the kernels.
"""
