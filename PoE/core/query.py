"""Composite queries over primitive tasks (the tasks themselves are each dataset's, in ``PoE.core.datasets``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from PoE.core.errors import PoEError


@dataclass(frozen=True)
class Query:
    """A composite task: primitive tasks in the user's order, classes placed in ascending class id.

    ``order`` maps the experts' concatenated outputs (query order, each task's own class order)
    to the ascending class-id layout of the composite model's output.
    """

    tasks: tuple[str, ...]
    task_classes: tuple[tuple[int, ...], ...]

    @property
    def concat_classes(self) -> list[int]:
        return [c for cls in self.task_classes for c in cls]

    @property
    def classes(self) -> list[int]:
        return sorted(self.concat_classes)

    @property
    def num_classes(self) -> int:
        return len(self.concat_classes)

    @property
    def order(self) -> list[int]:
        """Index into the concatenated expert outputs for each output position (ascending class id)."""
        concat = self.concat_classes
        return sorted(range(len(concat)), key=concat.__getitem__)

    def owner(self) -> list[int]:
        """For each output position, the index (in ``tasks``) of the expert that produces it."""
        who = [i for i, cls in enumerate(self.task_classes) for _ in cls]
        return [who[j] for j in self.order]


def make_query(names: Sequence[str], table: Mapping[str, Sequence[int]], dataset: str = "") -> Query:
    """Validate task names against ``table`` and build the composite query."""
    names = list(names)
    if not names:
        raise PoEError(f"empty query: name at least one task; known tasks: {', '.join(table)}")
    unknown = [n for n in names if n not in table]
    if unknown:
        where = f" for {dataset}" if dataset else ""
        raise PoEError(f"unknown task {unknown[0][:80]!r}{where}; known tasks: {', '.join(table)}")
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise PoEError(f"task {n[:80]!r} is named twice in the query; name each task once")
        seen.add(n)
    classes = [tuple(table[n]) for n in names]
    flat = [c for cls in classes for c in cls]
    if len(set(flat)) != len(flat):
        raise PoEError(f"tasks {', '.join(names)} share classes; a composite task needs disjoint tasks")
    return Query(tuple(names), tuple(classes))
