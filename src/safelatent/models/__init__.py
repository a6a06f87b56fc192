"""Offline model loading: diffusers folders, single-file LDM checkpoints, shipped configs and tokenizer."""
