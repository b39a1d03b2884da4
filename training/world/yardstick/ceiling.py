"""A ceiling for every family: the best a row's backbone does when taught one training family directly.

The yardstick's rows learn every training family at once from analogies; a ceiling says how much of what they miss
the backbone (and the world's autoencoder) could have drawn at all. Per training family, a **plain LoRA of the
method's per-layer rank budget** is trained on that family alone, with the row's own trainer (a process of its own, the same
command a user types), and B′ is sampled on the row's held-out scenes with the row's sampler, steps and seed. Scored
like every B′ (:mod:`training.world.metrics`)::

    families.<f>.ceiling = {"lora": {"edited_cells", "kept_cells", "error", "train_steps", "train_seconds",
                                     "train_threads"}}

(``error``: mean absolute pixel error against the true B′; ``train_seconds``: of the run that trained the cached
LoRA; ``train_threads``: its torch threads when trained beside others, null for the process's default.) The second ceiling, a **full fine-tune** of the backbone on one family (``"full"``, the same fields), is
computed for rows whose ``Ceiling`` has a ``full`` one (every row with a LoRA: each trainer's ``full_finetune``), on
the full world by default (the quick world may skip it; ``full=True`` forces it).

A row adds its ceiling by giving its :class:`~training.world.yardstick.common.Method` a :class:`Ceiling`: the
trainer module, the settings of one family's run, and how to sample B′ with the file that run wrote (LoRWeB's
:data:`training.world.yardstick.lorweb.CEILING`, LoRA of Change's :data:`training.world.yardstick.loc.CEILING`, Edit
Transfer's :func:`training.world.yardstick.edit_transfer.row_ceiling`). Rows that differ only in how they sample
(Edit Transfer's two samplers) share their ceiling runs (``Ceiling.shared_as``).

**Probes** (``bench.analogy_world`` options): ``steps`` (``--ceiling-steps``), trainer settings of every ceiling or of
one kind (``--ceiling-set key=value``, ``full.key=value``, ``lora.key=value``) and the LoRA's rank (``--ceiling-rank``:
the ceiling is then no longer of the row's rank budget, and the JSON says so in ``extra.ceiling_rank``).

**Cache.** A trained ceiling LoRA is kept in ``<root>/<method>-<family>-<key>/`` where ``root`` is the world folder's
``ceilings/`` (or ``$ANALOGY_CEILING_CACHE``, or a folder given) and ``key`` hashes the ceiling's version, the world
version, the build keys of the world models it uses, its trainer settings (with the world's path taken out: the build
keys say which world it is), the family and the seed. Each run is written to a temporary folder and renamed when
complete, so an interrupted run is never reused. Only training is cached; B′ is sampled again on every run (seconds),
so the ceiling is always scored on exactly the row's scenes.

**Lanes** (``--ceiling-jobs N``, default the cores available). The yardstick queues every selected row's missing
ceiling runs before the rows train (:class:`CeilingQueue`): N lanes, each a trainer process with ``cores // N``
torch threads; the rows' own training and sampling hold one lane (its threads) while the others train ceilings, and
every lane trains ceilings once the rows are done; each row's ceilings are then scored. Fewer lanes when fewer runs
are missing (the rows hold one); with none missing, or ``N = 1``, there is no queue: the rows keep every core and each
row's ceilings are trained after the rows, one after another.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from training.world import evaluate as ev
from training.world import metrics
from training.world import scenes as world_def
from training.world.launch import available_cores
from training.world.presets import lane_threads, run_trainer
from training.world.registry import World
from training.world.yardstick.common import Ceiling, MethodContext, losses_from_log, parse_settings

log = logging.getLogger(__name__)
RECORD = "ceiling.json"
ENV_ROOT = "ANALOGY_CEILING_CACHE"


def cache_root(world: World, root: Path | None = None) -> Path:
    return Path(root or os.environ.get(ENV_ROOT) or world.root / "ceilings")


def cache_key(method: str, ceiling: Ceiling, world: World, settings: dict, family: str, seed: int) -> str:
    """The hash that names a ceiling run (see the module docstring)."""
    portable = json.loads(json.dumps(settings, sort_keys=True, default=str).replace(str(world.root), "<world>"))
    payload = json.dumps({"method": method, "version": ceiling.version, "world": world_def.WORLD_VERSION,
                          "quick": world.quick, "models": {m: world.builds[m]["key"] for m in ceiling.world_models},
                          "settings": portable, "family": family, "seed": seed}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


# What makes a ceiling the ceiling of its row and family: not to be overridden (steps: ``steps``).
FIXED_SETTINGS = frozenset({"data", "num_entries", "rank", "seed", "backbone", "query_encoder", "image_encoder",
                            "plain_lora", "lora_reverse", "random_exchange", "text_free", "full_finetune", "max_steps",
                            "checkpoint_every", "sample_every"})


def refuse_fixed(keys) -> None:
    """Raise if any of ``keys`` is one of :data:`FIXED_SETTINGS`."""
    fixed = sorted(FIXED_SETTINGS & set(keys))
    if fixed:
        raise ValueError(f"{', '.join(fixed)}: what defines the ceiling (its family, rank budget, seed, backbone or "
                         f"steps) cannot be overridden; steps: --ceiling-steps")


KINDS = ("lora", "full")  # the two ceilings; ``<kind>.key=value`` sets a trainer setting of that kind's runs only


def for_kind(overrides: dict[str, object] | None, kind: str) -> dict[str, object]:
    """The settings of ``overrides`` that apply to ``kind``'s runs: the unprefixed ones and ``<kind>.key``'s (as
    ``key``)."""
    out = {}
    for key, value in (overrides or {}).items():
        prefix, dot, name = key.partition(".")
        if not dot:
            out[key] = value
        elif prefix == kind:
            out[name] = value
    return out


def parse_setting_overrides(items: list[str] | None) -> dict[str, object]:
    """``["key=value", ...]`` (``--ceiling-set learning_rate=2e-3``; ``full.key=value`` or ``lora.key=value`` for one
    kind of ceiling only) -> trainer settings (:func:`~training.world.yardstick.common.parse_settings`), refusing
    those that define a ceiling and prefixes that name no ceiling."""
    out = parse_settings(items, "learning_rate=2e-3")
    for key in out:
        prefix, dot, _ = key.partition(".")
        if dot and prefix not in KINDS:
            raise ValueError(f"--ceiling-set {key}: a prefix names one kind of ceiling ({', '.join(KINDS)}), "
                             f"not {prefix!r}")
    for kind in KINDS:
        refuse_fixed(for_kind(out, kind))
    return out


def ceiling_settings(ceiling: Ceiling, world: World, family: str, seed: int, steps: int | None = None,
                     overrides: dict[str, object] | None = None, rank: int | None = None) -> dict:
    """The trainer settings of one family's ceiling run; ``steps`` replaces the row's training steps (a larger budget),
    ``overrides`` other trainer settings (e.g. the learning rate; never those in :data:`FIXED_SETTINGS`) and ``rank``
    the LoRA's per-layer rank (a probe of what the row's rank budget costs: the ceiling is then no longer the row's).
    The cache key changes with each, so each variant is trained and kept once."""
    settings = ceiling.settings(world, world.quick, family, seed)
    refuse_fixed(overrides or {})
    settings = {**settings, **(overrides or {})}
    if rank is not None:
        settings = {**settings, "rank": checked_rank(settings, rank)}
    if steps is not None:
        if steps < 1:
            raise ValueError(f"ceiling steps must be at least 1, got {steps}")
        settings = {**settings, "max_steps": steps, "checkpoint_every": steps, "sample_every": steps}
    return settings


def checked_rank(settings: dict, rank: int) -> int:
    """``rank`` if ``settings`` train one LoRA whose per-layer rank is ``settings["rank"]``, else a ValueError."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"a ceiling's rank must be a positive integer, got {rank!r}")
    if "rank" not in settings or int(settings.get("num_entries", 1)) != 1 or settings.get("full_finetune"):
        raise ValueError("this ceiling does not train one LoRA of a single per-layer rank, so it has no rank to change "
                         f"(settings: rank={settings.get('rank')!r}, num_entries={settings.get('num_entries', 1)!r}, "
                         f"full_finetune={settings.get('full_finetune', False)!r})")
    return rank


def cache_entry(method: str, ceiling: Ceiling, world: World, family: str, seed: int, root: Path | None = None,
                steps: int | None = None, overrides: dict[str, object] | None = None,
                rank: int | None = None) -> tuple[Path, str, dict, dict | None]:
    """(folder, key, trainer settings, the cached record or None) of ``family``'s ceiling run."""
    settings = ceiling_settings(ceiling, world, family, seed, steps, overrides, rank)
    name = ceiling.shared_as or method
    key = cache_key(name, ceiling, world, settings, family, seed)
    folder = cache_root(world, root) / f"{name}-{family}-{key}"
    try:
        record = json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        record = None
    return folder, key, settings, record if record is not None and record.get("key") == key else None


def trained(method: str, ceiling: Ceiling, world: World, family: str, seed: int, root: Path | None = None,
            steps: int | None = None, overrides: dict[str, object] | None = None,
            rank: int | None = None, threads: int | None = None) -> tuple[Path, dict]:
    """The folder of ``family``'s ceiling run and its record, training it unless the cache holds it (``threads``: a
    run beside others, :class:`CeilingQueue`)."""
    folder, key, settings, record = cache_entry(method, ceiling, world, family, seed, root, steps, overrides, rank)
    if record is not None:
        log.info("ceiling %s/%s: reusing %s", method, family, folder)
        return folder, {**record, "cached": True}
    tmp = folder.with_name(f".tmp_{folder.name}_{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("ceiling %s/%s: training (%s steps) ...", method, family, settings.get("max_steps"))
    seconds = run_trainer(ceiling.module, settings, tmp, threads=threads)
    shutil.rmtree(tmp / "checkpoints", ignore_errors=True)  # the exported file is what is sampled; no resume
    record = {"key": key, "method": method, "family": family, "seed": seed, "train_steps": settings.get("max_steps"),
              "train_seconds": round(seconds, 1), "train_threads": threads, "settings": settings}
    losses = losses_from_log(tmp / "train.log")
    if losses:
        record["loss_first_step"], record["loss_last_step"] = losses
    (tmp / RECORD).write_text(json.dumps(record, indent=2, default=str))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    log.info("ceiling %s/%s: trained in %.0f s", method, family, seconds)
    return folder, {**record, "cached": False}


def scored(method: str, ceiling: Ceiling, world: World, family: str, items: list, seed: int, root: Path | None,
           steps: int | None, overrides: dict[str, object] | None,
           rank: int | None = None) -> tuple[dict, dict, torch.Tensor]:
    """(scores, training record, B′) of one ceiling run (trained or from the cache) on ``items``."""
    folder, record = trained(method, ceiling, world, family, seed, root, steps, overrides, rank)
    b_prime = ceiling.sample(world, world.quick, folder, items, seed)
    truth, b = ev.stack(items, "b_prime"), ev.stack(items, "b")
    scores = {**metrics.cell_scores(b_prime, truth, b), **metrics.kept_cells_by_role(b_prime, truth, b),
              "error": round(float(ev.mae(b_prime, truth).mean()), 5),
              "train_steps": record["train_steps"], "train_seconds": record["train_seconds"],
              "train_threads": record.get("train_threads")}
    return scores, record, b_prime


def measured_kinds(method: str, ceiling: Ceiling, world: World, overrides: dict[str, object] | None,
                   full: bool | None, rank: int | None) -> list[tuple[str, str, Ceiling, dict, int | None]]:
    """(kind, cache name, ceiling, its trainer overrides, its rank) of each ceiling measured per family: the LoRA one,
    and the full fine-tune where the row has one and ``full`` (default: on the full world only; it has no rank)."""
    kinds = [("lora", method, ceiling, for_kind(overrides, "lora"), rank)]
    if ceiling.full is not None and (not world.quick if full is None else full):
        kinds.append(("full", f"{method}_full", ceiling.full, for_kind(overrides, "full"), None))
    return kinds


def family_ceiling(method: str, ceiling: Ceiling, world: World, family: str, items: list, seed: int,
                   root: Path | None = None, steps: int | None = None,
                   overrides: dict[str, object] | None = None, full: bool | None = None,
                   rank: int | None = None) -> dict:
    """``{"lora": {...}}`` of one family on ``items`` (held-out examples), and ``"full"`` where the row has a full
    fine-tune ceiling and ``full`` (default: on the full world only); their B′ under ``"b_prime"`` and
    ``"b_prime_full"`` (tensors: pop them before writing JSON); ``"trained_seconds"``: the seconds spent training now
    (0 when cached). ``rank`` changes the LoRA ceiling's rank only (a full fine-tune has none)."""
    out: dict = {"trained_seconds": 0.0}
    for kind, name, kind_ceiling, kind_overrides, kind_rank in measured_kinds(method, ceiling, world, overrides, full,
                                                                               rank):
        scores, record, b_prime = scored(name, kind_ceiling, world, family, items, seed, root, steps, kind_overrides,
                                         kind_rank)
        out[kind], out["b_prime" if kind == "lora" else f"b_prime_{kind}"] = scores, b_prime
        out.setdefault("cached", record["cached"])  # the LoRA ceiling's
        out["trained_seconds"] += 0.0 if record["cached"] else record["train_seconds"]
    return out


def training_families(examples: dict) -> list[str]:
    """The families a row's ceilings are measured on by default: the training families of ``examples``."""
    return [f for f in examples if world_def.get_family(f).split == "train"]


def missing_runs(method: str, ceiling: Ceiling, world: World, families: list[str], seed: int,
                 root: Path | None = None, steps: int | None = None, overrides: dict[str, object] | None = None,
                 full: bool | None = None, rank: int | None = None) -> dict[Path, tuple]:
    """Every ceiling run of ``families`` the cache lacks: its cache folder -> (cache name, ceiling, family, trainer
    overrides, rank)."""
    out = {}
    for family in families:
        for _, name, kind_ceiling, kind_overrides, kind_rank in measured_kinds(method, ceiling, world, overrides, full,
                                                                               rank):
            folder, _, _, record = cache_entry(name, kind_ceiling, world, family, seed, root, steps, kind_overrides,
                                               kind_rank)
            if record is None:
                out[folder] = (name, kind_ceiling, family, kind_overrides, kind_rank)
    return out


class CeilingQueue:
    """The ceiling runs of several rows, trained in the background ``jobs`` at a time (the lanes), each a process
    with ``available_cores() // jobs`` torch threads (kept in its record as ``train_threads``).

    The rows' own training and sampling take one lane while they run (:meth:`lane`), so the ceilings fill the other
    lanes beside them and every lane once the rows are done (on 2 cores the rows then train 1.5-1.8x slower with one
    thread, so the gain there is small: README, "The ceilings"). A run two rows share (``Ceiling.shared_as``) is trained once, for the row
    that asked first. A failed run keeps the queued ones from starting (those running finish and are cached);
    :meth:`wait` then raises it."""

    def __init__(self, jobs: int, root: Path | None = None, steps: int | None = None,
                 overrides: dict[str, object] | None = None, full: bool | None = None, rank: int | None = None):
        if jobs < 1:
            raise ValueError(f"ceiling jobs must be at least 1, got {jobs}")
        self.jobs, self.threads = jobs, max(1, available_cores() // jobs)
        self.options = dict(root=root, steps=steps, overrides=overrides, full=full, rank=rank)
        self.slots = threading.Semaphore(jobs)
        self.stop = threading.Event()  # set by a failed run: no queued run starts
        self.pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="ceiling")
        self.futures: dict[str, list[Future]] = {}
        self.by_folder: dict[Path, Future] = {}
        self.owner: dict[Future, str] = {}

    def add(self, method: str, ceiling: Ceiling, world: World, families: list[str], seed: int) -> int:
        """Queue ``method``'s ceiling runs that the cache lacks; returns how many it queued (not counting runs another
        row queued already)."""
        opts = self.options
        futures, queued = [], 0
        for folder, (name, kind_ceiling, family, kind_overrides, kind_rank) in missing_runs(
                method, ceiling, world, families, seed, **opts).items():
            if folder not in self.by_folder:
                args = (name, kind_ceiling, world, family, seed, opts["root"], opts["steps"], kind_overrides,
                        kind_rank, self.threads)
                self.by_folder[folder] = self.pool.submit(self._train, args)
                self.owner[self.by_folder[folder]] = method
                queued += 1
            futures.append(self.by_folder[folder])
        self.futures[method] = futures
        log.info("ceilings of %s: %d runs queued, %d lanes, %d threads each", method, queued, self.jobs, self.threads)
        return queued

    def _train(self, args: tuple) -> dict | None:
        with self.slots:
            if self.stop.is_set():
                return None
            started = time.monotonic()
            try:
                return {**trained(*args)[1], "started": started, "ended": time.monotonic()}
            except BaseException:
                self.stop.set()
                raise

    @contextlib.contextmanager
    def lane(self):
        """Hold one lane for the duration of the block (the rows' training and sampling): in it, this process's torch
        and the trainer processes it starts (:func:`~training.world.presets.lane_threads`) use the lane's threads.
        Enter it before :meth:`add`: queued runs start at once on every free lane."""
        saved = torch.get_num_threads()
        with self.slots, lane_threads(self.threads):
            torch.set_num_threads(self.threads)
            try:
                yield
            finally:
                torch.set_num_threads(saved)

    def wait(self, method: str) -> float:
        """Wait for ``method``'s runs; returns the training seconds of those trained for it. If any run failed (this
        row's or another's, which kept this row's from starting), waits for the runs still going, logs every failure
        and raises the first."""
        futures = self.futures.get(method, [])
        failed = [f for f in futures if f.cancelled() or f.exception() is not None or f.result() is None]  # waits
        if failed:
            self.close()
            errors = [f.exception() for f in self.by_folder.values()
                      if f.done() and not f.cancelled() and f.exception() is not None]
            for error in errors:
                log.error("a ceiling run failed: %s", error)
            raise errors[0] if errors else RuntimeError("the ceiling runs were stopped before they ran")
        return sum(f.result()["train_seconds"] for f in self._trained_for(method))

    def _trained_for(self, method: str) -> list[Future]:
        return [f for f in self.futures.get(method, []) if self.owner[f] == method and f.done()
                and not f.cancelled() and f.exception() is None and f.result() is not None
                and not f.result()["cached"]]

    def wall_seconds(self, method: str) -> float:
        """Seconds from the start of the first run trained for ``method`` to the end of its last (0: none trained)."""
        runs = [f.result() for f in self._trained_for(method)]
        return round(max(r["ended"] for r in runs) - min(r["started"] for r in runs), 1) if runs else 0.0

    def close(self) -> None:
        """Start no queued run; wait for those running (they are cached)."""
        self.stop.set()
        if any(f.running() for f in self.by_folder.values()):
            log.info("ceilings: waiting for the runs going to finish (they are kept in the cache) ...")
        self.pool.shutdown(wait=True, cancel_futures=True)


def train_side_by_side(method: str, ceiling: Ceiling, world: World, families: list[str], seed: int, jobs: int,
                       root: Path | None = None, steps: int | None = None,
                       overrides: dict[str, object] | None = None, full: bool | None = None,
                       rank: int | None = None) -> float:
    """Train every ceiling run of ``families`` that the cache lacks, ``jobs`` at a time (fewer when fewer are missing;
    :class:`CeilingQueue`), so that scoring then finds them all cached. Returns the training seconds summed over the
    runs trained."""
    if jobs < 1:
        raise ValueError(f"ceiling jobs must be at least 1, got {jobs}")
    missing = len(missing_runs(method, ceiling, world, families, seed, root, steps, overrides, full, rank))
    if not missing:
        return 0.0
    queue = CeilingQueue(min(jobs, missing), root, steps, overrides, full, rank)
    try:
        queue.add(method, ceiling, world, families, seed)
        return queue.wait(method)
    finally:
        queue.close()


def add_ceilings(method: str, ceiling: Ceiling, ctx: MethodContext, result: dict, families: list[str] | None = None,
                 root: Path | None = None, steps: int | None = None,
                 overrides: dict[str, object] | None = None, full: bool | None = None, rank: int | None = None,
                 jobs: int = 1, queue: CeilingQueue | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Add ``families.<f>.ceiling`` to a row's measured ``result`` for every training family (or ``families``) and
    the means over them to its ``extra``; returns the ceilings' B′ per kind and family (``{"lora": {f: B′}, "full":
    {...}}``, for the pictures; ``full`` empty when not measured). ``rank``: the LoRA ceiling at that per-layer rank
    instead of the row's budget (recorded as ``extra.ceiling_rank``). ``queue``: the row's runs were queued there
    (:class:`CeilingQueue`; its options must be these), so they are waited for; else ``jobs`` > 1: the runs the
    cache lacks are trained that many at a time first (:func:`train_side_by_side`). Either way ``extra.ceiling_jobs``
    records the lanes and ``extra.ceiling_train_wall_seconds_this_run`` the wall time from the start of the first
    run trained for this row to the end of its last (beside the rows and other rows' runs, with a queue)."""
    names = families or training_families(ctx.examples)
    pictures: dict[str, dict[str, torch.Tensor]] = {"lora": {}, "full": {}}
    seconds = 0.0
    if queue is not None:
        seconds = queue.wait(method)
        result["extra"].update(ceiling_jobs=queue.jobs, ceiling_train_wall_seconds_this_run=queue.wall_seconds(method))
    elif jobs != 1:
        started = time.monotonic()
        seconds = train_side_by_side(method, ceiling, ctx.world, names, ctx.seed, jobs, root, steps, overrides, full,
                                     rank)
        result["extra"].update(ceiling_jobs=jobs,
                               ceiling_train_wall_seconds_this_run=round(time.monotonic() - started, 1))
    for family in names:
        out = family_ceiling(method, ceiling, ctx.world, family, ctx.examples[family], ctx.seed, root, steps, overrides,
                             full, rank)
        pictures["lora"][family] = out.pop("b_prime")
        if "b_prime_full" in out:
            pictures["full"][family] = out.pop("b_prime_full")
        out.pop("cached")
        seconds += out.pop("trained_seconds")
        result["families"][family]["ceiling"] = out
    extra = result["extra"]
    for split in ("train", "heldout"):
        rows = [result["families"][f] for f in names if world_def.get_family(f).split == split]
        for kind in ("lora", "full"):
            measured = [r for r in rows if kind in r["ceiling"]]
            if not measured:
                continue
            for name in ("edited_cells", "kept_cells"):
                values = [r["ceiling"][kind][name] for r in measured if r["ceiling"][kind][name] is not None]
                extra[f"mean_ceiling_{kind}_{name}_{split}"] = round(sum(values) / len(values), 4) if values else None
            extra[f"mean_ceiling_{kind}_error_over_no_edit_{split}"] = round(
                sum(r["ceiling"][kind]["error"] / r["no_edit"] for r in measured) / len(measured), 4)
    extra["ceiling_families"] = names
    if overrides:
        extra["ceiling_overrides"] = dict(overrides)
    if rank is not None:
        extra["ceiling_rank"] = rank
    extra["ceiling_train_seconds_this_run"] = round(seconds, 1)
    return pictures
