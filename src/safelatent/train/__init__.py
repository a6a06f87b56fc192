"""Training: theme adapters (LoRA, Hu et al. 2021, arXiv 2106.09685) from an image + caption folder.

``safelatent.train.lora.train_lora(LoraTrainConfig(...))`` is the entry point (the CLI's
``safelatent train lora`` is a thin shell over it). Modules: :mod:`.config` (settings, TOML, validation),
:mod:`.data` (folder scan, buckets, crops, caches), :mod:`.losses` (the diffusion objective),
:mod:`.checkpoint` (exact resume), :mod:`.export` (diffusers and kohya files), :mod:`.logs`.

This package imports nothing heavy at import time: :mod:`safelatent.toy.train` uses :mod:`.losses`.
"""
