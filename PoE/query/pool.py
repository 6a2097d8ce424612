"""A pool of experts held in memory: read and checked once, then queried without disk or training.

``Pool.open`` reads the library and every expert present and refuses a pool whose parts do not agree:
each part written by this project records the content hash of its weights (``id``) and each expert the
id of the library it was extracted from (``library_id``); a hash that does not match, an expert of
another library, or weights that are not finite end with one line naming the file. The original
release's bare state dicts carry no metadata: they load, and ``notes`` says they could not be checked. The tasks
are the ones the manifest records; an expert file it does not list, of a task it does not name (left by an add or
a remove that was killed), is ignored with a note.
``Pool.query`` consolidates the library and the queried experts into a ``TaskModel`` from memory.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from PoE.core.consolidate import ConsolidatedNet, RawInput
from PoE.core.data import ImageSet, Normalizer, image_batch
from PoE.core.datasets import DatasetConfig, described_by_pool, get_dataset
from PoE.core.errors import PoEError
from PoE.core.evaluate import accuracy, batched_logits, check_covered, count_macs, count_params
from PoE.core.manifest import Contents
from PoE.core.networks import Family, bank_of, family_of, family_of_state
from PoE.core.precision import ieee_fp32
from PoE.core.precision import resolve as resolve_precision
from PoE.core.query import Query, make_query
from PoE.core.store import (
    PoolPaths,
    atomic_write,
    check_writable,
    load_checkpoint,
    load_into,
    resolve_pool,
    state_id,
    unwrap,
)
from PoE.core.tasks import (
    Hierarchy,
    current_hierarchy,
    given_hierarchy,
    hierarchy_notes,
    pool_hierarchy,
    tasks_hierarchy,
)

DIGEST_HEX = 64


def check_digest_text(digest: str | None) -> str | None:
    """A pinned digest as given (``--pool_digest``): 64 hex digits, as ``--list`` shows them."""
    if digest is None:
        return None
    text = str(digest).strip().lower()
    if len(text) != DIGEST_HEX or any(c not in "0123456789abcdef" for c in text):
        raise PoEError(
            f"--pool_digest {str(digest)[:80]!r}: expected the pool's {DIGEST_HEX} hex digits, as "
            "Run_Service.py --list shows them"
        )
    return text


def make_command(cfg: DatasetConfig, task: str | None = None, paths: PoolPaths | None = None) -> str:
    """The command that makes the library (``task`` None) or ``task``'s expert (into the pool at ``paths``)."""
    what = f"--stages experts --tasks {task}" if task else "--stages library"
    db = f" --db {paths.root.parent}" if paths is not None else ""
    return f"python Run_preprocessing.py --dataset {cfg.name}{db} {what}"


def how_to_make(cfg: DatasetConfig, task: str | None = None) -> str:
    return f"create it with: {make_command(cfg, task)}"


def check_weights(module: nn.Module, meta: dict[str, Any], path: Path, what: str) -> bool:
    """Raise unless ``module``'s weights are finite and match the content hash ``meta`` records; returns
    whether there was a hash to check (bare state dicts have none)."""
    for name, t in module.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise PoEError(f"{path}: {what} has non-finite weights ({name} holds NaN or inf); rebuild it")
    if "id" not in meta:
        return False
    got = state_id(module)
    if got != meta["id"]:
        raise PoEError(
            f"{path}: the {what}'s weights do not match the content hash recorded in the file (expected "
            f"{meta['id']}, got {got}): the file was changed or damaged; rebuild it"
        )
    return True


def read_library(paths: PoolPaths, cfg: DatasetConfig, contents: Contents) -> tuple[nn.Module, dict[str, Any]]:
    """The library of a pool folder, checked; its metadata ({} for the original release's bare files)."""
    path = paths.library
    sd, meta = unwrap(load_checkpoint(path, how_to_make(cfg), contents.verify), path, "library")
    contents.check(path, sd, meta, make_command(cfg, None, paths))
    if meta and meta.get("dataset") not in (None, cfg.name):
        raise PoEError(f"{path} is a library for {meta.get('dataset')}, not {cfg.name}")
    try:
        library = family_of(cfg).library_from_state(sd, cfg)
    except ValueError as e:
        raise PoEError(f"{path} does not hold a {cfg.name} library ({e})") from None
    load_into(library, sd, path, f"{cfg.name} library")
    check_weights(library, meta, path, "library")
    return library.eval(), meta


def read_expert(
    paths: PoolPaths,
    cfg: DatasetConfig,
    task: str,
    library: nn.Module,
    library_meta: dict[str, Any],
    contents: Contents,
) -> tuple[nn.Module, dict[str, Any]]:
    """One expert of a pool folder, checked against the manifest, its task and the pool's library."""
    path = paths.expert(task)
    sd, meta = unwrap(load_checkpoint(path, how_to_make(cfg, task), contents.verify), path, "expert")
    contents.check(path, sd, meta, make_command(cfg, task, paths))
    want = cfg.tasks[task]
    if meta and (meta.get("task") != task or list(meta.get("classes", want)) != list(want)):
        raise PoEError(f"{path} holds the expert of {meta.get('task')!r} {meta.get('classes')}, not {task!r} {want}")
    lib_id, own = library_meta.get("id") or state_id(library), meta.get("library_id")
    if own and own != lib_id:
        raise PoEError(
            f"{path} was extracted from library {own}, but the pool's library {paths.library.name} is {lib_id}: "
            f"they do not belong together; {how_to_make(cfg, task)} --retrain experts"
        )
    try:
        expert = family_of_state(sd, meta).expert_from_state(sd)
    except ValueError as e:
        raise PoEError(f"{path} does not hold an expert ({e})") from None
    in_channels = library.out_channels
    if expert.num_classes != len(want) or expert.in_channels != in_channels:
        raise PoEError(
            f"{path} does not fit: it has {expert.num_classes} outputs on {expert.in_channels} input channels, "
            f"task {task!r} needs {len(want)} outputs on the library's {in_channels} channels"
        )
    load_into(expert, sd, path, f"expert of {task!r}")
    check_weights(expert, meta, path, f"expert of {task!r}")
    return expert.eval(), meta


@dataclass
class Prediction:
    """Per image: the predicted class id and name, and the probabilities over ``classes``."""

    class_ids: list[int]
    class_names: list[str]
    probabilities: torch.Tensor  # N x len(classes), float32, CPU
    classes: list[int] = field(default_factory=list)  # the query's classes, ascending id
    names: list[str] = field(default_factory=list)  # their names

    def top(self, i: int, k: int = 3) -> list[dict[str, Any]]:
        """The ``k`` most probable classes of image ``i``: id, name, probability."""
        n, width = self.probabilities.shape
        if isinstance(i, bool) or not isinstance(i, int) or not -n <= i < n:
            raise PoEError(f"top(i={i!r}): i must be an image index, 0..{n - 1}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise PoEError(f"top(k={k!r}): k must be an integer >= 1 (at most {width} classes are returned)")
        p, idx = self.probabilities[i].topk(min(k, self.probabilities.shape[1]))
        return [
            {"id": self.classes[j], "name": self.names[j], "probability": round(float(q), 6)}
            for q, j in zip(p.tolist(), idx.tolist(), strict=True)
        ]


class TaskModel:
    """The consolidated model of one query: ``module`` maps normalised images to logits over ``classes``
    (ascending class id). ``predict`` takes raw images; ``export`` writes a ``.pt2`` that takes [0, 1] RGB."""

    def __init__(
        self,
        module: ConsolidatedNet,
        query: Query,
        cfg: DatasetConfig,
        device: torch.device,
        build_ms: float,
        precision: str = "fp32",
    ) -> None:
        self.module, self.query, self.cfg, self.device = module, query, cfg, device
        self.build_ms, self.precision = build_ms, precision
        self.pool: Pool | None = None  # the pool it was built from (the service answers it from that pool's modules)
        self._cost: tuple[int, int] | None = None

    @property
    def tasks(self) -> list[str]:
        return list(self.query.tasks)

    @property
    def classes(self) -> list[int]:
        return self.query.classes

    @property
    def class_names(self) -> list[str]:
        return [self.cfg.class_name(c) for c in self.classes]

    def cost(self) -> tuple[int, int]:
        """(multiply-adds per image, parameters) of the consolidated model."""
        if self._cost is None:
            shape = (3, self.cfg.image_size, self.cfg.image_size)
            self._cost = (count_macs(self.module, shape, self.device), count_params(self.module))
        return self._cost

    def accuracy(self, test: ImageSet, progress: bool = False) -> tuple[float, int]:
        """(accuracy in %, images) on the test images of the query's classes, at the pool's precision. A split
        without images of some of them is refused (an accuracy over the others would pass for the query's)."""
        check_covered(test.y, self.classes, self.cfg.class_name)
        normalize = Normalizer(self.cfg.mean, self.cfg.std, self.device)
        return accuracy(
            self.module, test, self.classes, normalize, self.device, progress=progress, precision=self.precision
        )

    def logits(self, images: Any) -> torch.Tensor:
        """Logits over ``classes`` (CPU, float32) of user images (see ``predict``)."""
        x = image_batch(images, self.cfg.image_size)
        normalize = Normalizer(self.cfg.mean, self.cfg.std, self.device)
        return torch.cat([o.cpu() for o in batched_logits(self.module, x, normalize, self.device, self.precision)])

    def predict(self, images: Any) -> Prediction:
        """``images``: uint8 H x W x 3 arrays (one, or a stack N x H x W x 3), PIL images, or float tensors in
        [0, 1] shaped 3 x H x W or N x 3 x H x W."""
        return self.prediction(self.logits(images))

    def prediction(self, logits: torch.Tensor) -> Prediction:
        """The prediction of logits over ``classes`` (from ``logits`` or from a batched forward elsewhere)."""
        probs = logits.float().cpu().softmax(1)
        pos = probs.argmax(1).tolist()
        names = self.class_names
        return Prediction([self.classes[p] for p in pos], [names[p] for p in pos], probs, self.classes, names)

    def export(
        self,
        path: str | Path,
        precision: str = "fp32",
        quantize: str | None = None,
        data_root: str | Path | None = None,
        calibration: int | None = None,
    ) -> None:
        """Write the model, in the format ``path``'s extension names: ``.pt2``, a ``torch.export`` program (CPU, fp32
        weights; ``bf16``: the graph runs under bfloat16 autocast), or ``.onnx`` (fp32; ``quantize="int8"``: int8,
        calibrated on ``data_root``'s training images of the query's classes, see ``PoE.query.onnx_export``).
        Either takes float RGB in [0, 1], N x 3 x S x S, and returns logits over ``classes``."""
        target = check_export_path(path)
        if target.suffix.lower() == ".onnx":
            from PoE.query import onnx_export

            if precision != "fp32":
                raise PoEError(f"{precision} is a .pt2 export precision; an .onnx file is fp32, or int8 with quantize")
            n = onnx_export.CALIBRATION_IMAGES if calibration is None else calibration
            data = onnx_export.onnx_bytes(self, quantize, data_root, n)
            atomic_write(target, lambda f: f.write(data))
            return
        if quantize is not None:
            raise PoEError(f"quantize={quantize!r} is for .onnx files; {target.name} is a .pt2 (torch.export) file")
        program = self.program(precision)
        atomic_write(target, lambda f: torch.export.save(program, f), buffered=True)

    def program(self, precision: str = "fp32") -> torch.export.ExportedProgram:
        """``export``'s program, in memory (the HTTP service keeps it as bytes: no disk, so no disk-full)."""
        # tracing must not touch shared modules
        family = family_of(self.cfg)
        module = private_copy(self.module, fold=precision == "fp32", family=family)
        wrapped = RawInput(module, self.cfg.mean, self.cfg.std, self.cfg.image_size, precision).eval()
        size = self.cfg.image_size  # a fixed example: the same model exports to the same archive in any process
        example = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        dims = {0: torch.export.Dim("batch", min=1, max=1 << 16)}
        dims |= {i: torch.export.Dim(n, min=family.min_input, max=4096) for i, n in ((2, "height"), (3, "width"))}
        with torch.no_grad(), ieee_fp32():  # TF32 switches in the one state torch.export accepts, then restored
            return torch.export.export(wrapped, (example,), dynamic_shapes=(dims,))


def private_copy(module: nn.Module, fold: bool, family: Family) -> nn.Module:
    """A CPU copy in contiguous (not channels_last) layout, what ``torch.export.save`` stores cleanly; with
    ``fold``, BatchNorm folded into the convolutions it follows (fp32 only: folded weights rounded to bf16
    moved 1.4% of predictions, against 0.8% without folding)."""
    import copy

    module = copy.deepcopy(module).cpu().eval()
    return (family.fold(module) if fold else module).to(memory_format=torch.contiguous_format)


EXPORT_FORMATS = (".pt2", ".onnx")


def check_export_path(path: str | Path) -> Path:
    """Refuse, before any work, a path that cannot be written (a folder, a missing or read-only parent) or whose
    extension names no format (``EXPORT_FORMATS``)."""
    if not str(path).strip():
        raise PoEError(f"--export needs a file name ending in {' or '.join(EXPORT_FORMATS)}, got an empty path")
    target = Path(path)
    if target.is_dir():
        raise PoEError(f"--export {path} is a folder; give a file name such as model.pt2 or model.onnx")
    if target.suffix.lower() not in EXPORT_FORMATS:
        raise PoEError(
            f"--export {path}: the extension names the format; accepted: FILE.pt2 (a torch.export "
            "program) or FILE.onnx (ONNX)"
        )
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise PoEError(f"cannot export to {path}: folder {parent} does not exist")
    try:
        check_writable(parent)
    except PoEError as e:
        raise PoEError(f"cannot export to {path}: {e}") from None
    return target


class Pool:
    """The library and every expert of one pool folder, loaded and checked, on ``device``."""

    def __init__(
        self,
        cfg: DatasetConfig,
        paths: PoolPaths,
        device: torch.device,
        precision: str = "fp32",
        contents: Contents | None = None,
    ) -> None:
        t0 = time.perf_counter()
        self.cfg, self.paths, self.device = cfg, paths, torch.device(device)
        self.precision = resolve_precision(precision, self.device)  # fp32, bf16 or auto; fp8 and others refused
        contents = Contents.read(paths) if contents is None else contents  # the table of contents checked against
        self.signature = contents.signature  # the manifest's state before it was read: a server reloads on a change
        self.digest = contents.digest  # the root digest: what --pool_digest pins
        self.pinned: str | None = None  # the digest this pool was opened against (``open``'s expected_digest)
        notes = self.check_tasks(contents)
        listed = [
            t
            for t in paths.experts_present()
            if t in cfg.tasks or contents.hierarchy is None or contents.lists(paths.expert(t))
        ]
        for task in sorted(set(paths.experts_present()) - set(listed)):  # left by an interrupted add or remove
            notes.append(
                f"{paths.expert(task)} is ignored: task {task!r} is not in the hierarchy {paths.manifest} "
                "records (an add stopped before its commit, or a remove before it deleted the file); finish "
                "by running the command again, or delete the file"
            )
        contents.check_complete([paths.library, *map(paths.expert, listed)])
        self.library, self.library_meta = read_library(paths, cfg, contents)
        self.experts: dict[str, nn.Module] = {}
        self.expert_meta: dict[str, dict[str, Any]] = {}
        for task in listed:
            if task not in cfg.tasks:
                lost = (
                    ""
                    if (paths.root / "hierarchy.json").exists()
                    else (" (a pool built with --hierarchy keeps its tasks in hierarchy.json, which this one lacks)")
                )
                raise PoEError(
                    f"{paths.expert(task)} is not a task of this pool{lost}; known tasks: {', '.join(cfg.tasks)}"
                )
            self.experts[task], self.expert_meta[task] = read_expert(
                paths, cfg, task, self.library, self.library_meta, contents
            )
        for m in (self.library, *self.experts.values()):  # channels_last weights: the fast layout for convolutions
            m.to(self.device, memory_format=torch.channels_last)
        self.states = {t: e.state_dict() for t, e in self.experts.items()}  # what a query's bank is cut from
        self._banks: OrderedDict[tuple[str, ...], nn.Module] = OrderedDict()
        self.open_ms = (time.perf_counter() - t0) * 1e3  # reading and checking every part
        unchecked = [paths.library.name] if "id" not in self.library_meta else []
        unchecked += [f"expert_{t}.pt" for t, m in self.expert_meta.items() if "id" not in m]
        self.notes = notes + (
            [
                f"{len(unchecked)} part(s) carry no content hash (e.g. {unchecked[0]}; the original release's "
                "format): they were loaded but could not be checked"
            ]
            if unchecked
            else []
        )

    def check_tasks(self, contents: Contents) -> list[str]:
        """Refuse tasks other than the ones the manifest records; notes on ``hierarchy.json``, its readable copy."""
        if contents.hierarchy is None:
            return []
        given = tasks_hierarchy(self.cfg)
        recorded = current_hierarchy(self.cfg, self.paths.root, contents.hierarchy)
        if given.id != recorded.id:
            raise PoEError(
                f"the tasks given ({len(given.tasks)}, hierarchy {given.id}) are not the ones "
                f"{self.paths.manifest} records ({len(recorded.tasks)}, hierarchy {recorded.id}); open "
                "the pool with Pool.open, which reads them from there"
            )
        return hierarchy_notes(self.cfg, self.paths.root, recorded)

    @classmethod
    def open(
        cls,
        db: str | Path = "DB_PoE",
        dataset: str = "cifar100",
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        hierarchy: str | Path | Hierarchy | Mapping | None = None,
        skip_bad_images: bool = False,
        expected_digest: str | None = None,
    ) -> Pool:
        """``db`` is a folder holding ``<dataset>/`` (as ``DB_PoE``) or a pool folder itself. The tasks are the
        hierarchy the pool stores (else the dataset's built-in ones); a different ``hierarchy`` is refused. A
        folder dataset is as the pool describes it (``skip_bad_images``: when its test images are read).
        ``expected_digest``: refuse any pool whose root digest (``digest``, shown by ``--list``) is another."""
        pinned = check_digest_text(expected_digest)
        cfg = get_dataset(dataset)
        paths = resolve_pool(db, cfg.name, cfg.tag)
        contents = Contents.read(paths)  # read once: the tasks and the parts come from the same manifest
        if pinned is not None and contents.digest != pinned:
            raise PoEError(
                f"the pool {paths.root} has digest {contents.digest}, not the pinned {pinned} "
                "(--pool_digest): it is another pool, or it was changed"
            )
        cfg = described_by_pool(cfg, paths.root, skip_bad_images)  # dataset.json: checked by Contents.read
        cfg = pool_hierarchy(cfg, paths.root, given_hierarchy(hierarchy, cfg), contents).apply(cfg)
        pool = cls(cfg, paths, torch.device(device), precision, contents)
        pool.pinned = pinned
        return pool

    @property
    def root(self) -> Path:
        return self.paths.root

    @property
    def id(self) -> str | None:
        return self.library_meta.get("id")

    def part_id(self, task: str | None = None) -> str:
        """The content id of the library (``task`` None) or of ``task``'s expert: the recorded one, or computed
        for the original release's bare files, which record none."""
        if task is None:
            return self.library_meta.get("id") or state_id(self.library)
        return self.expert_meta[task].get("id") or state_id(self.experts[task])

    def make_query(self, tasks: list[str]) -> Query:
        if isinstance(tasks, str) or not isinstance(tasks, list | tuple) or not all(isinstance(t, str) for t in tasks):
            raise PoEError(f"a query is a list of task names, e.g. ['people', 'vehicles_1'], got {tasks!r}")
        query = make_query(list(tasks), self.cfg.tasks, self.cfg.name)
        missing = [t for t in query.tasks if t not in self.experts]
        if missing:
            raise PoEError(f"missing {self.paths.expert(missing[0])}; {how_to_make(self.cfg, missing[0])}")
        return query

    def bank(self, tasks: list[str], cached: bool = False) -> nn.Module:
        """The experts of ``tasks`` (known to be here) as one bank, in this order, in eval mode. ``cached``: kept
        for the next call with the same tasks (the last 32 task lists; the service's batches ask again and again)."""
        key = tuple(tasks)
        if cached and key in self._banks:
            self._banks.move_to_end(key)
            return self._banks[key]
        bank = bank_of([self.experts[t] for t in tasks], [self.states[t] for t in tasks])
        if cached:
            self._banks[key] = bank
            while len(self._banks) > 32:
                self._banks.popitem(last=False)
        return bank

    def query(self, tasks: list[str]) -> TaskModel:
        """Consolidate the library and the experts of ``tasks`` into one network: the shared library and a new
        bank of the experts' weights (concatenated once per query; no training, no disk)."""
        t0 = time.perf_counter()
        query = self.make_query(tasks)
        module = ConsolidatedNet(self.library, self.bank(list(query.tasks)), query)
        module.training = False  # its parts are in eval mode already; .eval() would walk every one of them
        module.order = module.order.to(self.device)
        ms = (time.perf_counter() - t0) * 1e3
        model = TaskModel(module, query, self.cfg, self.device, ms, self.precision)
        model.pool = self
        return model

    def describe(self) -> dict[str, Any]:
        """Dataset, library and, per task, its classes (id and name), whether its expert is here and its
        accuracy on its own task (as recorded in the expert's file, in % to 2 decimals: the file holds float32
        noise such as 68.00000071525574)."""
        tasks = []
        for task, classes in self.cfg.tasks.items():
            meta = self.expert_meta.get(task, {})
            acc = meta.get("test_acc")
            tasks.append(
                {
                    "name": task,
                    "classes": [{"id": c, "name": self.cfg.class_name(c)} for c in classes],
                    "present": task in self.experts,
                    "accuracy": None if acc is None else round(float(acc), 2),
                }
            )
        return {
            "dataset": self.cfg.name,
            "pool": str(self.root),
            "library_id": self.id,
            "pool_digest": self.digest,
            "experts_present": len(self.experts),
            "tasks": tasks,
            "notes": self.notes,
        }
