"""Tokenizer merging and embedding alignment (``tokenizer_source`` / ``tokenizer:``).

Reproduces mergekit 0.1.5 running with transformers v5
(docs/mergekit-0.1.5-notes.md), without transformers or torch:

* :mod:`.load`: one input model's tokenizer (``tokenizer.json``, or a
  sentencepiece ``tokenizer.model`` through :mod:`.sentencepiece`);
* :mod:`.output`: the merged vocabulary and the files written for it;
* :mod:`.overrides`: ``tokenizer.tokens``;
* :mod:`.alignment`: embedding rows aligned to the output vocabulary, with
  torch's CPU arithmetic (:mod:`.torch_sum`).

Deviations from 0.1.5 (all in cases where 0.1.5 crashes or is random):
    * appended-token order is deterministic (above);
    * a token present in a model at an id ``>=`` that model's vocab size counts
      as absent (``-1``) where 0.1.5 raises ``KeyError``; likewise new
      ``tokenizer.tokens`` with ``source: base`` (0.1.5 mutates the base
      tokenizer and then raises);
    * for ``base`` output, special-token attributes of ``tokenizer_config.json``
      naming a stripped token are dropped, so the written files reload with
      exactly :attr:`OutputTokenizer.tokens` (0.1.5 keeps them and HF's
      reload then appends them beyond ``vocab_size``);
    * a tokenizer that fails to load is an error (0.1.5 assumes the base's).

Not reproduced: the exact bytes of transformers' ``save_pretrained`` output
(v5 adds a post-processor and rewrites ``tokenizer_config.json``; ours keeps
the source files' content with updated vocab/added tokens); mergekit runs
with embeddings on a GPU (different reduction order); torch builds whose
f32 vector width is not 8 lanes in the sum kernel (non-x86); ``hidden == 1``
padding means with several torch threads and ``>= 32768`` tokens.
"""

from .alignment import EmbeddingAlignment as EmbeddingAlignment, align_embeddings as align_embeddings
from .load import ModelTokenizer as ModelTokenizer, load_model_tokenizer as load_model_tokenizer
from .output import (
    OutputTokenizer as OutputTokenizer,
    build_output_tokenizer as build_output_tokenizer,
    tokenizer_files as tokenizer_files,
    write_tokenizer as write_tokenizer,
)
from .overrides import TokenOverride as TokenOverride, overrides_from_config as overrides_from_config
