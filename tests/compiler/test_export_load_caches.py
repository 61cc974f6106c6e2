"""The parse cache around torch.export.load (torch_private.export_load_sympify_cached)
leaves to sympy the calls whose result its key could not tell apart."""

import sympy
from torch._export.serde import serialize

from optc.compiler import torch_private as tp


def test_a_locals_entry_for_a_name_the_parser_looks_up_unseen_is_not_cached():
    def symbol(name, **kw):
        return sympy.Integer(9)

    with tp.export_load_sympify_cached():
        parse = serialize.sympy.sympify
        assert parse("x + 2") == sympy.sympify("x + 2")
        # "Symbol" is not in the string, so the key cannot see it: parsed afresh
        assert parse("x + 2", locals={"Symbol": symbol}) == sympy.sympify("x + 2", locals={"Symbol": symbol}) == 11
    assert serialize.sympy is sympy
