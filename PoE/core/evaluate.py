"""Accuracy, cross-expert errors, and model cost (multiply-adds, parameters)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from PoE.core.data import ImageSet, Normalizer
from PoE.core.errors import PoEError
from PoE.core.query import Query
from PoE.core.runtime import Runtime


def batched_logits(
    model: nn.Module,
    images: torch.Tensor,
    normalize: Normalizer,
    runtime: Runtime,
    batch_size: int = 500,
    progress: str | None = None,
) -> Iterator[torch.Tensor]:
    """``model``'s float32 logits (on the runtime's device) for ``images`` (uint8 0..255 or float 0..1, N x 3 x H x
    W), batch by batch: normalised, channels_last, under the runtime's autocast, no gradients. ``progress``: a bar's
    title.
    The one loop through which every evaluation, the Python API's predictions and the combination scoring run."""
    starts = range(0, len(images), batch_size)
    if progress is not None:  # a disabled bar still costs time per call, which the service's small batches pay
        from tqdm import tqdm

        starts = tqdm(starts, desc=progress, leave=False)
    for s in starts:
        x = normalize(images[s : s + batch_size].to(runtime.device)).contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), runtime.autocast():
            out = model(x).float()
        yield out  # outside the autocast and no_grad contexts: the caller's code runs as it would


def predict(
    model: nn.Module,
    images: ImageSet,
    normalize: Normalizer,
    runtime: Runtime,
    batch_size: int = 500,
    columns: Sequence[int] | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Argmax predictions (CPU, int64); ``columns`` restricts the argmax to those output columns."""
    model.eval()
    cols = None if columns is None else torch.tensor(list(columns), device=runtime.device)
    out = []
    for logits in batched_logits(model, images.x, normalize, runtime, batch_size, "evaluate" if progress else None):
        out.append((logits if cols is None else logits.index_select(1, cols)).argmax(1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def check_covered(labels: torch.Tensor, classes: Sequence[int], name: Callable[[int], str]) -> None:
    """Raise unless the test ``labels`` include every one of ``classes``: an accuracy over some of them would
    pass for the query's, and over none it was ``nan%`` with exit 0."""
    lacking = sorted(set(classes) - set(labels.unique().tolist()))
    if lacking:
        names = ", ".join(f"{c} {name(c)}" for c in lacking[:5]) + (", ..." * (len(lacking) > 5))
        raise PoEError(
            f"the test split has no images of {len(lacking)} of the query's {len(classes)} classes ({names}): "
            "its accuracy cannot be measured; give test data that covers them, or skip the evaluation"
        )


def accuracy(
    model: nn.Module,
    images: ImageSet,
    classes: Sequence[int] | None,
    normalize: Normalizer,
    runtime: Runtime,
    restrict: bool = False,
    progress: bool = False,
) -> tuple[float, int]:
    """(accuracy in %, number of images) over the test images whose label is in ``classes``.

    ``restrict=False``: the model's outputs are ``classes``, in that order (an expert, or a
    task-specific model with its ascending class ids). ``restrict=True``: the model scores every
    class (an Oracle) and the argmax is taken over the ``classes`` columns only. ``classes=None``:
    all classes, all images.
    """
    if classes is None:
        subset, labels, columns = images, images.y, None
    else:
        subset, labels = images.with_classes(list(classes))
        columns = list(classes) if restrict else None
    if len(labels) == 0:
        return float("nan"), 0
    pred = predict(model, subset, normalize, runtime, columns=columns, progress=progress)
    return 100.0 * (pred == labels).float().mean().item(), len(labels)


def cross_expert_share(pred: torch.Tensor, labels: torch.Tensor, owner: Sequence[int]) -> tuple[int, int]:
    """(cross-expert errors, all errors): a wrong argmax that falls in another expert's classes.

    ``pred`` and ``labels`` are positions in the composite output; ``owner[p]`` is the expert of position p.
    """
    own = torch.as_tensor(list(owner))
    wrong = pred != labels
    cross = wrong & (own[pred] != own[labels])
    return int(cross.sum()), int(wrong.sum())


def count_macs(model: nn.Module, input_shape: tuple[int, ...], device: str | torch.device = "cpu") -> int:
    """Multiply-adds of the convolutions and linear layers for one image.

    PyTorch's FlopCounterMode counts 2 FLOPs per multiply-add; the paper counts one, so halve it.
    BatchNorm, ReLU and pooling (a few percent more in the original code's count) are not included.
    """
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, *input_shape, device=device))
    model.train(was_training)
    return counter.get_total_flops() // 2


def count_params(model: nn.Module) -> int:
    """Parameter count, frozen ones included (BatchNorm running statistics are buffers and are not counted)."""
    return sum(p.numel() for p in model.parameters())


def consolidated_logits(
    model: nn.Module, images: ImageSet, normalize: Normalizer, runtime: Runtime, progress: bool = False
) -> torch.Tensor:
    """A consolidated model's logits (CPU) on every image: one library and one bank forward per batch.

    Its columns are its classes in ascending class id, each scored by its own expert, so any composite task over a
    subset of its experts is these columns restricted to the subset's classes (``score_composite``): every
    combination is scored without running a network again, by the same forward as its own model.
    """
    model.eval()
    title = "experts on test images" if progress else None
    return torch.cat([o.cpu() for o in batched_logits(model, images.x, normalize, runtime, progress=title)])


def score_composite(
    query: Query, logits: torch.Tensor, columns: Sequence[int], labels: torch.Tensor
) -> tuple[float, int, int, int]:
    """(accuracy %, images, cross-expert errors, errors) of a composite task, from ``logits`` whose columns are the
    class ids ``columns`` (a consolidated model over a superset of the query's experts, or an Oracle's).

    ``labels`` are class ids of the rows; rows outside the composite's classes are ignored.
    """
    classes = query.classes
    at = {c: i for i, c in enumerate(columns)}
    merged = logits.index_select(1, torch.tensor([at[c] for c in classes], device=logits.device))
    lookup = torch.full((max(max(classes), int(labels.max())) + 1,), -1, dtype=torch.long)
    lookup[torch.tensor(classes)] = torch.arange(len(classes))
    target = lookup[labels]
    keep = target >= 0
    pred = merged[keep].argmax(1)
    target = target[keep]
    cross, wrong = cross_expert_share(pred, target, query.owner())
    n = int(keep.sum())
    return 100.0 * (pred == target).float().mean().item(), n, cross, wrong
