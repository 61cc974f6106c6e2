"""`--calibration PATH`: calibration data a user brings, for models the zoo has no data for.

Two kinds of file:
- a `.pt` file holding a list of input tuples like the model's example inputs (saved with
  `torch.save([(ids,), ...], PATH)`): any model. Loaded with `weights_only=True`, so a
  file cannot run code.
- any other file is read as UTF-8 text, for causal LMs with a tokenizer (zoo models and
  Hugging Face directories that hold theirs): tokenised and cut in order into
  non-overlapping windows of `seq_len` tokens, one window per batch.

Each batch is checked against the example inputs (count, dtype, rank, token ids inside
the vocabulary), so a file made for another model is refused by name, not half-used.
"""

from __future__ import annotations

from pathlib import Path

import torch

from optc.errors import UsageError

WINDOW = 128  # tokens per calibration window, as the zoo's calibration split


def read_calibration(path: str | Path, *, entry, example_inputs: tuple, is_lm: bool,
                     vocab_size: int | None = None, seq_len: int = WINDOW) -> list[tuple]:
    """The file's batches as a list of input tuples (CPU tensors)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UsageError(f"--calibration {path}: no such file")
    batches = _from_pt(file) if file.suffix == ".pt" else _from_text(file, entry, is_lm, seq_len)
    for i, batch in enumerate(batches):
        _check(file, i, batch, example_inputs, is_lm, vocab_size)
    # Floating inputs (images) take the model's dtype: a float32 file calibrates a bf16 model.
    return [tuple(x.to(ref.dtype) if x.is_floating_point() and isinstance(ref, torch.Tensor) else x
                  for x, ref in zip(batch, example_inputs)) for batch in batches]


def _from_pt(file: Path) -> list[tuple]:
    try:
        data = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
        raise UsageError(f"--calibration {file}: not a torch.save file of tensors ({type(exc).__name__}: "
                         f"{str(exc)[:200]}); save a list of input tuples with torch.save") from None
    if isinstance(data, torch.Tensor):
        data = [data]
    if not isinstance(data, (list, tuple)) or not data:
        raise UsageError(f"--calibration {file}: expected a non-empty list of input tuples, "
                         f"got {type(data).__name__}")
    return [tuple(b) if isinstance(b, (list, tuple)) else (b,) for b in data]


def _from_text(file: Path, entry, is_lm: bool, seq_len: int) -> list[tuple]:
    if not is_lm:
        raise UsageError(f"--calibration {file}: a text file calibrates causal LMs only; for this model "
                         "save a list of input tuples with torch.save([...], 'calib.pt')")
    tokenizer = _tokenizer(entry)
    if tokenizer is None:
        raise UsageError(f"--calibration {file}: a text file needs the model's tokenizer, and this model has "
                         "none (save it beside the weights with tokenizer.save_pretrained(DIR)), or pass "
                         "token ids as a .pt file")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"--calibration {file}: not UTF-8 text; give a text file or a .pt list of "
                         "input tuples") from None
    from optc.models.data import encode_text

    ids = torch.tensor(encode_text(tokenizer, text), dtype=torch.long)
    n = ids.numel() // seq_len
    if n < 1:
        raise UsageError(f"--calibration {file}: {ids.numel()} tokens, fewer than one window of {seq_len}; "
                         "give more text")
    return [(w.unsqueeze(0).clone(),) for w in ids[: n * seq_len].view(n, seq_len)]


def _tokenizer(entry):
    tok = getattr(entry, "tokenizer", None)
    return tok() if callable(tok) else tok


def _check(file: Path, i: int, batch: tuple, example_inputs: tuple, is_lm: bool, vocab_size: int | None) -> None:
    where = f"--calibration {file}: batch {i}"
    if len(batch) != len(example_inputs):
        raise UsageError(f"{where} has {len(batch)} inputs; the model takes {len(example_inputs)} "
                         f"(like its example inputs)")
    for k, (x, ref) in enumerate(zip(batch, example_inputs)):
        if not isinstance(x, torch.Tensor):
            raise UsageError(f"{where}, input {k}: a {type(x).__name__}, not a tensor")
        if isinstance(ref, torch.Tensor) and (x.dtype != ref.dtype and not (x.is_floating_point()
                                                                             and ref.is_floating_point())):
            raise UsageError(f"{where}, input {k}: dtype {x.dtype}, the model takes {ref.dtype}")
        if isinstance(ref, torch.Tensor) and x.dim() != ref.dim():
            raise UsageError(f"{where}, input {k}: shape {list(x.shape)}, the model takes rank {ref.dim()} "
                             f"(like {list(ref.shape)})")
        if isinstance(ref, torch.Tensor) and not is_lm and x.shape[2:] != ref.shape[2:]:
            raise UsageError(f"{where}, input {k}: shape {list(x.shape)} does not fit the model's "
                             f"{list(ref.shape)}")
    ids = batch[0]
    if is_lm and vocab_size is not None and ids.numel() and (int(ids.max()) >= vocab_size or int(ids.min()) < 0):
        raise UsageError(f"{where}: token ids run from {int(ids.min())} to {int(ids.max())}, outside the "
                         f"model's vocabulary of {vocab_size}: the file was made for another model")
