"""Calibration: what lossy passes measure on the user's (or the zoo's) calibration data.

A CalibrationContext runs the program that sees whole sequences (an LM's prefill, an
encoder's forward) on calibration inputs. Passes ask it for a loss of a rewritten
graph or for the residual stream's values; they never touch data themselves.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from optc.compiler.rewrite import mutated_attr_names, rebuild
from optc.compiler.torch_private import flat_graph_inputs
from optc.progress import progress


class CalibrationContext:
    def __init__(self, task: str, program: fx.GraphModule, inputs: list[tuple[tuple, dict]]):
        if not inputs:
            raise ValueError("calibration needs at least one input")
        self.task = task
        self.calibration_program = program
        self.inputs = inputs
        # What was measured on this program, by node names: a compile session hands the
        # same memo to the next run whose passes before this point were the same, so a
        # search measures the calibration statistics of a graph once.
        self.memo: dict = {}

    def _run(self, gm, args, kwargs):
        with torch.no_grad():
            out = gm(*args, **kwargs)
        # Graphs from the torch.compile backend return tuples; the first tensor is the
        # model's main output (logits or hidden states).
        while isinstance(out, (tuple, list)) and not isinstance(out, torch.Tensor):
            out = out[0]
        return out

    def reference_outputs(self) -> list[torch.Tensor]:
        key = ("reference", len(self.inputs))
        if key not in self.memo:
            self.memo[key] = [self._run(self.calibration_program, a, k).float()
                              for a, k in progress(self.inputs, "calibration: reference outputs")]
        return self.memo[key]

    def calibration_loss(self, transform, n: int | None = None) -> float:
        """Loss of `transform(program)` on the first `n` calibration inputs: next-token
        cross-entropy for causal LMs, else 1 - mean cosine to the original outputs."""
        gm = transform(self.calibration_program)
        losses = [self._loss(self._run(gm, args, kwargs), i, kwargs)
                  for i, (args, kwargs) in enumerate(progress(self.inputs[:n], "calibration: loss"))]
        return sum(losses) / len(losses)

    def _loss(self, out: torch.Tensor, i: int, kwargs: dict) -> float:
        out = out.float()
        if self.task == "causal-lm":
            ids = kwargs["input_ids"]
            return F.cross_entropy(out[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()
        ref = self.reference_outputs()[i]
        return 1.0 - F.cosine_similarity(out.flatten(0, -2), ref.flatten(0, -2), dim=-1).mean().item()

    def losses_at(self, cuts: list[tuple], n: int | None = None, fixed: dict | None = None) -> list[list[float]]:
        """The calibration loss of the program with a node's output replaced, on the
        first `n` inputs, for each replacement of each cut: what `calibration_loss` gives
        for each rewritten program, without rewriting it; [[loss of each replacement]
        per cut]. A cut is (node, replacements) or (node, replacements, source): each
        replacement computes the node's output from the value of `source` (default: the
        node's first argument). `fixed` {node: (function, source)} replaces nodes in
        every run, the cuts' included (units already removed, say).

        Per input the program runs once, in graph order; at each cut node every
        replacement runs the rest of the program from there, then the run goes on with
        the node's own value. So a layer-by-layer sensitivity costs one forward per input
        plus, per candidate, the layers above its own, and no rebuilt graph. The state the
        program writes in place (KV cache, its write counters) is each input's own copy,
        put back to what it was at the node before each replacement runs and before the
        run goes on."""
        gm = self.calibration_program
        mutated = set(mutated_attr_names(gm))
        nodes = list(gm.graph.nodes)
        cuts = [(c[0], c[1], c[2] if len(c) > 2 else c[0].args[0]) for c in cuts]
        fixed = fixed or {}
        keep = {source for _, _, source in cuts} | {source for _, source in fixed.values()}
        at = {node: i for i, node in enumerate(nodes)}
        order = sorted(range(len(cuts)), key=lambda k: at[cuts[k][0]])
        totals = [[0.0] * len(fns) for _, fns, _ in cuts]
        inputs = self.inputs[:n]
        with torch.no_grad():
            for i, (args, kwargs) in enumerate(progress(inputs, "calibration: loss from each layer")):
                interp = _OwnState(gm, mutated, fixed, keep)
                interp.args_iter = iter(flat_graph_inputs(gm, args, kwargs))
                for target in mutated:  # every state tensor copied now, so a snapshot holds all
                    interp.get_attr(target, (), {})
                main, done = interp.env, 0
                for k in order:
                    node, fns, source = cuts[k]
                    interp.env = main
                    interp.run_nodes(nodes[done:at[node]])
                    state = {t: v.clone() for t, v in interp.own.items()}
                    x = main[source]
                    for j, replace in enumerate(fns):
                        interp.env = dict(main)
                        interp.env[node] = replace(x)
                        interp.free(node)
                        totals[k][j] += self._loss(interp.run_nodes(nodes[at[node] + 1:]), i, kwargs)
                        for t, v in interp.own.items():
                            v.copy_(state[t])
                    interp.env = main
                    interp.run_nodes([node])
                    done = at[node] + 1
        return [[t / len(inputs) for t in per] for per in totals]

    def stream_values(self, nodes: list[fx.Node], n: int | None = None) -> list[list[torch.Tensor]]:
        """The values of `nodes` (of the calibration program) on the first `n` inputs."""
        key = ("stream", tuple(node.name for node in nodes), len(self.inputs[:n]))
        if key not in self.memo:
            probe, _ = rebuild(self.calibration_program, extra_outputs=nodes)
            with torch.no_grad():
                self.memo[key] = [probe(*a, **k)[1] for a, k in progress(self.inputs[:n], "calibration: activations")]
        return self.memo[key]

    def sequential(self, nodes: list[fx.Node], fit, n: int | None = None) -> None:
        """Run the program on the first `n` inputs all together, one layer at a time: at
        each of `nodes` (in graph order) `fit(node, values)` gets the values of the node's
        first argument over every input, *as the model rewritten so far computes them*,
        and returns a function that replaces the node (its output from that argument)
        for the rest of the run. This is how a repair is fitted on the activations of
        the model already repaired below it (SparseGPT's sequential calibration) in one
        pass, instead of one pass per layer.

        Inputs advance together between two such nodes and one at a time within a stretch,
        so each input gets its own copy of the state the program writes in place (the KV
        cache, the cache's position counters): the inputs' writes would otherwise meet.
        The program's own buffers are left as they are."""
        mutated = set(mutated_attr_names(self.calibration_program))
        order = {node: i for i, node in enumerate(self.calibration_program.graph.nodes)}
        stops = sorted(nodes, key=order.__getitem__)
        runs = [self._stepper(a, k, set(stops), mutated) for a, k in self.inputs[:n]]
        # Grad mode is global state: the generators' own no_grad blocks interleave, so the
        # whole run is inside one.
        with torch.no_grad():
            values = [next(r) for r in runs]
            for node in stops:
                assert all(v[0] is node for v in values)
                replace = fit(node, [v[1] for v in values])
                values = [r.send(replace(v[1])) for r, v in zip(runs, values)]
        assert all(v is None for v in values)

    def _stepper(self, args, kwargs, stops: set, mutated: set):
        """A generator running the program node by node on one input: at a node of `stops`
        it yields (node, value of its first argument) and takes the node's output. The
        attributes in `mutated` are read from copies of its own."""
        gm = self.calibration_program
        interp = _OwnState(gm, mutated)
        interp.args_iter = iter(flat_graph_inputs(gm, args, kwargs))
        env = interp.env
        for node in gm.graph.nodes:
            if node.op == "output":
                break
            if node in stops:
                env[node] = yield node, env[node.args[0]]
            else:
                env[node] = interp.run_node(node)
            interp.free(node)
        yield None

    def stream_cosines(self, anatomy, units, n: int | None = None) -> dict:
        """1 - cos(stream before, stream after) of each unit, averaged over tokens."""
        return {unit: stats[0] for unit, stats in self.stream_stats(anatomy, units, n).items()}

    def stream_stats(self, anatomy, units, n: int | None = None) -> dict:
        """{unit: (1 - mean cos(before, after), mean of (after - before) over all tokens)}
        for each (block index, part) unit, from one pass over the calibration inputs."""
        points = {}
        for index, part in units:
            b = anatomy.blocks[index]
            points[(index, part)] = {
                "block": (b.input, b.output),
                "attention": (b.input, b.mid),
                "mlp": (b.mid, b.output),
            }[part]
        nodes = list({node for pair in points.values() for node in pair})
        position = {node: i for i, node in enumerate(nodes)}
        values = self.stream_values(nodes, n)
        stats = {}
        for unit, (start, end) in points.items():
            cos, delta, count = [], 0.0, 0
            for v in values:
                before = v[position[start]].float().flatten(0, -2)
                after = v[position[end]].float().flatten(0, -2)
                cos.append(F.cosine_similarity(before, after, dim=-1).mean().item())
                delta = delta + (after - before).sum(0)
                count += before.shape[0]
            stats[unit] = (1.0 - sum(cos) / len(cos), delta / count)
        return stats


class _OwnState(fx.Interpreter):
    """An interpreter that reads the attributes in `mutated` (state the program writes in
    place) from copies of its own, made on first read, so runs on different inputs (or
    from one snapshot) do not meet in the program's buffers. The nodes of `fixed`
    {node: (function, source)} take function(value of source) instead of their own
    value; values in `keep` stay alive to the end of a run."""

    def __init__(self, gm: fx.GraphModule, mutated: set, fixed: dict | None = None, keep: set = frozenset()):
        super().__init__(gm)
        self.mutated, self.fixed, self.keep = mutated, fixed or {}, keep
        self.own: dict = {}

    def get_attr(self, target, args, kwargs):
        value = super().get_attr(target, args, kwargs)
        if target not in self.mutated:
            return value
        if target not in self.own:
            self.own[target] = value.clone()
        return self.own[target]

    def free(self, node: fx.Node) -> None:
        for dead in self.user_to_last_uses.get(node, []):
            if dead not in self.keep:
                del self.env[dead]

    def run_nodes(self, nodes: list[fx.Node]):
        """Run `nodes` in `self.env`, freeing values after their last use; returns the
        program's main output if the output node is among them."""
        for node in nodes:
            if node.op == "output":
                out = self.run_node(node)
                while isinstance(out, (tuple, list)):
                    out = out[0]
                return out
            if node in self.fixed:
                fn, source = self.fixed[node]
                self.env[node] = fn(self.env[source])
            else:
                self.env[node] = self.run_node(node)
            self.free(node)
        return None
