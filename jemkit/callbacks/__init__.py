"""Lightning callbacks that read a JEM as a generative model and a calibrated classifier."""

from jemkit.callbacks.calibration import CalibrationMonitor
from jemkit.callbacks.divergence import DivergenceGuard
from jemkit.callbacks.generative import GenerativeMonitor
from jemkit.callbacks.ood import OODMonitor
from jemkit.callbacks.progress import ProgressLines
from jemkit.callbacks.samples import SampleGrid

__all__ = ["CalibrationMonitor", "DivergenceGuard", "GenerativeMonitor", "OODMonitor", "ProgressLines", "SampleGrid"]
