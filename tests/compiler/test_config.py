import pytest

from optc.compiler import pipeline
from optc.compiler.config import config_hash, flat_to_nested, parse_sets
from optc.errors import UsageError


def test_parse_and_resolve():
    sets = parse_sets(["skip_layers.count=4", "skip_layers.layers=[3,7]", "skip_layers.granularity=block"])
    assert sets == {"skip_layers": {"count": 4, "layers": [3, 7], "granularity": "block"}}
    cfg = pipeline.resolve("default", sets)
    assert cfg["passes"]["skip_layers"]["layers"] == [3, 7]
    assert cfg["hash"] == config_hash(cfg)


@pytest.mark.parametrize(
    "item, words",
    [
        ("nosuch.count=1", ["unknown pass 'nosuch'"]),
        ("skip_layers.cnt=1", ["unknown key 'skip_layers.cnt'", "skip_layers.count"]),
        ("skip_layers.count=-1", ["skip_layers.count", "out of range"]),
        ("skip_layers.count=1.5", ["skip_layers.count", "not a valid int"]),
        ("skip_layers.granularity=rows", ["skip_layers.granularity", "not one of"]),
        ("skip_layers.layers=[1,1]", ["twice"]),
        ("skip_layers", ["PASS.KEY=VALUE"]),
    ],
)
def test_bad_settings_name_the_key(item, words):
    with pytest.raises(UsageError) as err:
        pipeline.resolve("default", parse_sets([item]))
    for w in words:
        assert w in str(err.value)


def test_unknown_pipeline_and_pass_outside_pipeline():
    with pytest.raises(UsageError, match="unknown pipeline"):
        pipeline.resolve("fastest", {})
    with pytest.raises(UsageError, match="not in pipeline 'none'"):
        pipeline.resolve("none", {"skip_layers": {"count": 1}})


def test_hash_ignores_key_order_and_changes_with_values():
    a = pipeline.resolve("default", flat_to_nested({"skip_layers.count": 2}))
    b = pipeline.resolve("default", {"skip_layers": {"count": 2}})
    c = pipeline.resolve("default", {"skip_layers": {"count": 3}})
    assert a["hash"] == b["hash"] != c["hash"]


def test_search_space_declared():
    from optc.compiler.passes.skip_layers import SkipLayersConfig

    space = SkipLayersConfig.search_space()
    assert space["count"].kind == "int" and space["count"].bound == "blocks"
    # granularity is searched only where something is removed
    assert space["granularity"].holds({"count": 2}) and not space["granularity"].holds({"count": 0})
