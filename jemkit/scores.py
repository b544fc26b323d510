"""Per-sample out-of-distribution scores read off a classifier seen as a JEM.

Convention: every score is **higher for inputs that look in-distribution** (the in-distribution set is the positive
class of AUROC/FPR95). The scores of the JEM paper (Grathwohl et al. 2020, Table 3):

- ``logpx``: unnormalised ``log p(x) = -E(x)`` (the JEM score),
- ``msp``: maximum softmax probability ``max_y p(y|x)`` (Hendrycks & Gimpel 2017),
- ``max_logit``: ``max_y f(x)[y]``,
- ``grad_norm``: ``-|| d log p(x) / dx ||_2`` (JEM's "approximate mass": data sits where the density is flat).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

from jemkit.energy import log_px, log_py_given_x

__all__ = ["SCORES", "compare_scores", "ood_scores", "reversed_scores", "score_batches", "score_sets"]

SCORES: tuple[str, ...] = ("logpx", "msp", "max_logit", "grad_norm")


def ood_scores(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    scores: Sequence[str] = SCORES,
    temperature: float = 1.0,
) -> dict[str, Tensor]:
    """Scores ``{name: [B]}`` of inputs ``x [B, ...]`` for a classifier ``model: x -> logits [B, C]``.

    Only ``grad_norm`` needs a backward pass (input gradients only); it works inside validation/inference mode.
    """
    unknown = [s for s in scores if s not in SCORES]
    if unknown:
        raise ValueError(f"unknown OOD score(s) {unknown}; expected some of {list(SCORES)}")
    out: dict[str, Tensor] = {}
    if "grad_norm" in scores:
        with torch.inference_mode(False), torch.enable_grad():
            x_in = x.detach().clone().requires_grad_(True)
            logits = model(x_in).float()
            (grad,) = torch.autograd.grad(log_px(logits, temperature).sum(), x_in)
        out["grad_norm"] = -grad.flatten(1).norm(dim=1)
        logits = logits.detach()
    else:
        logits = model(x).float()
    if "logpx" in scores:
        out["logpx"] = log_px(logits, temperature)
    if "msp" in scores:
        out["msp"] = log_py_given_x(logits, temperature).max(1).values.exp()
    if "max_logit" in scores:
        out["max_logit"] = logits.max(1).values
    return {name: out[name] for name in scores}


def score_batches(
    model: Callable[[Tensor], Tensor],
    batches: Iterable,
    scores: Sequence[str] = SCORES,
    temperature: float = 1.0,
    device: torch.device | str | None = None,
) -> dict[str, Tensor]:
    """:func:`ood_scores` of every input in ``batches`` (``(x, ...)`` tuples or bare ``x``), concatenated:
    ``{name: [N]}`` float32 on ``device`` (empty tensors when there are no batches)."""
    parts: dict[str, list[Tensor]] = {name: [] for name in scores}
    for batch in batches:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        for name, value in ood_scores(model, x.to(device), scores, temperature).items():
            parts[name].append(value.detach().float())
    return {name: torch.cat(v) if v else torch.empty(0, device=device) for name, v in parts.items()}


def score_sets(
    model: Callable[[Tensor], Tensor],
    reference: Iterable,
    ood_sets: dict[str, Iterable],
    scores: Sequence[str] = SCORES,
    temperature: float = 1.0,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
    """Scores of the in-distribution ``reference`` batches and of each OOD set's batches: ``(in_scores,
    {set: out_scores})``, the one scoring loop of the evaluation report and the ``OODMonitor`` callback (feed the
    result to :func:`compare_scores`)."""
    from tqdm.auto import tqdm

    def score(batches: Iterable, desc: str) -> dict[str, Tensor]:
        bar = tqdm(batches, desc=desc, disable=not progress, leave=False)
        return score_batches(model, bar, scores, temperature, device)

    in_scores = score(reference, "OOD in-dist")
    return in_scores, {name: score(batches, f"OOD {name}") for name, batches in ood_sets.items()}


def compare_scores(
    in_scores: dict[str, Tensor], out_scores: dict[str, dict[str, Tensor]]
) -> dict[str, dict[str, dict[str, float]]]:
    """``{set: {score: {auroc, aupr_in, aupr_out, fpr95}}}`` of in-distribution scores ``{score: [N]}`` against each
    OOD set's ``{set: {score: [M]}}``: the one comparison of the evaluation report and the ``OODMonitor`` callback.

    Computed with :class:`~jemkit.metrics.OODMetrics`, which gathers every rank's scores under DDP (an empty share of
    a tiny set is skipped), so every rank gets the same values.
    """
    from jemkit.metrics.ood import OODMetrics

    results: dict[str, dict[str, dict[str, float]]] = {}
    for name, scores_out in out_scores.items():
        results[name] = {}
        for score, values_in in in_scores.items():
            metric = OODMetrics().to(values_in.device)
            for share, is_in in ((values_in, True), (scores_out[score], False)):
                if len(share):
                    metric.update(share, is_in)
            results[name][score] = {k: float(v) for k, v in metric.compute().items()}
    return results


def reversed_scores(results: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """A message for every score that ranks an OOD set as *more* in-distribution than the data (AUROC < 0.5)."""
    return [
        f"{score} points the wrong way on {name}: AUROC {values['auroc']:.3f} < 0.5 (the negated score would give "
        f"{1 - values['auroc']:.3f}); the model gives these inputs the values it gives data"
        for name, scores in results.items()
        for score, values in scores.items()
        if values["auroc"] < 0.5
    ]
