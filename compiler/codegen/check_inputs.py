"""The inputs the lowering check runs a program on: fresh random inputs shaped like its
examples, and for a decoder the state its cache starts from (lowering.verify)."""

from __future__ import annotations

import torch

from optc.compiler.capture import PREFILL, graph_module, is_state_buffer
from optc.compiler.rewrite import attr_value
from optc.errors import InternalError


def random_like_inputs(inputs: tuple[tuple, dict], vocab: int | None, seed: int) -> tuple[tuple, dict]:
    """Fresh inputs shaped like the examples: token ids drawn below the vocabulary,
    floats from a normal distribution; positions and masks are kept as they are."""
    gen = torch.Generator().manual_seed(seed)

    def fresh(name, t):
        if not isinstance(t, torch.Tensor):
            return t
        if t.is_floating_point():
            return torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device)
        if vocab and name in ("input_ids", "arg0"):
            return torch.randint(0, vocab, t.shape, generator=gen, dtype=t.dtype).to(t.device)
        return t

    args, kwargs = inputs
    return tuple(fresh(f"arg{i}", a) for i, a in enumerate(args)), {k: fresh(k, v) for k, v in kwargs.items()}


def vocab_size(program) -> int | None:
    """Rows of the token embedding of an ExportedProgram or an unlifted GraphModule."""
    for node in program.graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.aten.embedding.default:
            table = node.args[0]
            if "val" in table.meta:
                return int(table.meta["val"].shape[0])
            if table.op == "get_attr":
                return int(attr_value(program, table.target).shape[0])
    return None


def reset_state(module: torch.nn.Module, state: dict | None = None) -> None:
    """Zero a decoder's state (KV cache and its lengths: buffers the program mutates), or
    set the buffers `state` names to its tensors and zero the others, as a loaded decoder
    ties the prefill's and decode's caches by name (runtime/decode.py), so two runs of a
    stateful program start from the same state."""
    for name, buf in module.named_buffers():
        if not is_state_buffer(name):
            continue
        if state is None or name not in state:
            buf.zero_()
        elif state[name].shape == buf.shape:
            buf.copy_(state[name])
        else:  # every pass narrows a cache alike in prefill and decode
            raise InternalError(f"the start state's {name} is {list(state[name].shape)}, the program's "
                                f"{list(buf.shape)}: the prefill and decode programs' caches differ")


def prefilled_state(prefill: torch.nn.Module, prefill_inputs: tuple[tuple, dict], vocab: int | None):
    """A function of a seed giving the decoder state `prefill` leaves after a random prompt
    shaped like its example (state buffer name -> tensor): where a decode step starts in
    use. From a zeroed cache a lone token attends to nothing but itself, and a model such
    as SmolLM2 then turns that token's output on rounding (its one-ulp noise up to twice
    the output's norm, so the check could tell nothing); from a prefilled cache the noise is
    that of the prefill, and the check also reads the cache, which a zeroed one never tests.
    Each seed's state is computed once (a thresholded check asks for it in both regimes)."""
    states: dict[int, dict] = {}

    def state(seed: int) -> dict:
        if seed not in states:
            args, kwargs = random_like_inputs(prefill_inputs, vocab, seed)
            try:
                with torch.no_grad():
                    reset_state(prefill)
                    prefill(*args, **kwargs)
                    states[seed] = {name: buf.clone() for name, buf in prefill.named_buffers()
                                    if is_state_buffer(name)}
            finally:
                reset_state(prefill)
        return states[seed]

    return state


def decode_start(programs, example_inputs):
    """The start state of a decoder's decode-program check (prefilled_state of its prefill
    program, from `programs`: name -> ExportedProgram); None without a prefill program."""
    if PREFILL not in programs:
        return None
    prefill = programs[PREFILL]
    return prefilled_state(graph_module(prefill), example_inputs[PREFILL], vocab_size(prefill))
