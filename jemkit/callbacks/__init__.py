"""Lightning callbacks that read a JEM as a generative model: sample grids (more in later modules)."""

from jemkit.callbacks.samples import SampleGrid

__all__ = ["SampleGrid"]
