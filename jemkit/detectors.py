"""Post-hoc OOD detectors on a classifier's features: what a user gets without training, to set a JEM beside.

The detectors are pytorch-ood's own (``pytorch_ood.detector``): Mahalanobis (Lee et al. 2018), relative Mahalanobis
(RMD, Ren et al. 2021), KNN (Sun et al. 2022) and ViM (Wang et al. 2022). jemkit does not re-implement their scoring;
it calls ``predict_features`` and flips the sign, because pytorch-ood scores are *higher for outliers* and jemkit's
(:mod:`jemkit.scores`) are **higher for in-distribution inputs**.

Why the fitting is jemkit's: pytorch-ood's ``fit_features`` moves the whole ``[N, D]`` feature matrix to the
detector's device and works on it at once: RMD's background covariance materialises ``z - mean`` twice, ViM's fit
holds ``z - u``, the logits ``[N, C]`` and the residuals ``[N, D - d]`` together (pytorch-ood issues #9 and #93). On
ImageNet-1k features (1.28M x 2048, 10.5 GB in float32) that is about 30 GB at once on the device. Here the same
statistics (class means, the shared within-class scatter, the background scatter, ViM's covariance and alpha) are
accumulated over row chunks in float64 on ``device`` while ``z`` stays where it is (the CPU, where
:func:`jemkit.features.extract_features` leaves it), then handed to pytorch-ood's detector as its fitted state: memory
``O(chunk_size * D + D^2 + C * D)`` beyond ``z``.
The scores equal those of pytorch-ood's plain fit (tested to float32 rounding).

Example::

    >>> z, y = extract_features(classifier, train_loader)
    >>> head = last_linear(classifier)
    >>> detectors = PostHocDetectors().fit(z, y, head.weight, head.bias)
    >>> scores = detectors.score(z_test)  # {"mahalanobis": [M], "rmd": [M], "knn": [M], "vim": [M]}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pytorch_ood.detector import KNN, RMD, Mahalanobis, ViM
from torch import Tensor

from jemkit.checks import check_integer

__all__ = ["POSTHOC_DETECTORS", "PostHocDetectors", "default_knn_k", "default_vim_dim"]

POSTHOC_DETECTORS: tuple[str, ...] = ("mahalanobis", "rmd", "knn", "vim")

_RIDGE = 1e-6  # pytorch-ood's ridge on the (unnormalised) scatter matrices: kept so that scores equal its own fit's


_FITTED_STATE: dict[str, tuple[str, ...]] = {
    # the attributes a fitted pytorch-ood detector keeps, as state_dict stores them (KNN: its scikit-learn bank)
    "mahalanobis": ("mu", "cov", "precision"),
    "rmd": ("mu", "cov", "precision", "background_mu", "background_cov", "background_precision"),
    "vim": ("d", "w", "b", "principal_subspace", "alpha"),
}


def default_knn_k(num_train: int) -> int:
    """KNN's ``k`` for ``num_train`` fitted features: ``round(num_train / 1000)``, at least 1.

    Sun et al. (2022) keep ``k`` at about a thousandth of the training set: k = 50 for CIFAR-10 (50,000 images),
    1,000 for ImageNet (1.28M), and 10 when they fit on 1% of ImageNet. So 1,400 digits get k = 1.
    """
    check_integer("num_train", num_train, 1)
    return max(1, round(num_train / 1000))


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
    """A one-logit head ``g = w z + b`` as the two-logit head jemkit reads it (:func:`jemkit.adapters.class_logits`):
    logits ``[-g / 2, g / 2]``."""
    return torch.cat([-weight / 2, weight / 2]), torch.cat([-bias / 2, bias / 2])


def _chunks(n: int, size: int) -> range:
    return range(0, n, size)


class PostHocDetectors:
    """pytorch-ood's feature detectors, fitted on a classifier's training features and scored the jemkit way
    (**higher = more in-distribution**).

    Args:
        names: detectors among :data:`POSTHOC_DETECTORS`; default all of them, ViM skipped (reason in
            :attr:`skipped`) when :meth:`fit` gets no head. Naming ``"vim"`` explicitly makes a missing head an error.
        knn_k: KNN's neighbour rank; default :func:`default_knn_k` of the number of fitted features.
        vim_dim: ViM's principal dimension ``d`` (``1 <= d < D``); default :func:`default_vim_dim`.
        chunk_size: rows per chunk while fitting and scoring: bounds the memory, never changes a score.
        device: where the statistics are accumulated and scoring runs (KNN always runs on the CPU, in
            scikit-learn); default the device of the features given to :meth:`fit`.
        strict: a detector that cannot be fitted raises (``True``) or is skipped with its reason in
            :attr:`skipped` (``False``); default: strict when ``names`` are given.

    A one-logit binary head (``head_weight [1, D]``) is read as jemkit reads it, the logits ``[-g/2, g/2]``, so ViM's
    energy is the binary JEM's; Mahalanobis and RMD fit the two classes of the 0/1 labels.

    Attributes:
        detectors: the fitted pytorch-ood detectors by name.
        skipped: ``{name: reason}`` of requested-by-default detectors that could not be fitted.
        classes: the class labels seen at fit (Mahalanobis/RMD fit one Gaussian each; labels need not be contiguous).
    """

    def __init__(
        self,
        names: Sequence[str] | None = None,
        knn_k: int | None = None,
        vim_dim: int | None = None,
        chunk_size: int = 4096,
        device: torch.device | str | None = None,
        strict: bool | None = None,
    ) -> None:
        explicit = names is not None if strict is None else strict
        names = tuple(POSTHOC_DETECTORS if names is None else names)
        unknown = [n for n in names if n not in POSTHOC_DETECTORS]
        if unknown or not names:
            raise ValueError(f"unknown post-hoc detector(s) {unknown or names}; expected some of {POSTHOC_DETECTORS}")
        if knn_k is not None:
            check_integer("knn_k", knn_k, 1)
        if vim_dim is not None:
            check_integer("vim_dim", vim_dim, 1)
        self.names = names
        self.explicit = explicit
        self.knn_k = knn_k
        self.vim_dim = vim_dim
        self.chunk_size = check_integer("chunk_size", chunk_size, 1)
        self.device = None if device is None else torch.device(device)
        self.detectors: dict[str, Any] = {}
        self.skipped: dict[str, str] = {}
        self.classes: Tensor | None = None
        self.num_features: int | None = None

    # ------------------------------------------------------------------ fitting
    @torch.no_grad()
    def fit(
        self, z: Tensor, y: Tensor, head_weight: Tensor | None = None, head_bias: Tensor | None = None
    ) -> PostHocDetectors:
        """Fit every detector on in-distribution training features ``z [N, D]`` with labels ``y [N]``.

        Args:
            z: features (:func:`jemkit.features.extract_features`), any device and float dtype.
            y: class labels ``>= 0`` (integers, or 0/1 floats of a binary head).
            head_weight, head_bias: the last linear layer's ``W [C, D]`` and ``b [C]`` (``C = 1`` for a one-logit
                head; no bias: zeros), for ViM.

        Raises:
            ValueError: shapes that do not fit, negative or fractional labels, non-finite features, ``knn_k`` above
                ``N``, ``vim_dim`` not below ``D``, or ``"vim"`` named without a head.
        """
        z, y = self._check_training_data(z, y)
        n, dim = z.shape
        device = self.device or z.device
        self.detectors, self.skipped = {}, {}
        self.num_features = dim
        self.classes, labels = torch.unique(y, return_inverse=True)
        if "mahalanobis" in self.names or "rmd" in self.names:
            mu, scatter, mean, total = self._gaussian_statistics(z, labels, len(self.classes), device)
            precision = self._precision(scatter)
            if "mahalanobis" in self.names:
                maha = Mahalanobis(None)
                maha.mu, maha.cov, maha.precision = mu.float(), self._ridged(scatter).float(), precision
                self.detectors["mahalanobis"] = maha
            if "rmd" in self.names:
                rmd = RMD(None)
                rmd.mu, rmd.cov, rmd.precision = mu.float(), self._ridged(scatter).float(), precision
                rmd.background_mu = mean.float()
                rmd.background_cov = self._ridged(total).float()
                rmd.background_precision = self._precision(total)
                self.detectors["rmd"] = rmd
        if "knn" in self.names:
            k = default_knn_k(n) if self.knn_k is None else self.knn_k
            if k > n:
                raise ValueError(f"knn_k={k} exceeds the number of fitted features ({n})")
            # scikit-learn's NearestNeighbors keeps the normalised features (N x D float32) on the CPU.
            self.detectors["knn"] = KNN(None, k=k).fit_features(z.detach().float().cpu(), labels.cpu())
        if "vim" in self.names:
            reason = self._vim_unusable(dim, head_weight, head_bias)
            if reason is not None:
                if self.explicit:
                    raise ValueError(f"ViM cannot be fitted: {reason}")
                self.skipped["vim"] = reason
            else:
                vim = self._fit_vim(z, head_weight, head_bias, device)
                if isinstance(vim, str):
                    if self.explicit:
                        raise ValueError(f"ViM cannot be fitted: {vim}")
                    self.skipped["vim"] = vim
                else:
                    self.detectors["vim"] = vim
        return self

    def _check_training_data(self, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if not isinstance(z, Tensor) or z.dim() != 2 or not z.is_floating_point():
            raise ValueError(
                f"z must be float features [N, D], got {type(z).__name__} {tuple(getattr(z, 'shape', ()))}"
            )
        if not isinstance(y, Tensor):
            raise ValueError(f"y must be a tensor of labels [N], got {type(y).__name__}")
        if y.dim() == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.dim() != 1 or y.shape[0] != z.shape[0]:
            raise ValueError(f"y must be labels [N] = [{z.shape[0]}], got shape {tuple(y.shape)}")
        if z.shape[0] < 2:
            raise ValueError(f"need at least 2 training features to fit, got {z.shape[0]}")
        if y.is_floating_point():
            if not bool((y == y.round()).all()):
                raise ValueError("y must hold whole class labels (integers or 0/1 floats), got fractional values")
            y = y.long()
        y = y.detach().to(z.device)
        if bool((y < 0).any()):
            raise ValueError(f"y must hold class labels >= 0 (in-distribution only), got minimum {int(y.min())}")
        if not bool(torch.isfinite(z).all()):
            raise ValueError("z holds non-finite features (NaN or inf): the classifier diverged or the layer overflows")
        return z.detach(), y

    def _gaussian_statistics(
        self, z: Tensor, labels: Tensor, num_classes: int, device: torch.device
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Class means ``[C, D]``, the within-class scatter ``sum_i (z_i - mu_{y_i})(...)^T`` (what pytorch-ood's
        Mahalanobis sums class by class), the overall mean ``[D]`` and the overall scatter: float64, two passes over
        row chunks (two passes: the one-pass ``sum z z^T - N mu mu^T`` loses digits to cancellation)."""
        n, dim = z.shape
        sums = torch.zeros(num_classes, dim, dtype=torch.float64, device=device)
        counts = torch.zeros(num_classes, dtype=torch.float64, device=device)
        for start in _chunks(n, self.chunk_size):
            zc = z[start : start + self.chunk_size].to(device, torch.float64)
            yc = labels[start : start + self.chunk_size].to(device)
            sums.index_add_(0, yc, zc)
            counts.index_add_(0, yc, torch.ones_like(yc, dtype=torch.float64))
        mu = sums / counts[:, None]
        mean = sums.sum(0) / n
        scatter = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        total = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        for start in _chunks(n, self.chunk_size):
            zc = z[start : start + self.chunk_size].to(device, torch.float64)
            yc = labels[start : start + self.chunk_size].to(device)
            within = zc - mu[yc]
            scatter.addmm_(within.T, within)
            overall = zc - mean
            total.addmm_(overall.T, overall)
        return mu, scatter, mean, total

    @staticmethod
    def _ridged(scatter: Tensor) -> Tensor:
        return scatter + _RIDGE * torch.eye(scatter.shape[0], dtype=scatter.dtype, device=scatter.device)

    @classmethod
    def _precision(cls, scatter: Tensor) -> Tensor:
        # Inverted in float64: with D close to N the scatter is near-singular and a float32 inverse loses the ridge.
        return torch.linalg.inv(cls._ridged(scatter)).float()

    @staticmethod
    def _vim_unusable(dim: int, weight: Tensor | None, bias: Tensor | None) -> str | None:
        if weight is None:
            return (
                "no last linear layer (head_weight) was given: ViM's virtual logit is matched against the head's "
                "logits W z + b (jemkit.features.last_linear(model) gives the layer)"
            )
        if weight.dim() != 2 or weight.shape[1] != dim:
            return (
                f"head_weight has shape {tuple(weight.shape)} but the features have D = {dim}: ViM needs the features "
                "the head receives (the default layer of jemkit.features), not a named layer's"
            )
        if bias is not None and tuple(bias.shape) != (weight.shape[0],):
            return f"head_bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)"
        if dim < 2:
            return f"features of size D = {dim} leave no residual space for ViM's virtual logit"
        return None

    def _fit_vim(self, z: Tensor, weight: Tensor, bias: Tensor | None, device: torch.device) -> ViM | str:
        """pytorch-ood's ViM fit, chunked: covariance of ``z - u`` (float64), its eigenvectors, and
        ``alpha = mean max-logit / mean residual norm``; the reason instead when the training features leave no
        residual (they span at most ``d`` dimensions around ``u``)."""
        n, dim = z.shape
        weight = weight.detach().float().to(device)
        bias = torch.zeros(weight.shape[0], device=device) if bias is None else bias.detach().float().to(device)
        if weight.shape[0] == 1:
            weight, bias = _binary_head(weight, bias)
        d = default_vim_dim(dim) if self.vim_dim is None else self.vim_dim
        if d >= dim:
            raise ValueError(f"vim_dim={d} must be below the feature size D = {dim} (ViM's residual is D - d wide)")
        vim = ViM(None, d=d, w=weight, b=bias)
        u = vim.u.to(torch.float64)
        cov = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        for start in _chunks(n, self.chunk_size):
            xc = z[start : start + self.chunk_size].to(device, torch.float64) - u
            cov.addmm_(xc.T, xc)
        _, eig_vecs = torch.linalg.eigh(cov / n)
        residual_basis = eig_vecs[:, : dim - d]  # eigh sorts ascending: the D - d least-varying directions
        max_logit_sum, residual_sum, norm_sum = 0.0, 0.0, 0.0
        for start in _chunks(n, self.chunk_size):
            zc = z[start : start + self.chunk_size].to(device, torch.float64)
            logits = zc @ weight.double().T + bias.double()
            max_logit_sum += float(logits.max(1).values.sum())
            residual_sum += float(((zc - u) @ residual_basis).norm(dim=1).sum())
            norm_sum += float((zc - u).norm(dim=1).sum())
        if not residual_sum > 1e-6 * norm_sum:  # zero up to rounding: alpha would be noise over noise
            return (
                f"the {n} training features have no residual outside ViM's {d}-dimensional principal subspace: "
                f"pass a smaller vim_dim"
            )
        vim.principal_subspace = residual_basis.float().contiguous()
        vim.alpha = max_logit_sum / residual_sum
        return vim

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def score(self, z: Tensor) -> dict[str, Tensor]:
        """Scores ``{name: [M]}`` of features ``z [M, D]``, float32 on ``z``'s device, **higher = more
        in-distribution** (pytorch-ood's outlier scores negated). Fitted detectors only (see :attr:`skipped`)."""
        if not self.detectors:
            raise RuntimeError("PostHocDetectors.score called before fit")
        if not isinstance(z, Tensor) or z.dim() != 2 or z.shape[1] != self.num_features:
            raise ValueError(
                f"z must be features [M, {self.num_features}] like the fitted ones, got "
                f"{type(z).__name__} {tuple(getattr(z, 'shape', ()))}"
            )
        out: dict[str, Tensor] = {}
        for name, detector in self.detectors.items():
            parts = []
            for start in _chunks(z.shape[0], self.chunk_size):
                zc = z[start : start + self.chunk_size].detach().float()
                parts.append(-detector.predict_features(zc).float().to(z.device))
            out[name] = torch.cat(parts) if parts else torch.empty(0, device=z.device)
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The fitted state as plain tensors and numbers (KNN: its normalised training features), for
        ``torch.save``; :meth:`load_state_dict` rebuilds the pytorch-ood detectors from it."""
        state: dict[str, Any] = {"num_features": self.num_features, "classes": self.classes, "skipped": self.skipped}
        for name, det in self.detectors.items():
            if name == "knn":
                state[name] = {"k": det.k, "bank": torch.from_numpy(det.knn._fit_X.copy())}
            else:
                state[name] = {key: getattr(det, key) for key in _FITTED_STATE[name]}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> PostHocDetectors:
        """Rebuild the fitted detectors from :meth:`state_dict`'s output (on ``self.device`` or where saved)."""
        self.num_features, self.classes, self.skipped = state["num_features"], state["classes"], dict(state["skipped"])
        self.detectors = {}
        for name in POSTHOC_DETECTORS:
            if name not in state:
                continue
            s = state[name]
            if name in ("mahalanobis", "rmd"):
                det = Mahalanobis(None) if name == "mahalanobis" else RMD(None)
                for key, value in s.items():
                    setattr(det, key, value)
            elif name == "knn":
                # the bank is already unit-norm; normalising it again is the identity up to rounding
                det = KNN(None, k=s["k"]).fit_features(s["bank"], torch.zeros(len(s["bank"]), dtype=torch.long))
            else:
                det = ViM(None, d=s["d"], w=s["w"], b=s["b"])
                det.principal_subspace, det.alpha = s["principal_subspace"], s["alpha"]
            if self.device is not None and name != "knn":
                det.to(self.device)
            self.detectors[name] = det
        return self
