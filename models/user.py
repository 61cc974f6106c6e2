"""Bring your own model: a Hugging Face model directory or `path/to/file.py:factory`.

MODEL on the command line resolves in this order: a zoo name, then `file.py:factory`
(factory() returns (module, example_inputs)), then a directory with a config.json
(loaded offline with transformers: the class named in config.json's
`architectures` when transformers has it, else AutoModelForCausalLM for *ForCausalLM
architectures and AutoModel otherwise). Every module comes back in eval mode with
requires_grad off: optc compiles for inference.

A causal LM directory that also holds its tokenizer gets calibration and held-out
evaluation data (`TextData`): windows of optc's built-in text (models/data.py)
tokenised by the model's own tokenizer, so lossy passes and `--eval` work on it from the
command line as they do on the zoo.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from optc.errors import UsageError

EXAMPLE_TOKENS = 16  # input_ids length of a Hugging Face directory's example inputs


def _prepare(module: torch.nn.Module) -> torch.nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module


def _split_factory(spec: str):
    """('path.py', 'factory') for a factory spec, else None."""
    path, sep, name = spec.rpartition(":")
    if sep and path.endswith(".py"):
        return path, name
    if spec.endswith(".py"):
        raise UsageError(f"{spec!r} names a Python file but no factory; write "
                         f"'{spec}:make_model' where make_model() returns (module, example_inputs)")
    return None


def _load_factory(path: str, name: str):
    file = Path(path).expanduser()
    if not file.is_file():
        raise UsageError(f"no such file {str(file)!r} (from model spec '{path}:{name}')")
    if not name.isidentifier():
        raise UsageError(f"{name!r} is not a function name; the spec is path/to/file.py:factory")
    mod_name = f"_optc_user_{abs(hash(str(file.resolve())))}"
    spec = importlib.util.spec_from_file_location(mod_name, file)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(file.resolve().parent))  # so the file can import its neighbours
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise UsageError(f"importing {file} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        sys.path.remove(str(file.resolve().parent))
    factory = getattr(module, name, None)
    if not callable(factory):
        found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                       and getattr(v, "__module__", None) == mod_name)
        raise UsageError(f"{file} has no function {name!r}"
                         + (f"; it defines {', '.join(found)}" if found else ""))
    try:
        result = factory()
    except Exception as exc:
        raise UsageError(f"{file}:{name}() failed: {type(exc).__name__}: {exc}") from exc
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        raise UsageError(f"{file}:{name}() must return (module, example_inputs), "
                         f"got {type(result).__name__}")
    model, inputs = result
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"{file}:{name}() returned a {type(model).__name__} as the module; "
                         "it must be a torch.nn.Module")
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if not isinstance(inputs, (tuple, list)) or not inputs:
        raise UsageError(f"{file}:{name}() must return example_inputs as a non-empty tuple of "
                         f"positional arguments, got {type(inputs).__name__}")
    return _prepare(model), tuple(inputs)


def _hf_example_inputs(config) -> tuple:
    gen = torch.Generator().manual_seed(0)
    vocab = getattr(config, "vocab_size", None)
    image_size = getattr(config, "image_size", None)
    if vocab is None and image_size is not None:
        size = image_size if isinstance(image_size, int) else int(image_size[0])
        channels = int(getattr(config, "num_channels", 3))
        return (torch.randn(1, channels, size, size, generator=gen),)
    if vocab is None:
        raise UsageError(f"cannot make example inputs for a {type(config).__name__}: it has "
                         "neither vocab_size nor image_size; use path/to/file.py:factory instead")
    # Ids from 3 upwards skip the usual pad/bos/eos ids at the bottom of the vocabulary.
    return (torch.randint(min(3, vocab - 1), vocab, (1, EXAMPLE_TOKENS), generator=gen),)


def _load_hf_dir(folder: Path):
    if not (folder / "config.json").is_file():
        raise UsageError(f"{str(folder)!r} has no config.json: give a Hugging Face model "
                         "directory (save_pretrained output), a zoo name or path/to/file.py:factory")
    import transformers

    try:
        archs = json.loads((folder / "config.json").read_text()).get("architectures") or []
    except json.JSONDecodeError as exc:
        raise UsageError(f"{folder / 'config.json'} is not valid JSON: {exc}") from exc
    # The saved architecture class when transformers has it (a classifier keeps its
    # head); else AutoModelForCausalLM for *ForCausalLM, else AutoModel.
    saved = getattr(transformers, str(archs[0]), None) if archs else None
    causal = any(str(a).endswith("ForCausalLM") for a in archs)
    if isinstance(saved, type) and hasattr(saved, "from_pretrained"):
        auto = saved
    else:
        auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        raise UsageError(f"transformers cannot read {folder / 'config.json'}: {exc}") from exc
    last = None
    for kwargs in ({"attn_implementation": "sdpa"}, {}):  # sdpa where the model has it
        try:
            model = auto.from_pretrained(str(folder), local_files_only=True, **kwargs)
            break
        except (ValueError, ImportError) as exc:
            last = exc
        except OSError as exc:
            raise UsageError(f"cannot load weights from {folder}: {exc}") from exc
    else:
        raise UsageError(f"transformers cannot load {folder}: {last}") from last
    return _prepare(model), _hf_example_inputs(config)


@dataclass(frozen=True)
class TextData:
    """Calibration / evaluation token windows for a user's causal LM: what optc.compile
    reads from a zoo entry (name, metric, calibration_batches, evaluation_batches),
    cut from the built-in text's two disjoint halves with the model's tokenizer."""

    name: str
    tokenizer: object
    vocab_size: int
    metric: str = "perplexity"
    default_seq_len: int = 128

    def _batches(self, which: str, n: int, seq_len: int | None, batch: int, seed: int) -> list[tuple]:
        from optc.models import data

        windows = data.token_batches(self.tokenizer, which, n, seq_len or self.default_seq_len, batch, seed)
        top = max(int(w.max()) for w in windows)
        if top >= self.vocab_size:
            raise UsageError(f"{self.name}'s tokenizer gives token id {top}, beyond the model's vocabulary of "
                             f"{self.vocab_size}: the directory's tokenizer does not belong to this model")
        return [(w,) for w in windows]

    def calibration_batches(self, n: int, seq_len: int | None = None, batch: int = 1, seed: int = 0) -> list[tuple]:
        return self._batches("calibration", n, seq_len, batch, seed)

    def evaluation_batches(self, n: int, seq_len: int | None = None, batch: int = 1, seed: int = 0) -> list[tuple]:
        return self._batches("evaluation", n, seq_len, batch, seed)


@dataclass(frozen=True)
class UnreadableTokenizer:
    """The entry of a causal LM directory whose tokenizer files transformers cannot load:
    compiling without data still works; asking it for data names the load error (a
    missing tokenizer and a broken one need different fixes)."""

    name: str
    error: str
    metric: str = "perplexity"

    def _refuse(self, which: str):
        raise UsageError(f"{self.name} has tokenizer files, but transformers cannot load them ({self.error}); "
                         f"a lossy pass (and --eval) needs {which} data from them: re-save the tokenizer "
                         "(tokenizer.save_pretrained(DIR)), or pass it to optc.compile from Python")

    def calibration_batches(self, *args, **kwargs):
        self._refuse("calibration")

    def evaluation_batches(self, *args, **kwargs):
        self._refuse("evaluation")


# Files any Hugging Face tokenizer saves at least one of.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                    "spiece.model")


def _text_data(folder: Path, module: torch.nn.Module) -> TextData | UnreadableTokenizer | None:
    """TextData for a causal LM directory whose tokenizer transformers can load offline;
    UnreadableTokenizer when its tokenizer files do not load; None for other models or
    when there is no tokenizer (a lossy pass then refuses, saying what to add)."""
    from optc.compiler.capture import is_causal_lm

    vocab = getattr(getattr(module, "config", None), "vocab_size", None)
    if vocab is None or not is_causal_lm(module):  # the models optc captures as decoders
        return None
    if not any((folder / f).exists() for f in _TOKENIZER_FILES):
        return None
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any load failure is reported when data is asked for
        return UnreadableTokenizer(name=folder.resolve().name, error=f"{type(exc).__name__}: {exc}"[:300])
    return TextData(name=folder.resolve().name, tokenizer=tokenizer, vocab_size=int(vocab))


def load_user_model(spec: str) -> tuple[torch.nn.Module, tuple]:
    """(module, example_inputs) from 'path/to/file.py:factory' or a Hugging Face dir."""
    factory = _split_factory(spec)
    if factory is not None:
        return _load_factory(*factory)
    folder = Path(spec).expanduser()
    if not folder.exists():
        raise UsageError(f"no such model directory {spec!r}; give a zoo name (`optc models` "
                         "lists them), a Hugging Face model directory or path/to/file.py:factory")
    if not folder.is_dir():
        raise UsageError(f"{spec!r} is a file, not a model directory; for a Python file write "
                         "path/to/file.py:factory")
    return _load_hf_dir(folder)


def resolve(spec: str, device="cpu", dtype: torch.dtype | None = None):
    """(entry, module, example_inputs) for a MODEL argument: zoo name first, then a user
    model. The entry is the ZooEntry, a TextData for a causal LM directory with its
    tokenizer, or None. `device` and `dtype` apply to both (dtype: floating params only)."""
    from optc.models import zoo

    if spec in zoo.names():
        entry = zoo.get(spec)
        return entry, entry.load(dtype=dtype, device=device), entry.example_inputs(device=device)
    looks_like_path = any(c in spec for c in "/\\:.") or Path(spec).exists()
    if not looks_like_path:
        zoo.get(spec)  # raises the "unknown model" usage error, listing the zoo
    module, inputs = load_user_model(spec)
    folder = Path(spec).expanduser()
    entry = _text_data(folder, module) if folder.is_dir() else None
    if dtype is not None:
        module = module.to(dtype)
        inputs = tuple(x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                       for x in inputs)
    module = module.to(device)
    inputs = tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs)
    return entry, module, inputs
