"""Calibration and evaluation data for the zoo, and for any model given a tokenizer.

Text comes from CPython's own documentation (`pydoc_data.topics`, ~465k characters of
English prose and code, in every CPython install, so nothing is downloaded). It is
joined in sorted key order and cut ONCE by character position: the first half is the
calibration split (lossy passes fit thresholds and importance scores on it), the second
half the evaluation split (quality is only ever reported on it). The two never share a
character, so they never share a token. The text is the running interpreter's, so two
Python versions may give slightly different splits; within one version it is fixed.

Images are synthetic (seeded sinusoid gratings plus smooth colour noise): the vision
models here are shape-only, with random weights, so vision quality measures agreement
with the original model's predictions, not accuracy on real images.
"""

from __future__ import annotations

import functools
import random

import torch

from optc.errors import UsageError

SPLITS = ("calibration", "evaluation")

# Distinct seeds per split so that the two image sets never coincide.
_IMAGE_SPLIT_SEED = {"calibration": 0x0C0FFEE, "evaluation": 0x0E7A1}


def _check_split(which: str) -> None:
    if which not in SPLITS:
        raise UsageError(f"unknown data split {which!r}; use 'calibration' or 'evaluation'")


@functools.lru_cache(maxsize=1)
def _corpus() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def text_split(which: str) -> str:
    """The calibration (first half) or evaluation (second half) text."""
    _check_split(which)
    text = _corpus()
    mid = len(text) // 2
    return text[:mid] if which == "calibration" else text[mid:]


# ---------------------------------------------------------------------------------
# Tokenizers. Anything with .encode(str) -> list[int] works with token_batches; these
# two are what the zoo hands out.


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255: for the tiny and shape-only models, which
    have no tokenizer of their own."""

    vocab_size = 256
    prefix_ids: list[int] = []
    suffix_ids: list[int] = []
    pad_id = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def __call__(self, text: str) -> list[int]:
        return self.encode(text)

    def __len__(self) -> int:
        return self.vocab_size


class FastTokenizer:
    """A `tokenizers.Tokenizer` behind the small interface optc uses.

    `prefix_ids`/`suffix_ids` are the special tokens an input window is wrapped in
    ([CLS] ... [SEP] for BERT; none for the Llama models, which add no BOS).
    `encode` adds them by default like Hugging Face's tokenizers do; `token_batches`
    asks for the plain text tokens and wraps each window itself.
    """

    def __init__(self, tokenizer, prefix_ids=(), suffix_ids=(), pad_id: int = 0):
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tk = tokenizer
        self.prefix_ids = list(prefix_ids)
        self.suffix_ids = list(suffix_ids)
        self.pad_id = pad_id
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._tk.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            ids = self.prefix_ids + ids + self.suffix_ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def __call__(self, text: str) -> list[int]:
        return self.encode(text)

    def __len__(self) -> int:
        return self.vocab_size


# ---------------------------------------------------------------------------------
# Token windows


_TOKEN_CACHE: dict = {}  # (id(tokenizer), split) -> (tokenizer, LongTensor); bounded


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of `text`, without the special tokens a tokenizer may add around it."""
    try:
        return list(tokenizer.encode(text, add_special_tokens=False))
    except TypeError:  # an encode without that keyword
        return list(tokenizer.encode(text))


def split_tokens(tokenizer, which: str) -> torch.Tensor:
    """The whole split tokenised (1-D LongTensor), cached per tokenizer object."""
    _check_split(which)
    key = (id(tokenizer), which)
    hit = _TOKEN_CACHE.get(key)
    if hit is not None and hit[0] is tokenizer:  # the object kept alive, so id is unique
        return hit[1]
    ids = torch.tensor(encode_text(tokenizer, text_split(which)), dtype=torch.long)
    if len(_TOKEN_CACHE) >= 16:
        _TOKEN_CACHE.pop(next(iter(_TOKEN_CACHE)))
    _TOKEN_CACHE[key] = (tokenizer, ids)
    return ids


def token_batches(tokenizer, which: str, n: int, seq_len: int, batch: int = 1, seed: int = 0):
    """`n` LongTensors of shape [batch, seq_len], cut from non-overlapping windows of the
    tokenised split and chosen by `seed` (same seed, same batches). If the tokenizer has
    `prefix_ids`/`suffix_ids`, each row is prefix + text window + suffix."""
    prefix = list(getattr(tokenizer, "prefix_ids", []) or [])
    suffix = list(getattr(tokenizer, "suffix_ids", []) or [])
    if n < 1 or batch < 1:
        raise UsageError(f"token_batches needs n >= 1 and batch >= 1 (got n={n}, batch={batch})")
    body = seq_len - len(prefix) - len(suffix)
    if body < 1:
        raise UsageError(
            f"seq_len={seq_len} leaves no room for text between {len(prefix) + len(suffix)} "
            "special tokens; use a longer seq_len"
        )
    ids = split_tokens(tokenizer, which)
    n_windows = ids.numel() // body
    need = n * batch
    if need > n_windows:
        raise UsageError(
            f"the {which} split has {ids.numel()} tokens: {n_windows} windows of {body}, "
            f"but {n}x{batch} were asked for; ask for fewer or shorter batches"
        )
    picks = random.Random(seed).sample(range(n_windows), need)
    windows = ids[: n_windows * body].view(n_windows, body)[torch.tensor(picks)]
    rows = [torch.tensor(prefix, dtype=torch.long).expand(need, -1), windows,
            torch.tensor(suffix, dtype=torch.long).expand(need, -1)]
    rows = torch.cat(rows, dim=1).contiguous()
    return [b.clone() for b in rows.view(n, batch, seq_len).unbind(0)]


# ---------------------------------------------------------------------------------
# Images


def _grating_images(gen: torch.Generator, count: int, size: int, channels: int) -> torch.Tensor:
    """Each image: a few coloured sinusoid gratings (random frequency, angle, phase)
    plus bilinear-upsampled colour noise, so images differ in texture and layout the
    way a random-weight ViT can tell apart."""
    coords = torch.linspace(-1.0, 1.0, size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    n_waves = 3
    freq = torch.rand(count, n_waves, 1, 1, generator=gen) * 12 + 1
    angle = torch.rand(count, n_waves, 1, 1, generator=gen) * torch.pi
    phase = torch.rand(count, n_waves, 1, 1, generator=gen) * 2 * torch.pi
    waves = torch.sin(freq * (xx * torch.cos(angle) + yy * torch.sin(angle)) * torch.pi + phase)
    colour = torch.rand(count, n_waves, channels, generator=gen) * 2 - 1
    img = torch.einsum("nwhv,nwc->nchv", waves, colour) / n_waves
    low = torch.randn(count, channels, 4, 4, generator=gen)
    img = img + 0.5 * torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear",
                                                      align_corners=False)
    # Roughly the range of ViT pixel_values after (x - 0.5) / 0.5 normalisation.
    return img.clamp(-1.0, 1.0)


def image_batches(n: int, batch: int, image_size: int, which: str, seed: int = 0,
                  channels: int = 3) -> list[torch.Tensor]:
    """`n` float32 tensors [batch, channels, image_size, image_size] of synthetic
    images; deterministic in (which, seed), and the two splits use different seeds."""
    _check_split(which)
    if n < 1 or batch < 1:
        raise UsageError(f"image_batches needs n >= 1 and batch >= 1 (got n={n}, batch={batch})")
    gen = torch.Generator().manual_seed(_IMAGE_SPLIT_SEED[which] * 1_000_003 + seed)
    imgs = _grating_images(gen, n * batch, image_size, channels)
    return [b.clone() for b in imgs.view(n, batch, channels, image_size, image_size).unbind(0)]
