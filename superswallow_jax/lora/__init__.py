"""LoRA adapters in and out.

In: ``base+adapter`` model references, streamed through a merge (docs/lora.md):

* :mod:`.reference`: the ``base+adapter`` reference form;
* :mod:`.config`: ``adapter_config.json`` (targets, ranks, scales, refused options);
* :mod:`.adapter`: an adapter folder's tensors, classified;
* :mod:`.adapted`: the merged model they describe, tensor by tensor (what PEFT's merge computes);
* :mod:`.kernel`: the device kernels; :mod:`.fetch`: chunks of adapted tensors for the streaming executor.

Out: ``superswallow extract-lora``, a fine-tune minus its base as an adapter:

* :mod:`.extract_plan`: which tensors are factorised, saved whole or left out;
* :mod:`.svd`: truncated SVDs of a delta streamed by row blocks;
* :mod:`.extract`: the command: factors, report, the adapter folder.
"""
