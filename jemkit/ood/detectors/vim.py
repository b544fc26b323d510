"""Virtual-logit matching (ViM, Wang et al. 2022): the norm of a feature's residual outside the training features'
principal subspace, scaled to the logits and set against their energy, pytorch-ood's.

pytorch-ood's ViM fit holds ``z - u``, the logits ``[N, C]`` and the residuals ``[N, D - d]`` on the device at once
(pytorch-ood issues #9 and #93). jemkit accumulates the covariance of ``z - u`` in float64 row chunks, takes its
eigenvectors, computes ``alpha = mean max-logit / mean residual norm`` in a second chunked pass, and hands the
subspace and ``alpha`` to ``pytorch_ood.detector.ViM``, whose ``predict_features`` scores (negated: higher =
in-distribution).
"""

from __future__ import annotations

from typing import Any

import torch
from pytorch_ood.detector import ViM
from torch import Tensor

from jemkit.checks import check_integer
from jemkit.ood.detectors.base import CannotFitError, Head, PytorchOODDetector, chunks, register

__all__ = ["ViMDetector", "default_vim_dim"]

_STATE_KEYS = ("d", "w", "b", "principal_subspace", "alpha")


def default_vim_dim(num_features: int) -> int:
    """ViM's principal dimension ``d`` for features of size ``D``: the published settings where they exist, else half.

    Wang et al. (2022) use d = 1000 for D = 2048 (ResNet-50, BiT) and d = 512 for D = 768 (ViT); OpenOOD uses d = 256
    for CIFAR's ResNet-18 (D = 512). So: 1000 when D >= 1536, 512 when D >= 768, ``D // 2`` below (at least 1). The
    residual (the virtual logit) lives in the other ``D - d`` dimensions.
    """
    check_integer("num_features", num_features, 2)
    if num_features >= 1536:
        return 1000
    if num_features >= 768:
        return 512
    return max(1, num_features // 2)


def _binary_head(weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """A one-logit head ``g = w z + b`` (``weight [1, D]``, ``bias [1]``) as the two-logit head jemkit reads it
    (:func:`jemkit.classifier.class_logits`): logits ``[-g / 2, g / 2]``, so ViM's energy is the binary JEM's."""
    return torch.cat([-weight / 2, weight / 2]), torch.cat([-bias / 2, bias / 2])


def _unusable(dim: int, head: Head | None) -> str | None:
    """Why ``head`` cannot serve ViM on features of size ``dim`` (``None`` when it can)."""
    if head is None:
        return (
            "no last linear layer (head_weight) was given: ViM's virtual logit is matched against the head's "
            "logits W z + b (jemkit.ood.features.last_linear(model) gives the layer)"
        )
    weight, bias = head.weight, head.bias
    if weight.dim() != 2 or weight.shape[1] != dim:
        return (
            f"head_weight has shape {tuple(weight.shape)} but the features have D = {dim}: ViM needs the features "
            "the head receives (the default layer of jemkit.ood.features), not a named layer's"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        return f"head_bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)"
    if dim < 2:
        return f"features of size D = {dim} leave no residual space for ViM's virtual logit"
    return None


@register("vim")
class ViMDetector(PytorchOODDetector):
    """pytorch-ood's ViM fitted in chunks, against the classifier's last linear layer.

    Args:
        d: the principal dimension (``1 <= d < D``); default :func:`default_vim_dim`.
        chunk_size, device: those of :class:`~jemkit.ood.detectors.base.Detector`.

    A one-logit binary head (``weight [1, D]``) is read as jemkit reads it, the logits ``[-g/2, g/2]``.
    """

    title = "ViM"

    def __init__(self, d: int | None = None, chunk_size: int = 4096, device: torch.device | str | None = None) -> None:
        super().__init__(chunk_size, device)
        self.d = None if d is None else check_integer("d", d, 1)

    @torch.no_grad()
    def fit(self, z: Tensor, y: Tensor, head: Head | None = None) -> ViMDetector:
        """Fit on features ``z [N, D]`` and the last linear layer ``head`` (``W [C, D]``, ``b [C]``; ``C = 1``: a
        one-logit binary head); the labels ``y [N]`` are not used.

        Raises:
            CannotFitError: no head, a head of other features, or features with no residual outside the principal
                subspace.
            ValueError: ``d`` not below ``D``.
        """
        n, dim = z.shape
        reason = _unusable(dim, head)
        if reason is not None:
            raise CannotFitError(reason)
        device = self.device or z.device
        weight = head.weight.detach().float().to(device)
        bias = head.bias
        bias = torch.zeros(weight.shape[0], device=device) if bias is None else bias.detach().float().to(device)
        if weight.shape[0] == 1:
            weight, bias = _binary_head(weight, bias)
        d = default_vim_dim(dim) if self.d is None else self.d
        if d >= dim:
            raise ValueError(f"vim_dim={d} must be below the feature size D = {dim} (ViM's residual is D - d wide)")
        model = ViM(None, d=d, w=weight, b=bias)
        u = model.u.to(torch.float64)
        cov = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        for start in chunks(n, self.chunk_size):
            xc = z[start : start + self.chunk_size].to(device, torch.float64) - u
            cov.addmm_(xc.T, xc)
        _, eig_vecs = torch.linalg.eigh(cov / n)
        residual_basis = eig_vecs[:, : dim - d]  # eigh sorts ascending: the D - d least-varying directions
        max_logit_sum, residual_sum, norm_sum = 0.0, 0.0, 0.0
        for start in chunks(n, self.chunk_size):
            zc = z[start : start + self.chunk_size].to(device, torch.float64)
            logits = zc @ weight.double().T + bias.double()
            max_logit_sum += float(logits.max(1).values.sum())
            residual_sum += float(((zc - u) @ residual_basis).norm(dim=1).sum())
            norm_sum += float((zc - u).norm(dim=1).sum())
        if not residual_sum > 1e-6 * norm_sum:  # zero up to rounding: alpha would be noise over noise
            raise CannotFitError(
                f"the {n} training features have no residual outside ViM's {d}-dimensional principal subspace: "
                f"pass a smaller vim_dim"
            )
        model.principal_subspace = residual_basis.float().contiguous()
        model.alpha = max_logit_sum / residual_sum
        self.model = model
        return self

    def state_dict(self) -> dict[str, Any]:
        """``d``, the (two-logit) head ``w [C, D]``, ``b [C]``, ``principal_subspace [D, D - d]`` and ``alpha``."""
        if self.model is None:
            raise RuntimeError(f"{self._title()} state_dict called before fit")
        return {key: getattr(self.model, key) for key in _STATE_KEYS}

    def load_state_dict(self, state: dict[str, Any]) -> ViMDetector:
        model = ViM(None, d=state["d"], w=state["w"], b=state["b"])
        model.principal_subspace, model.alpha = state["principal_subspace"], state["alpha"]
        self.model = self._placed(model)
        return self
