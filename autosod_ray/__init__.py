"""autosod-ray: label-free salient-object masks for whole image datasets."""

__version__ = "0.1.0"
