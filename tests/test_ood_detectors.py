"""jemkit.ood.detectors: pytorch-ood's feature detectors fitted in chunks give pytorch-ood's own scores, negated
(higher = in-distribution), and rank far-away inputs below the training data; each detector is a registered class
that fits, scores and saves on its own, and PostHocDetectors runs whichever are named."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest
import torch
from pytorch_ood.detector import KNN, RMD, Mahalanobis, ViM
from torch import Tensor

from jemkit.classifier import class_logits
from jemkit.ood.detectors import (
    DETECTORS,
    POSTHOC_DETECTORS,
    CannotFitError,
    Detector,
    Head,
    KNNDetector,
    MahalanobisDetector,
    PostHocDetectors,
    RMDDetector,
    ViMDetector,
    default_knn_k,
    default_vim_dim,
    register,
)
from jemkit.ood.detectors.base import score_in_chunks


def _gaussian_classes(n: int = 240, dim: int = 12, classes: int = 4, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Class-conditional Gaussians with distinct per-dimension scales (a clear eigen-gap for ViM)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    means = torch.randn(classes, dim, generator=g) * 3
    scales = torch.linspace(0.3, 2.0, dim)
    return means[y] + torch.randn(n, dim, generator=g) * scales, y


def _head(dim: int, classes: int, seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(classes, dim, generator=g), torch.randn(classes, generator=g)


def _reference(z: Tensor, y: Tensor, z_test: Tensor, w: Tensor, b: Tensor, k: int, d: int) -> dict[str, Tensor]:
    """pytorch-ood's plain fit and scores (higher = outlier)."""
    return {
        "mahalanobis": Mahalanobis(None).fit_features(z, y).predict_features(z_test),
        "rmd": RMD(None).fit_features(z, y).predict_features(z_test),
        "knn": KNN(None, k=k).fit_features(z, y).predict_features(z_test),
        "vim": ViM(None, d=d, w=w, b=b).fit_features(z, y).predict_features(z_test),
    }


@pytest.mark.parametrize("chunk_size", [7, 64, 10_000])
def test_chunked_fit_scores_equal_pytorch_ood_negated(chunk_size: int) -> None:
    z, y = _gaussian_classes()
    z_test = torch.randn(40, z.shape[1]) * 4
    w, b = _head(z.shape[1], 4)
    ours = PostHocDetectors(knn_k=5, vim_dim=6, chunk_size=chunk_size).fit(z, y, w, b).score(z_test)
    ref = _reference(z, y, z_test, w, b, k=5, d=6)
    assert set(ours) == set(POSTHOC_DETECTORS)
    for name, expected in ref.items():
        assert ours[name].shape == (40,) and ours[name].dtype == torch.float32
        torch.testing.assert_close(ours[name], -expected.float(), rtol=1e-4, atol=1e-4, msg=name)


def test_fitted_state_matches_pytorch_ood() -> None:
    z, y = _gaussian_classes()
    ours = PostHocDetectors(names=["rmd"], chunk_size=50).fit(z, y).detectors["rmd"]
    ref = RMD(None).fit_features(z, y)
    torch.testing.assert_close(ours.mu, ref.mu)
    torch.testing.assert_close(ours.cov, ref.cov, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(ours.background_mu, ref.background_mu, rtol=1e-5, atol=1e-5)


def test_far_points_score_lower_higher_is_in_distribution() -> None:
    # offset from the origin like ReLU features: KNN compares directions (it normalises), the others distances
    z_all, y_all = _gaussian_classes(n=500)
    z_all = z_all + 10.0
    z, y, z_in = z_all[:400], y_all[:400], z_all[400:]  # z_in: held-out draws from the same classes
    w, b = _head(z.shape[1], 4)
    detectors = PostHocDetectors(knn_k=5).fit(z, y, w, b)
    direction = torch.randn(100, z.shape[1])
    z_far = direction / direction.norm(dim=1, keepdim=True) * 60.0  # far from every class
    s_in, s_far = detectors.score(z_in), detectors.score(z_far)
    for name in POSTHOC_DETECTORS:
        auroc = (s_in[name][:, None] > s_far[name][None, :]).float().mean().item()
        assert auroc > 0.95, (name, auroc)
        assert s_in[name].median() > s_far[name].median(), name


def test_default_names_skip_vim_without_a_head_explicit_names_raise() -> None:
    z, y = _gaussian_classes()
    detectors = PostHocDetectors(knn_k=3).fit(z, y)
    assert set(detectors.detectors) == {"mahalanobis", "rmd", "knn"}
    assert "no last linear layer" in detectors.skipped["vim"]
    assert set(detectors.score(z[:5])) == {"mahalanobis", "rmd", "knn"}
    with pytest.raises(ValueError, match="ViM cannot be fitted: no last linear layer"):
        PostHocDetectors(names=["vim"]).fit(z, y)
    w, _ = _head(z.shape[1] + 1, 4)
    with pytest.raises(ValueError, match=r"head_weight has shape \(4, 13\).*D = 12"):
        PostHocDetectors(names=["vim"]).fit(z, y, w)


def test_one_logit_binary_head_reads_as_jemkit_two_logits() -> None:
    z, y = _gaussian_classes(classes=2)
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(1, z.shape[1], generator=g), torch.randn(1, generator=g)
    ours = PostHocDetectors(vim_dim=6, knn_k=3).fit(z, y.float(), w, b)
    z_test = torch.randn(10, z.shape[1]) * 3
    # ViM's energy is logsumexp of jemkit's reading of the head, [-g/2, g/2]
    w2, b2 = torch.cat([-w / 2, w / 2]), torch.cat([-b / 2, b / 2])
    torch.testing.assert_close(z_test @ w2.T + b2, class_logits(z_test @ w.T + b))
    expected = ViM(None, d=6, w=w2, b=b2).fit_features(z, y).predict_features(z_test)
    torch.testing.assert_close(ours.score(z_test)["vim"], -expected, rtol=1e-4, atol=1e-4)
    assert len(ours.classes) == 2


def test_labels_need_not_be_contiguous() -> None:
    z, y = _gaussian_classes()
    sparse = torch.tensor([0, 3, 5, 9])[y]  # e.g. the classes left after holding some out
    ours = PostHocDetectors(names=["mahalanobis", "rmd"]).fit(z, sparse).score(z[:20])
    ref = _reference(z, y, z[:20], *_head(z.shape[1], 4), k=1, d=6)
    torch.testing.assert_close(ours["mahalanobis"], -ref["mahalanobis"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours["rmd"], -ref["rmd"], rtol=1e-4, atol=1e-4)


def test_state_dict_round_trip() -> None:
    z, y = _gaussian_classes()
    w, b = _head(z.shape[1], 4)
    fitted = PostHocDetectors(knn_k=4, vim_dim=5).fit(z, y, w, b)
    restored = PostHocDetectors().load_state_dict(fitted.state_dict())
    z_test = torch.randn(15, z.shape[1]) * 2
    expected, got = fitted.score(z_test), restored.score(z_test)
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-5)


def test_default_hyper_parameters_follow_the_papers() -> None:
    assert default_knn_k(50_000) == 50  # Sun et al., CIFAR-10
    assert default_knn_k(1_281_167) == 1281  # ImageNet: the paper's 1,000 is the same thousandth
    assert default_knn_k(1_400) == 1 and default_knn_k(3) == 1
    assert default_vim_dim(2048) == 1000 and default_vim_dim(768) == 512  # Wang et al.
    assert default_vim_dim(512) == 256 and default_vim_dim(128) == 64 and default_vim_dim(2) == 1
    z, y = _gaussian_classes(n=120)
    detectors = PostHocDetectors(names=["knn", "vim"]).fit(z, y, *_head(z.shape[1], 4))
    assert detectors.detectors["knn"].k == 1 and detectors.detectors["vim"].d == 6


def test_bad_inputs_are_named() -> None:
    z, y = _gaussian_classes()
    with pytest.raises(ValueError, match="unknown post-hoc detector"):
        PostHocDetectors(names=["odin"])
    with pytest.raises(ValueError, match="knn_k must be an integer"):
        PostHocDetectors(knn_k=0)
    with pytest.raises(ValueError, match="labels >= 0"):
        PostHocDetectors().fit(z, y - 1)
    with pytest.raises(ValueError, match="fractional"):
        PostHocDetectors().fit(z, y.float() + 0.5)
    bad = z.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        PostHocDetectors().fit(bad, y)
    with pytest.raises(ValueError, match=r"y must be labels \[N\]"):
        PostHocDetectors().fit(z, y[:-1])
    with pytest.raises(ValueError, match="exceeds the number"):
        PostHocDetectors(names=["knn"], knn_k=500).fit(z, y)
    with pytest.raises(ValueError, match="vim_dim=12 must be below"):
        PostHocDetectors(names=["vim"], vim_dim=12).fit(z, y, *_head(12, 4))
    with pytest.raises(RuntimeError, match="before fit"):
        PostHocDetectors().score(z)
    with pytest.raises(ValueError, match=r"features \[M, 12\]"):
        PostHocDetectors(names=["mahalanobis"]).fit(z, y).score(z[:, :5])


def test_vim_with_no_residual_is_skipped_with_reason() -> None:
    z = torch.zeros(20, 6)
    z[:, 0] = torch.randn(20)  # the features span one direction: nothing outside a 3-dimensional subspace
    y = torch.arange(20) % 2
    detectors = PostHocDetectors(names=None, knn_k=2, vim_dim=3).fit(z, y, *_head(6, 2))
    assert "no residual" in detectors.skipped["vim"]


@pytest.mark.slow
def test_thousand_classes_by_2048_features_fit_and_score() -> None:
    """The ImageNet shape of pytorch-ood issues #9/#93 (few rows per class to stay fast): fitted in chunks of 512."""
    g = torch.Generator().manual_seed(0)
    n, dim, classes = 3000, 2048, 1000
    y = torch.arange(n) % classes
    z = torch.randn(n, dim, generator=g).relu()
    w, b = torch.randn(classes, dim, generator=g) * 0.01, torch.zeros(classes)
    detectors = PostHocDetectors(chunk_size=512).fit(z, y, w, b)
    assert detectors.detectors["mahalanobis"].mu.shape == (classes, dim)
    assert detectors.detectors["vim"].d == 1000 and detectors.detectors["knn"].k == 3
    scores = detectors.score(torch.randn(4, dim, generator=g).relu())
    assert all(s.shape == (4,) and bool(torch.isfinite(s).all()) for s in scores.values())


# ---------------------------------------------------------------------- the registry and one detector a class


def test_registry_holds_the_four_detectors_in_order() -> None:
    assert POSTHOC_DETECTORS == ("mahalanobis", "rmd", "knn", "vim")
    assert tuple(DETECTORS)[:4] == POSTHOC_DETECTORS
    classes = (MahalanobisDetector, RMDDetector, KNNDetector, ViMDetector)
    assert tuple(DETECTORS[name] for name in POSTHOC_DETECTORS) == classes
    assert all(
        issubclass(cls, Detector) and cls.name == name for name, cls in zip(POSTHOC_DETECTORS, classes, strict=True)
    )
    fitted = PostHocDetectors(knn_k=3, vim_dim=6).fit(*_gaussian_classes(), *_head(12, 4))
    assert all(type(fitted.fitted[name]) is DETECTORS[name] for name in POSTHOC_DETECTORS)
    # .detectors lists the pytorch-ood objects that score, as before the split
    assert [type(d) for d in fitted.detectors.values()] == [Mahalanobis, RMD, KNN, ViM]
    # Mahalanobis and RMD fitted together share one computation of the class statistics
    assert fitted.detectors["mahalanobis"].precision is fitted.detectors["rmd"].precision


def _save_and_load(state: dict) -> dict:
    """``state`` through torch.save and a weights-only torch.load: plain tensors and numbers only."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("name", POSTHOC_DETECTORS)
def test_each_detector_round_trips_through_its_own_state_dict(name: str) -> None:
    z, y = _gaussian_classes()
    w, b = _head(z.shape[1], 4)
    options = {"knn": {"k": 4}, "vim": {"d": 5}}.get(name, {})
    detector = DETECTORS[name](chunk_size=33, **options).fit(z, y, Head(w, b))
    restored = DETECTORS[name](**options).load_state_dict(_save_and_load(detector.state_dict()))
    z_test = torch.randn(25, z.shape[1]) * 3
    expected = detector.score(z_test)
    assert expected.shape == (25,) and expected.dtype == torch.float32
    if name == "knn":  # the saved bank is normalised again on load: the identity up to rounding
        torch.testing.assert_close(restored.score(z_test), expected, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(restored.score(z_test), expected)
    # the same detector inside the collection scores the same
    collection = PostHocDetectors(names=[name], knn_k=4, vim_dim=5).fit(z, y, w, b)
    assert torch.equal(collection.score(z_test)[name], expected)


def test_a_detector_refuses_to_score_or_save_before_fit() -> None:
    for cls in (MahalanobisDetector, RMDDetector, KNNDetector, ViMDetector):
        with pytest.raises(RuntimeError, match="before fit"):
            cls().score(torch.zeros(3, 4))
        with pytest.raises(RuntimeError, match="before fit"):
            cls().state_dict()
    with pytest.raises(CannotFitError, match="no last linear layer"):
        ViMDetector().fit(*_gaussian_classes())
    with pytest.raises(ValueError, match="k must be an integer"):
        KNNDetector(k=0)


class _DistanceToMean(Detector):
    """A tiny custom detector: minus the Euclidean distance to the training features' mean."""

    def __init__(self, chunk_size: int = 4096, device: torch.device | str | None = None) -> None:
        super().__init__(chunk_size, device)
        self.mean: Tensor | None = None

    def fit(self, z: Tensor, y: Tensor, head: Head | None = None) -> _DistanceToMean:
        self.mean = z.float().mean(0)
        return self

    def score(self, z: Tensor) -> Tensor:
        return score_in_chunks(lambda zc: (zc - self.mean).norm(dim=1), z, self.chunk_size)

    def state_dict(self) -> dict:
        return {"mean": self.mean}

    def load_state_dict(self, state: dict) -> _DistanceToMean:
        self.mean = state["mean"]
        return self


class _NeedsAHead(_DistanceToMean):
    """A tiny custom detector that cannot be fitted without a head."""

    title = "NeedsAHead"

    def fit(self, z: Tensor, y: Tensor, head: Head | None = None) -> _NeedsAHead:
        if head is None:
            raise CannotFitError("it needs the head")
        return super().fit(z, y, head)


@pytest.fixture
def custom_detectors() -> Iterator[None]:
    """``distance`` and ``needs_head`` registered for one test, then removed from the registry."""
    before = dict(DETECTORS)
    register("distance")(_DistanceToMean)
    register("needs_head")(_NeedsAHead)
    yield
    DETECTORS.clear()
    DETECTORS.update(before)


def test_a_registered_custom_detector_is_picked_up_by_name(custom_detectors: None) -> None:
    z, y = _gaussian_classes()
    z_test = torch.randn(9, z.shape[1])
    detectors = PostHocDetectors(names=["distance", "mahalanobis"], chunk_size=4).fit(z, y)
    scores = detectors.score(z_test)
    assert list(scores) == ["mahalanobis", "distance"]  # registration order, as the built-ins keep
    assert torch.equal(scores["distance"], -(z_test - z.mean(0)).norm(dim=1))
    assert isinstance(detectors.detectors["distance"], _DistanceToMean)  # no pytorch-ood object behind it
    restored = PostHocDetectors(names=["distance"]).load_state_dict(detectors.state_dict())
    assert torch.equal(restored.score(z_test)["distance"], scores["distance"])
    # the defaults stay jemkit's four
    assert PostHocDetectors().names == POSTHOC_DETECTORS


def test_a_custom_detector_that_cannot_fit_is_skipped_or_raises(custom_detectors: None) -> None:
    z, y = _gaussian_classes()
    lenient = PostHocDetectors(names=["distance", "needs_head"], strict=False).fit(z, y)
    assert list(lenient.fitted) == ["distance"] and lenient.skipped == {"needs_head": "it needs the head"}
    with pytest.raises(ValueError, match="NeedsAHead cannot be fitted: it needs the head"):
        PostHocDetectors(names=["needs_head"]).fit(z, y)


def test_register_refuses_a_taken_or_reserved_name(custom_detectors: None) -> None:
    with pytest.raises(ValueError, match="'knn' is already registered"):
        register("knn")(_DistanceToMean)
    with pytest.raises(ValueError, match="other than"):
        register("classes")
    with pytest.raises(TypeError, match="Detector subclass"):
        register("plain")(dict)


def test_unknown_detector_names_are_refused_by_name() -> None:
    with pytest.raises(
        ValueError, match=r"unknown post-hoc detector\(s\) \['odin', 'gram'\]; expected some of mahalanobis"
    ):
        PostHocDetectors(names=["knn", "odin", "gram"])
    with pytest.raises(ValueError, match=r"unknown post-hoc detector\(s\) \[\]"):
        PostHocDetectors(names=[])
