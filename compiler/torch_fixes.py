"""Workarounds for bugs of torch (and of Triton as Inductor uses it), each applied only
where the installed release has the bug; some are fixed in later torch releases. Part of
optc.compiler.torch_private (which re-exports every name here, and whose rules apply:
private torch APIs only in these two modules, one smoke test per name, and importing
either loads neither Inductor nor Dynamo).
"""

from __future__ import annotations

import contextlib
import functools
import logging

__all__ = ["export_load_type_hints_cached", "export_load_sympify_cached", "export_load_schema_converters",
           "export_load_stand_ins_quiet",
           "static_autotuner_keeps_coordesc", "config_pickles_keep_coordesc",
           "cached_choice_not_tuned_again"]


# --------------------------------------------------------------------------- torch.export.load

@contextlib.contextmanager
def _serialize_module_patched(module, name: str, fn):
    """`torch._export.serde.serialize`'s global `module` replaced, for the duration, by a
    copy of it whose `name` is `fn` (every other attribute read stays a plain module
    lookup). Where serialize does not use that module under its name (another torch),
    nothing is replaced and torch.export.load runs as it does."""
    import types

    from torch._export.serde import serialize

    module_name = module.__name__
    real = getattr(serialize, module_name, None)
    if real is not module:
        yield
        return
    patched = types.ModuleType(module_name)
    patched.__dict__.update(vars(module))
    setattr(patched, name, fn)
    setattr(serialize, module_name, patched)
    try:
        yield
    finally:
        setattr(serialize, module_name, real)


@contextlib.contextmanager
def export_load_type_hints_cached():
    """A context in which torch.export.load resolves each schema class's type hints once,
    not once per object it reads (pytorch/pytorch#196452: tens of thousands of
    `typing.get_type_hints` calls over a few dozen classes, most of an artifact's load).
    torch 2.11-2.13."""
    import typing

    cache: dict = {}

    def get_type_hints(obj, globalns=None, localns=None, include_extras=False):
        key = (obj, id(globalns), id(localns), include_extras)
        if key not in cache:
            cache[key] = typing.get_type_hints(obj, globalns=globalns, localns=localns, include_extras=include_extras)
        return cache[key]

    with _serialize_module_patched(typing, "get_type_hints", get_type_hints):
        yield


@contextlib.contextmanager
def export_load_sympify_cached():
    """A context in which torch.export.load parses each symbolic-size expression once, not
    once per tensor that carries it (a program with a symbolic sequence length: thousands of
    `sympy.sympify` calls over about twenty strings, a quarter of an artifact's load).
    The result of parsing a string depends on the local names it mentions (a bare "s58"
    is the deserializer's symbol once known, a new one before), so the cache key holds
    those names and their values. torch 2.11-2.13."""
    import sympy

    cache: dict = {}
    # Names sympy's parser looks up that a string need not mention: locals binding them
    # could change a parse the key does not see, so such a call is not cached.
    helpers = {"Symbol", "Integer", "Float", "Rational", "Function"}

    def sympify(a, *args, **kwargs):
        names = kwargs.get("locals")
        if not isinstance(a, str) or args or set(kwargs) - {"locals"} or helpers & set(names or ()):
            return sympy.sympify(a, *args, **kwargs)
        try:
            key = (a, tuple(sorted((k, v) for k, v in (names or {}).items() if k in a)))
            hash(key)
        except TypeError:  # a value that cannot be a key: parse as torch would
            return sympy.sympify(a, **kwargs)
        if key not in cache:
            cache[key] = sympy.sympify(a, **kwargs)
        return cache[key]

    with _serialize_module_patched(sympy, "sympify", sympify):
        yield


class _NoEmptyBytesWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "frombuffer() on empty bytes" not in record.getMessage()


@contextlib.contextmanager
def export_load_stand_ins_quiet():
    """A context in which torch 2.11's torch.export.load does not log a warning for each
    weight saved without bytes ("Cannot call torch.frombuffer() on empty bytes"): the meta
    stand-ins of an artifact's weights stored once or in its weights member are such
    weights, restored from there right after the load. Other messages pass."""
    logger, quiet = logging.getLogger("torch.export.pt2_archive._package"), _NoEmptyBytesWarning()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


@contextlib.contextmanager
def export_load_schema_converters():
    """A context in which torch.export.load turns a program's JSON into torch's schema
    dataclasses through one converter built per schema type, instead of
    `_dict_to_dataclass` working out at every value what its type is (typing.get_origin,
    is_dataclass, dataclasses.fields on each of a program's hundreds of thousands of
    values: the largest part of its deserialisation). Each
    converter does what `_dict_to_dataclass` of torch 2.11-2.13 does for its type, branch
    for branch; where serialize has no such function (another torch), nothing is replaced."""
    from torch._export.serde import serialize

    real = getattr(serialize, "_dict_to_dataclass", None)
    if real is None or not all(hasattr(serialize, n) for n in ("_resolve_schema_cls", "_Union", "schema")):
        yield
        return
    try:  # whether this torch reads `X | None` as optional (2.13 does, 2.11 only Optional[X])
        pipe_optional = not isinstance(real(serialize.schema.Device | None, {"type": "cpu"}), dict)
    except Exception:  # noqa: BLE001 - a schema unlike the ones this was written for: leave torch's way
        yield
        return
    converters: dict = {}

    def convert(cls, data):
        # Keyed with the type's arguments too: Union[X, None] equals Union[None, X], which
        # torch treats differently (it reads the first argument).
        key = (cls, getattr(cls, "__args__", None))
        try:
            fn = converters.get(key)
        except TypeError:  # a type that cannot be a key: torch's own way
            return real(cls, data)
        if fn is None:
            fn = converters[key] = _schema_converter(serialize, cls, convert, pipe_optional)
        return fn(data)

    serialize._dict_to_dataclass = convert
    try:
        yield
    finally:
        serialize._dict_to_dataclass = real


def _schema_converter(serialize, cls, convert, pipe_optional: bool):
    """data -> value of `cls` as torch's `_dict_to_dataclass(cls, data)` returns it (the
    same checks and errors), with what depends on `cls` alone decided here, once."""
    import dataclasses
    import types
    import typing

    cls = serialize._resolve_schema_cls(cls)
    if isinstance(cls, str):
        raise AssertionError(f"Unresolved class type: '{cls}'.")
    origin, args = typing.get_origin(cls), typing.get_args(cls)
    if origin is typing.Annotated:
        inner = cls.__origin__
        return lambda data: convert(inner, data)
    if (origin is typing.Union or (pipe_optional and origin is types.UnionType)) and type(None) in args:
        def optional(data):
            if data is None:
                return None
            if len(args) != 2:
                raise AssertionError(f"expected 2 type args, got {len(args)}")
            return convert(args[0], data)
        return optional
    if isinstance(cls, type) and issubclass(cls, serialize._Union):
        hints = typing.get_type_hints(cls, globalns=vars(serialize.schema))

        def union(data):
            if not isinstance(data, dict):
                raise AssertionError(f"expected dict, got {type(data).__name__}")
            if len(data) != 1:
                raise AssertionError(f"expected dict with 1 key, got {len(data)}")
            ((kind, value),) = data.items()
            if not isinstance(kind, str):
                raise AssertionError(f"expected str key, got {type(kind).__name__}")
            return cls.create(**{kind: convert(hints[kind], value)})
        return union
    if dataclasses.is_dataclass(cls):
        hints = typing.get_type_hints(cls, globalns=vars(serialize.schema))
        fields = [(f.name, hints[f.name]) for f in dataclasses.fields(cls)]
        # Keys the class does not define are ignored (torch's forward compatibility).
        return lambda data: cls(**{name: convert(hint, data[name]) for name, hint in fields if name in data})

    def other(data):  # what remains depends on the data, as in torch
        if isinstance(data, list):
            return [convert(args[0], d) for d in data] if data else data
        if isinstance(data, dict):
            return {k: convert(args[1], v) for k, v in data.items()}
        return float(data) if cls is float else data
    return other


# --------------------------------------------------------------------------- Inductor

# What the installers below replaced, by name (for tests that need the original).
REPLACED: dict = {}


@functools.cache  # installed once per process, not at every lowering
def static_autotuner_keeps_coordesc() -> bool:
    """Make a Triton kernel that Inductor's FX graph cache hands back keep the kernel
    configuration coordinate descent chose for it, instead of tuning it again on its
    first run. On a cache hit the kernel looks its choice up in the autotune cache under
    the hash of the configurations it was compiled with, and two things lose it there
    (benchmarks/NOTES.md; a third, the pickle, is config_pickles_keep_coordesc's):
    - torch 2.11 takes the choice only for a kernel compiled with several
      configurations, and never marks it as found by coordinate descent
      (pytorch/pytorch#172819, fixed by #173391 in torch 2.13);
    - a graph compiled while the autotune cache already held the kernel's choice (a
      model compiled before, or a kernel the other program shares) was compiled with
      that choice alone, while the entry is keyed by the configurations the first tuning
      started from: the lookup misses in torch 2.11 and 2.13 alike.
    This installs `recheck_keeping_coordesc` over torch's method on torch 2.11 to 2.13,
    the releases whose method it was written against; True when it did. The kernels it
    affects then run the configurations the compile verified. The method it replaced
    stays in `REPLACED`."""
    from torch._inductor.runtime import triton_heuristics as th

    if not _autotune_methods_known():
        return False
    cls = th.CachingAutotuner
    if cls.recheck_autotune_cache is not recheck_keeping_coordesc:
        REPLACED["CachingAutotuner.recheck_autotune_cache"] = cls.recheck_autotune_cache
        cls.recheck_autotune_cache = recheck_keeping_coordesc
    return True


def _autotune_methods_known() -> bool:
    """Whether this torch is one of the releases (2.11 to 2.13) whose CachingAutotuner
    methods the replacements below were written against."""
    import torch

    version = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    return (2, 11) <= version <= (2, 13)


@functools.cache  # one probe per process
def config_pickles_keep_coordesc() -> bool:
    """Make a pickled `triton.Config` keep Inductor's `found_by_coordesc` mark. Triton's
    `Config.__setstate__` restores its own fields only, so a kernel whose configuration
    crossed a pickle (compiled in Inductor's compile workers, or read from the FX graph
    cache) lost the mark and was tuned again on its first run although its autotune cache
    entry had been found (benchmarks/NOTES.md: three kernels of a load). Installed where
    a round trip drops the mark (read from behaviour, not from Triton's version); True when
    it did. Copies stay as Triton makes them, without the mark: Inductor derives new
    configurations by `copy.deepcopy` (coordinate descent's candidates, a smaller block,
    pipelining off), which must not pass for found."""
    import copy
    import pickle

    import triton

    probe = triton.Config({})
    probe.found_by_coordesc = True
    if getattr(pickle.loads(pickle.dumps(probe)), "found_by_coordesc", False):
        return False
    cls = triton.Config
    if "__deepcopy__" in vars(cls):  # a Triton that copies its own way: leave it as it is
        return False
    real = cls.__setstate__

    def setstate(self, state):
        real(self, state)
        if state.get("found_by_coordesc"):
            self.found_by_coordesc = True

    def deepcopy(self, memo):  # what copy.deepcopy did through Triton's __setstate__
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        real(new, copy.deepcopy(self.__dict__, memo))
        return new

    REPLACED["triton.Config.__setstate__"] = real
    cls.__setstate__, cls.__deepcopy__ = setstate, deepcopy
    return True


@functools.cache  # installed once per process
def cached_choice_not_tuned_again() -> bool:
    """Make a Triton kernel whose autotune cache lookup hit an entry that coordinate
    descent found run that entry's configuration, instead of tuning it again on its
    first run. On torch 2.11 a reduction kernel of a load can hold several launchers
    beside the cached choice (the smaller reduction blocks Inductor adds); `run()` then
    benchmarks them all, keeps the fastest, saves it over the cache entry without the
    coordinate-descent mark, and tunes it again. Which one wins depends on timing: three
    fresh loads of one llama-1b artifact tuned two kernels again in two of them and none
    in the third (benchmarks/NOTES.md), so the kernel that ran was not always the one the
    compile verified. Here both steps, picking one launcher and coordinate descent, first
    ask the kernel's own autotune cache, before anything is saved over it. Installed on
    torch 2.11 to 2.13, the releases it was written against; True when it did. The
    methods it replaced stay in `REPLACED`."""
    from torch._inductor.runtime import triton_heuristics as th

    if not _autotune_methods_known():
        return False
    cls = th.CachingAutotuner
    for name, method in (("autotune_to_one_config", autotune_keeping_cached_choice),
                         ("coordinate_descent_tuning", coordesc_keeping_cached_choice)):
        if getattr(cls, name) is not method:
            REPLACED[f"CachingAutotuner.{name}"] = getattr(cls, name)
            setattr(cls, name, method)
    return True


def cached_coordesc_launcher(autotuner, launchers):
    """The launcher among `launchers` whose configuration is coordinate descent's choice
    in the autotuner's autotune cache entry, marked as found; None where the lookup did
    not hit, the entry was not found by coordinate descent, or no launcher runs it."""
    from torch._inductor.runtime import triton_heuristics as th

    info = getattr(autotuner, "autotune_cache_info", None) or {}
    # The autotuner keeps no handle on its cache but the bound `save` Inductor gave it.
    cache = getattr(getattr(autotuner, "save_cache_hook", None), "__self__", None)
    if info.get("autotune_cache_state") != "hit" or not hasattr(cache, "read_best"):
        return None
    best = cache.read_best(autotuner.inductor_meta, [launcher.config for launcher in launchers])
    if not getattr(best, "found_by_coordesc", False):
        return None
    key = th.triton_config_to_hashable(best)
    for launcher in launchers:
        if th.triton_config_to_hashable(launcher.config) == key:
            launcher.config.found_by_coordesc = True
            return launcher
    return None


def autotune_keeping_cached_choice(self, *args, **kwargs):
    """`CachingAutotuner.autotune_to_one_config`, except where one launcher runs the
    autotune cache entry's coordinate-descent choice: that one is kept, nothing timed."""
    launcher = cached_coordesc_launcher(self, self.launchers)
    if launcher is None:
        return REPLACED["CachingAutotuner.autotune_to_one_config"](self, *args, **kwargs)
    self.launchers = [launcher]


def coordesc_keeping_cached_choice(self, launcher, *args, **kwargs):
    """`CachingAutotuner.coordinate_descent_tuning`, except for a launcher that runs the
    autotune cache entry's coordinate-descent choice: it is kept, nothing tuned."""
    if cached_coordesc_launcher(self, [launcher]) is not None:
        return launcher
    return REPLACED["CachingAutotuner.coordinate_descent_tuning"](self, launcher, *args, **kwargs)


def recheck_keeping_coordesc(self, reload_kernel_from_src) -> None:
    """torch 2.13's `CachingAutotuner.recheck_autotune_cache`, and a second lookup where
    it misses: on an FX graph cache hit, the statically launchable kernel looks up its
    autotune cache entry; the compiled configuration that matches it is kept and marked
    as found by coordinate descent when it was, and a configuration coordinate descent
    found outside the compiled ones is compiled now (from Triton's cache where the
    compile left it there). Where the lookup by the compiled configurations misses,
    the kernel's source is loaded as Inductor loads it (the parent-process reload torch
    itself does before tuning), whose decorator looks the entry up under the
    configurations the kernel's heuristic starts from. (Where this process already
    loaded and precompiled that module, its autotuner holds no configurations to read
    any more, and the kernel is tuned as before: a load, a fresh process, never is.)"""
    from torch._inductor.runtime import triton_heuristics as th

    configs = [result.config for result in self.compile_results]
    cached, _, info = th.check_autotune_cache(configs, self.filename, self.inductor_meta)
    if info.get("autotune_cache_state") == "miss" and self.inductor_meta.get("coordinate_descent_tuning"):
        fresh = reload_kernel_from_src()
        fresh_info = getattr(fresh, "autotune_cache_info", None) or {}
        if fresh_info.get("autotune_cache_state") == "hit" and len(fresh.configs or ()) == 1:
            cached, info = list(fresh.configs), fresh_info
            if self.fn.fn is None:
                self.fn = fresh.fn  # loaded anyway: spares the tuner's own reload
    self.autotune_cache_info = info
    if len(cached) != 1:
        return
    best = cached[0]
    found = getattr(best, "found_by_coordesc", False)
    best_key = th.triton_config_to_hashable(best)
    for result in self.compile_results:
        if th.triton_config_to_hashable(result.config) == best_key:
            result.config.found_by_coordesc = found
            self.compile_results = [result]
            return
    if self.fn.fn is None:
        self.fn = reload_kernel_from_src().fn
    self.compile_results = [self._precompile_config(best)]
