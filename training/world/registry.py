"""The world-model registry and the cached world folder.

A *world model* is one pretrained component (autoencoder, a backbone, the world CLIP, ...). Each is registered once
with a builder, its settings for the ``full`` and ``quick`` worlds, and the models it depends on::

    register(WorldModel("flux_kontext", build_flux_kontext, configs={"full": {...}, "quick": {...}},
                        depends=("autoencoder",), description="FLUX.1-Kontext-like transformer ..."))

A built world is one folder (default ``outputs/world/v<version>-<full|quick>-s<seed>``, or ``$ANALOGY_WORLD_CACHE``
as the parent, or a path given) holding one sub-folder per model and ``world.json`` (the manifest). A model is
rebuilt only when its *key* changes: the hash of the world version, the model's name, version and settings, the seed
and its dependencies' keys (a setting added later, declared in ``late_settings`` with the value that builds what the
earlier keys stand for, is left out of the key at that value: a new probe setting keeps every cache). Each model is
written to a temporary folder and renamed when complete, so an interrupted build never leaves a half-written model
that a later run would reuse.

**Overrides** (``--world-set flux_kontext.heads=6`` on the world's and the yardstick's commands) change one setting of
one model for a probe: the overridden models and everything depending on them get new keys, and the world goes to
its own folder (``v<version>-<size>-s<seed>-x<hash of the overrides>``), so a probe never replaces the default
world's models. The overrides are recorded in the manifest; an overridden model's build record holds the settings it
was built with.

A builder receives a :class:`BuildContext` (its output folder, settings, seed, the folders of its dependencies) and
returns a JSON-able dict of measurements (errors, accuracies) that goes into its ``build.json``. Builders seed
themselves, so models can be built side by side in processes of their own (``jobs``, :func:`build_side_by_side`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from filelock import FileLock

from training.world.scenes import WORLD_VERSION

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parent.parent.parent
BUILD_FILE = "build.json"
MANIFEST = "world.json"
LOCK_SUFFIX = ".lock"  # .<model>.lock, .world.json.lock: held while one process builds or writes it


@dataclass(frozen=True)
class BuildContext:
    name: str
    folder: Path                     # write everything here (a temporary folder, renamed when the build succeeds)
    config: dict
    seed: int
    quick: bool
    dependencies: dict[str, Path]    # name -> folder of each built dependency

    def dependency(self, name: str) -> Path:
        return self.dependencies[name]


@dataclass(frozen=True)
class WorldModel:
    name: str
    build: Callable[[BuildContext], dict]
    configs: dict[str, dict]         # "full" and "quick" settings
    depends: tuple[str, ...] = ()
    version: int = 1                 # bump when the builder changes what it writes
    description: str = ""
    # settings added after this version's builds were keyed, each with the value that builds what those keys stand
    # for: left out of the key at that value, so adding a probe setting never rebuilds a cached model
    late_settings: dict = field(default_factory=dict)
    # rough seconds to build the full world's model on 2 cores: side by side, the costliest ready model starts first
    # (only the order; what a model is never depends on it)
    cost: float = 0.0


WORLD_MODELS: dict[str, WorldModel] = {}


def register(model: WorldModel) -> WorldModel:
    missing = {"full", "quick"} - set(model.configs)
    if missing:
        raise ValueError(f"world model {model.name}: configs lack {sorted(missing)}")
    WORLD_MODELS[model.name] = model
    return model


def _registered(name: str) -> WorldModel:
    if name not in WORLD_MODELS:
        raise ValueError(f"unknown world model {name!r}; registered: {', '.join(WORLD_MODELS)}")
    return WORLD_MODELS[name]


def build_order(names: list[str]) -> list[str]:
    """``names`` and their dependencies, dependencies first."""
    order: list[str] = []

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in chain:
            raise ValueError(f"world models depend on each other in a cycle: {' -> '.join(chain + (name,))}")
        if name in order:
            return
        for dep in _registered(name).depends:
            visit(dep, chain + (name,))
        order.append(name)

    for name in names:
        visit(name, ())
    return order


Overrides = dict[str, dict[str, object]]  # model -> {setting: value}


def parse_overrides(items: list[str] | None) -> Overrides:
    """``["model.setting=value", ...]`` -> ``{model: {setting: value}}``. The model must be registered, the setting one
    of its settings, the value a JSON literal of the setting's type (an int is accepted for a float)."""
    out: Overrides = {}
    for item in items or []:
        name, sep, text = item.partition("=")
        model_name, dot, setting = name.strip().partition(".")
        if not sep or not dot or not setting:
            raise ValueError(f"a world override is model.setting=value (e.g. flux_kontext.heads=6), got {item!r}")
        model = _registered(model_name)
        current = model.configs["full"].get(setting, model.configs["quick"].get(setting))
        if current is None:
            raise ValueError(f"world model {model_name} has no setting {setting!r}; its settings: "
                             f"{', '.join(sorted(model.configs['full']))}")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        if not _same_type(value, current):
            kind = type(current).__name__
            raise ValueError(f"{model_name}.{setting} takes a value of type {kind} (now {current!r}), got {text!r}")
        out.setdefault(model_name, {})[setting] = float(value) if isinstance(current, float) else value
    return out


def _same_type(value: object, current: object) -> bool:
    if isinstance(current, bool) or isinstance(value, bool):
        return isinstance(current, bool) and isinstance(value, bool)
    if isinstance(current, float):
        return isinstance(value, (int, float))
    return type(value) is type(current)


def model_config(name: str, quick: bool, overrides: Overrides | None = None) -> dict:
    """A model's settings for the world size, with any overrides applied."""
    return {**_registered(name).configs["quick" if quick else "full"], **(overrides or {}).get(name, {})}


def overrides_tag(overrides: Overrides | None) -> str:
    """The folder suffix of an overridden world ("" without overrides)."""
    if not overrides:
        return ""
    return "-x" + hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:8]


def default_root() -> Path:
    return Path(os.environ.get("ANALOGY_WORLD_CACHE") or REPO / "outputs" / "world")


def world_folder(quick: bool, seed: int, root: Path | None = None, overrides: Overrides | None = None) -> Path:
    name = f"v{WORLD_VERSION}-{'quick' if quick else 'full'}-s{seed}{overrides_tag(overrides)}"
    return Path(root or default_root()) / name


def model_key(name: str, quick: bool, seed: int, dependency_keys: dict[str, str],
              overrides: Overrides | None = None) -> str:
    model = _registered(name)
    config = {k: v for k, v in model_config(name, quick, overrides).items()
              if not (k in model.late_settings and v == model.late_settings[k])}
    payload = json.dumps({"world": WORLD_VERSION, "model": name, "version": model.version, "seed": seed,
                          "config": config,
                          "depends": {d: dependency_keys[d] for d in model.depends}}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class World:
    """A built world folder: ``path(name)`` is the folder of one model, ``builds[name]`` its build record."""

    root: Path
    quick: bool
    seed: int
    builds: dict[str, dict] = field(default_factory=dict)
    overrides: Overrides = field(default_factory=dict)

    def path(self, name: str) -> Path:
        if name not in self.builds:
            raise KeyError(f"world model {name} is not built in {self.root}")
        return self.root / name

    @property
    def spec(self) -> str:
        """The ``world:<folder>`` spec the trainers' ``backbone`` / ``query_encoder`` options accept."""
        return f"world:{self.root}"


def _read_build(folder: Path) -> dict | None:
    try:
        return json.loads((folder / BUILD_FILE).read_text())
    except (OSError, ValueError):
        return None


def build_world(models: list[str] | None = None, quick: bool = False, seed: int = 0, root: Path | None = None,
                force: bool = False, overrides: Overrides | None = None, jobs: int = 1) -> World:
    """Build (or reuse) the named world models and their dependencies; returns the world. ``overrides`` (from
    :func:`parse_overrides`) change settings of the named models, in a folder of their own. ``jobs`` > 1: the models
    to build are built that many at a time (:func:`build_side_by_side`; not for an overridden world, nor with
    ``force``: a forced rebuild replaces the dependencies others read, so it goes one model after another)."""
    overrides = {name: dict(values) for name, values in (overrides or {}).items() if values}
    for name in overrides:
        _registered(name)
    folder = world_folder(quick, seed, root, overrides)
    names = build_order(models or list(WORLD_MODELS))
    # an overridden world copies the models the overrides leave as they are from the default world (built there
    # first if need be), so a probe of one model's setting never retrains the others
    keys = _keys(names, quick, seed, overrides)
    base = None
    if overrides:  # the unchanged models this folder lacks, made (or found) in the default world, never forced there
        default = _keys(names, quick, seed, None)
        to_copy = [n for n in names if keys[n] == default[n]
                   and (force or (_read_build(folder / n) or {}).get("key") != keys[n])]
        base = build_world(to_copy, quick, seed, root) if to_copy else None
    folder.mkdir(parents=True, exist_ok=True)
    if jobs > 1 and not overrides and not force:  # (a forced rebuild, one after another: it replaces dependencies)
        build_side_by_side(folder, names, keys, quick, seed, jobs)
    world = World(folder, quick, seed, overrides=overrides)
    for name in names:
        # one builder per model folder at a time (two benches, or two test workers, sharing a cache): a second
        # waits, then reuses what the first built; other models of the world build meanwhile
        with FileLock(str(folder / f".{name}{LOCK_SUFFIX}")):
            world.builds[name] = _build_model(folder, name, keys, quick, seed, overrides, force, base)
    with FileLock(str(folder / f".{MANIFEST}{LOCK_SUFFIX}")):
        manifest = {"world_version": WORLD_VERSION, "quick": quick, "seed": seed, "overrides": overrides,
                    "models": {**(_read_manifest(folder).get("models", {})),
                               **{n: {"key": r["key"], "seconds": r["seconds"]} for n, r in world.builds.items()}}}
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return world


def build_side_by_side(folder: Path, names: list[str], keys: dict[str, str], quick: bool, seed: int,
                       jobs: int) -> None:
    """Build the models of ``names`` that ``folder`` lacks, at most ``jobs`` at a time, each as soon as the models it
    depends on are built (the costliest ready one first, ``WorldModel.cost``): a ``python -m training.world build
    --models <name>`` run (forked from the launch server, :func:`~training.world.launch.run_module`), its output in
    ``folder/.build_<name>.log``, each with the cores shared among ``min(jobs, models to build)`` (fixed when the build begins, so a model's threads never depend on
    timing; ``build.json`` records them). Every builder seeds itself, so a model is built as it is alone, but for the
    rounding of its thread count. A failed build keeps the others from starting; those running finish, then it is
    raised."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    from training.world.launch import available_cores, run_module, thread_env

    pending = [n for n in names if (_read_build(folder / n) or {}).get("key") != keys[n]]
    if len(pending) < 2:
        return
    built = set(names) - set(pending)
    threads = max(1, available_cores() // min(jobs, len(pending)))
    log.info("world: building %s, at most %d at a time, %d threads each", ", ".join(pending), jobs, threads)

    def build(name: str) -> None:
        argv = ["build", "--models", name, "--seed", str(seed), "--root", str(folder.parent.resolve()), "--jobs", "1",
                *(["--quick"] if quick else [])]
        logfile = folder / f".build_{name}.log"
        log.info("world model %s: building in a process of its own (%d threads), log %s", name, threads, logfile)
        status = run_module("training.world", argv, logfile, env=thread_env(threads, {**os.environ,
                                                                                       "TQDM_DISABLE": "1"}))
        if status:
            tail = logfile.read_text()[-3000:] if logfile.is_file() else "(no log)"
            raise RuntimeError(f"building world model {name} failed ({status}), {logfile}:\n{tail}")

    running: dict = {}
    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="world-build") as pool:
        while pending or running:
            ready = sorted((n for n in pending if set(_registered(n).depends) <= built),
                           key=lambda n: -_registered(n).cost)
            for name in ready[:jobs - len(running)]:
                pending.remove(name)
                running[pool.submit(build, name)] = name
            if not running:
                raise RuntimeError(f"world models {pending} depend on models that are not built")
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                name = running.pop(future)
                if future.exception() is not None:
                    pending.clear()  # start nothing else; leaving the pool waits for the builds running
                    raise future.exception()
                built.add(name)


def _link_or_copy(source: str, destination: str) -> None:
    """A hard link where the file system allows one (a built model's files are never rewritten in place: a rebuild
    writes a new folder and renames it), else a copy."""
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def _keys(names: list[str], quick: bool, seed: int, overrides: Overrides | None) -> dict[str, str]:
    """Each model's key (``names`` in build order)."""
    keys: dict[str, str] = {}
    for name in names:
        keys[name] = model_key(name, quick, seed, keys, overrides)
    return keys


def _build_model(folder: Path, name: str, keys: dict[str, str], quick: bool, seed: int, overrides: Overrides,
                 force: bool, base: World | None) -> dict:
    """Reuse, copy from ``base`` or build one model into ``folder / name``; returns its build record."""
    model, key = WORLD_MODELS[name], keys[name]
    target = folder / name
    record = _read_build(target)
    if record and record.get("key") == key and not force:
        log.info("world model %s: reusing %s", name, target)
        return record
    tmp = folder / f".tmp_{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    if base is not None and base.builds.get(name, {}).get("key") == key:
        with FileLock(str(base.root / f".{name}{LOCK_SUFFIX}")):  # no builder of the default world replaces it now
            shutil.copytree(base.path(name), tmp, copy_function=_link_or_copy)
        record = _read_build(tmp)
        if (record or {}).get("key") != key:
            raise RuntimeError(f"world model {name}: the copy from {base.root} holds another build (key "
                               f"{(record or {}).get('key')}, expected {key}); build the world again")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        log.info("world model %s: copied from %s (the overrides leave it as it is)", name, base.root)
        return record
    tmp.mkdir(parents=True)
    config = model_config(name, quick, overrides)
    log.info("world model %s: building (%s world, seed %d) ...", name, "quick" if quick else "full", seed)
    started = time.monotonic()
    metrics = model.build(BuildContext(name, tmp, config, seed, quick, {d: folder / d for d in model.depends}))
    record = {"key": key, "name": name, "version": model.version, "world_version": WORLD_VERSION, "seed": seed,
              "quick": quick, "config": config, "depends": {d: keys[d] for d in model.depends},
              "seconds": round(time.monotonic() - started, 1), "threads": _torch_threads(), "metrics": metrics,
              "description": model.description}
    (tmp / BUILD_FILE).write_text(json.dumps(record, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    log.info("world model %s: built in %.0f s: %s", name, record["seconds"], json.dumps(metrics))
    return record


def _torch_threads() -> int:
    import torch  # the builders have imported it

    return torch.get_num_threads()


def _read_manifest(folder: Path) -> dict:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}


def open_world(folder: str | Path) -> World:
    """A world folder written by :func:`build_world` (read only; no building)."""
    folder = Path(folder)
    manifest = _read_manifest(folder)
    if not manifest:
        raise FileNotFoundError(f"{folder} is not a built analogy world (no {MANIFEST}); build one with "
                                f"`python -m training.world build`")
    world = World(folder, bool(manifest.get("quick")), int(manifest.get("seed", 0)),
                  overrides=dict(manifest.get("overrides") or {}))
    for name in manifest.get("models", {}):
        record = _read_build(folder / name)
        if record:
            world.builds[name] = record
    return world
