"""The residual-point search's graph facts (compiler/residual_walk.py) on a small graph
whose answers are known: the post-dominator chain, and the latest accepted ancestor."""

import torch.fx as fx

from optc.compiler.residual_walk import Walk


def _graph():
    def f(x, y):
        a = x + 1          # add: both branches below read it
        b = a * 2          # mul
        c = a - 3          # sub
        d = b + c          # add_1: every path from `a` to the output passes here
        e = d.relu()       # relu
        return e + y       # add_2

    return fx.symbolic_trace(f).graph


def test_post_dominators_and_the_latest_accepted_ancestor():
    graph = _graph()
    walk = Walk(graph)
    node = {n.name: n for n in graph.nodes}
    chain, n = [], node["add"]
    while n is not walk.sink:
        n = walk.post_dominator[n]
        chain.append(n.name)
    assert chain == ["add_1", "relu", "add_2", "output"]  # mul and sub are each on one path only
    assert walk.latest_ancestor(node["add_1"], lambda n: n.op == "call_function" and n.name != "add_1").name == "sub"
    assert walk.latest_ancestor(node["add_1"], lambda n: n.op == "placeholder").name == "x"
    assert walk.latest_ancestor(node["add_1"], lambda n: n.name == "y") is None  # not an ancestor
