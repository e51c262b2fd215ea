"""LoRA adapters: ``base+adapter`` model references streamed through a merge.

* :mod:`.reference`: the ``base+adapter`` reference form;
* :mod:`.config`: ``adapter_config.json`` (targets, ranks, scales, refused options);
* :mod:`.adapter`: an adapter folder's tensors, classified;
* :mod:`.adapted`: the merged model they describe, tensor by tensor (what PEFT's merge computes);
* :mod:`.kernel`: the device kernels; :mod:`.fetch`: chunks of adapted tensors for the streaming executor.
"""
