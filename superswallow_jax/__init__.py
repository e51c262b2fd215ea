"""superswallow_jax: a memory-mapped, streaming LLM weight merger in JAX.

Data flows one way: config -> plan -> read -> merge -> write.
"""

__version__ = "0.1.0"
