"""jemkit: turn any classifier into a Joint Energy-based Model (JEM) and train, sample, calibrate and score it.

Public API: everything in ``__all__``; other names may change between releases.
"""

from jemkit._version import __version__
from jemkit.callbacks import CalibrationMonitor, DivergenceGuard, OODMonitor, SampleGrid
from jemkit.checkpoint import AtomicCheckpointIO
from jemkit.classifier import select_logits
from jemkit.data import DigitsDataModule, GaussianMixtureDataModule
from jemkit.divergence import DivergenceError
from jemkit.energy import energy_matrix, joint_energy, log_px, log_py_given_x, marginal_energy
from jemkit.module import JEM
from jemkit.ood.detectors import POSTHOC_DETECTORS, PostHocDetectors
from jemkit.ood.features import FeatureHook, extract_features, last_linear
from jemkit.sampling import MALA, PYLD, SGLD, Chains, GaussianInit, InputDomain, ReplayBuffer, UniformInit

__all__ = [
    "JEM",
    "AtomicCheckpointIO",
    "CalibrationMonitor",
    "Chains",
    "DivergenceGuard",
    "FeatureHook",
    "OODMonitor",
    "POSTHOC_DETECTORS",
    "PostHocDetectors",
    "SampleGrid",
    "MALA",
    "PYLD",
    "SGLD",
    "DigitsDataModule",
    "DivergenceError",
    "GaussianInit",
    "GaussianMixtureDataModule",
    "InputDomain",
    "ReplayBuffer",
    "UniformInit",
    "__version__",
    "energy_matrix",
    "extract_features",
    "joint_energy",
    "last_linear",
    "log_px",
    "log_py_given_x",
    "marginal_energy",
    "select_logits",
]
