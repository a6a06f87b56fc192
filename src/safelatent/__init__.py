"""safelatent — Stable Diffusion with theme adapters, always-on security layers and I2P measurement.

Fully offline: models are local paths; nothing is ever downloaded.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
