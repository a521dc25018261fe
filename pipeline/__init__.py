"""proseco-pipeline: training and sampling self-correcting masked diffusion LMs (ProSeCo)."""

__version__ = "0.1.0"
