"""The search leaves out a setting its trials' lowering makes pointless."""

from types import SimpleNamespace

from optc.compiler import targets
from optc.compiler.search.space import SearchSpace
from optc.search import settled_by_lowering, trial_lowering


def _space_params(target_name, decoder, fixed=None):
    logs = []
    measured_on, _ = trial_lowering("target", targets.get(target_name), decoder=decoder)
    settled = settled_by_lowering(fixed or {}, measured_on, decoder, logs.append)
    anatomy = SimpleNamespace(blocks=list(range(12)), causal=decoder)
    return set(SearchSpace(anatomy, "default", settled).params), settled, logs


def test_an_encoder_on_a_merging_lowering_does_not_search_merge_projections_ops():
    assert targets.get("h100").merge_gemms  # the case under test: h100 merges q/k/v in its lowering
    params, settled, logs = _space_params("h100", decoder=False)
    assert "merge_projections.ops" not in params
    assert settled["merge_projections"]["ops"] == "sparse"
    assert any("merge_projections.ops not searched" in line for line in logs)


def test_the_setting_is_searched_where_the_lowering_does_not_merge_or_the_model_is_a_decoder():
    assert "merge_projections.ops" in _space_params("cpu", decoder=False)[0]
    params, settled, logs = _space_params("h100", decoder=True)
    assert "merge_projections.ops" in params and settled == {} and logs == []


def test_a_user_fixed_setting_stays_theirs():
    fixed = {"merge_projections": {"ops": "all"}}
    params, settled, logs = _space_params("h100", decoder=False, fixed=fixed)
    assert settled == fixed and logs == [] and "merge_projections.ops" not in params
