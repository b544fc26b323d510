"""Sampling: Langevin samplers, their initial distributions and the persistent replay buffer."""

from jemkit.sampling.buffer import ReplayBuffer
from jemkit.sampling.chains import SOURCES, Chains
from jemkit.sampling.domain import InputDomain
from jemkit.sampling.init import GaussianInit, InitialDistribution, UniformInit
from jemkit.sampling.langevin import MALA, PYLD, SGLD, EnergyFn, FirstLayer, Sampler

__all__ = [
    "MALA",
    "PYLD",
    "Chains",
    "SGLD",
    "EnergyFn",
    "FirstLayer",
    "GaussianInit",
    "InitialDistribution",
    "InputDomain",
    "ReplayBuffer",
    "SOURCES",
    "Sampler",
    "UniformInit",
]
