"""The graph facts the anatomy's residual-point search reads (compiler/anatomy.py),
computed once per graph."""

from __future__ import annotations

import heapq

import networkx as nx
import torch.fx as fx


class Walk:
    """What the anatomy's searches read, computed once per graph: the DAG, each
    node's position, and the post-dominator tree (for every node, the nearest node that
    every path from it to the output passes through). One dominator analysis per graph
    instead of one per block: a search reads each program's anatomy several times a
    trial (benchmarks/NOTES.md)."""

    def __init__(self, graph: fx.Graph):
        self.dag = nx.DiGraph()  # node -> its users
        for node in graph.nodes:
            self.dag.add_node(node)
            self.dag.add_edges_from((node, user) for user in node.users)
        self.sink = next(iter(graph.find_nodes(op="output")))
        self.order = {n: i for i, n in enumerate(graph.nodes)}
        self.post_dominator = nx.immediate_dominators(self.dag.reverse(copy=False), self.sink)

    def latest_ancestor(self, node: fx.Node, accept) -> fx.Node | None:
        """The latest node in graph order among `node` and its ancestors that `accept`s.
        Walks back from `node`, latest first: every node not yet reached comes earlier
        than the one taken, so the first accepted is the latest."""
        heap, seen = [(-self.order[node], node)], {node}
        while heap:
            _, n = heapq.heappop(heap)
            if accept(n):
                return n
            for p in self.dag.predecessors(n):
                if p not in seen:
                    seen.add(p)
                    heapq.heappush(heap, (-self.order[p], p))
        return None
