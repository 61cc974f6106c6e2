"""The search's cost model: features count what the passes remove (blocks, sparse weight
rows) and what shapes say; the roofline is monotone; the correction recovers known
coefficients; accuracy figures match hand-computed ones; the device database lives in
the cache directory, keyed by device. No timing is asserted."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import optc
from optc.compiler.search import cost_model as cm
from optc.compiler.search import device_db
from optc.models import user

# Small calibrations keep the module's four compiles quick; what is counted is the same.
SPARSE = {"sparsify_activations.sparsity": 0.5, "sparsify_activations.kernels": "sparse",
          "sparsify_activations.calibration_samples": 1}
CONFIGS = {
    "dense": {},
    "skip": {"skip_layers.count": 1, "skip_layers.granularity": "block", "skip_layers.calibration_samples": 1,
             "skip_layers.rescore_top": 1},
    # kernels=sparse: the tiny model is far under the weight size at which "auto" picks
    # the sparse ops; these tests are about counting them.
    "teal": {**SPARSE, "sparsify_activations.method": "teal"},
    "cats": {**SPARSE, "sparsify_activations.method": "cats"},
}


@pytest.fixture(scope="module")
def compiled():
    out = {}
    for name, passes in CONFIGS.items():
        entry, module, inputs = user.resolve("tiny-llama", device="cpu")
        out[name] = optc.compile(module, inputs, target="cpu", passes=passes, entry=entry, verify=False,
                                 log=lambda m: None)
    out["module"] = module
    return out


def _features(art, program="decode", manifest=True):
    return cm.program_features(art.programs[program], art.manifest if manifest else None)


def _sparse_rows(art):
    entry = next(e for e in art.manifest["passes"] if e["name"] == "sparsify_activations")
    assert entry["applied"]
    return entry["plan"]["units"]


def test_skipping_a_block_removes_its_weight_bytes(compiled):
    dense, skip = _features(compiled["dense"]), _features(compiled["skip"])
    block = sum(p.numel() * p.element_size() for n, p in compiled["module"].named_parameters() if ".layers.0." in n)
    assert dense["weight_bytes"] - skip["weight_bytes"] == pytest.approx(block, rel=0.02)
    assert skip["flops"] < dense["flops"] and skip["launches"] < dense["launches"] and skip["nodes"] < dense["nodes"]
    assert skip["bytes"] < dense["bytes"]


def test_decode_reads_every_weight_once(compiled):
    # Dense decode: every block weight, the LM head, the final norm, one embedding row.
    model = compiled["module"]
    embed = model.model.embed_tokens.weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    f = _features(compiled["dense"])
    assert f["weight_bytes"] == total - embed.numel() * embed.element_size() + embed.shape[1] * embed.element_size()
    assert f["bytes"] > f["weight_bytes"]  # plus the KV cache and activations
    assert f["launches"] == sum(count for _, _, count in f["kernels"])


@pytest.mark.parametrize("method", ["teal", "cats"])
def test_sparse_ops_read_the_planned_share_of_their_weights(compiled, method):
    art = compiled[method]
    dense, sparse = _features(compiled["dense"]), _features(art)
    ops = [str(n.target) for n in art.programs["decode"].graph.nodes if "optc" in str(n.target)]
    assert ops, "the decode program should hold optc's sparse ops"
    # Each unit's plan row counts the weights its zeros skip (TEAL: the linear's; CATS:
    # W_up and W_down), at the sparsity reached on calibration data.
    saved = sum(r["params"] * 4 * r["calibration_sparsity"] for r in _sparse_rows(art))
    assert dense["weight_bytes"] - sparse["weight_bytes"] == pytest.approx(saved, rel=0.01)
    # The sparse ops are priced apart too, and only they: every decode op of the unit.
    assert sum(c for _, _, c in sparse["sparse_kernels"]) == len(ops) and dense["sparse_kernels"] == []
    # Without the plan the ops count as dense; prefill masks and stays dense.
    assert _features(art, manifest=False)["weight_bytes"] == dense["weight_bytes"]
    assert _features(art, "prefill")["weight_bytes"] == _features(compiled["dense"], "prefill")["weight_bytes"]


class _OneSparseLinear(torch.nn.Module):
    def __init__(self, k=64, n=32):
        super().__init__()
        self.w_t = torch.nn.Parameter(torch.randn(k, n), requires_grad=False)
        self.register_buffer("sparsify_t_u", torch.tensor([0.1]))

    def forward(self, x):
        return torch.ops.optc.sparse_linear(x, self.w_t, self.sparsify_t_u, None)


@pytest.mark.parametrize("tokens", [1, 4])
def test_a_tile_of_tokens_reads_the_union_of_their_rows(tokens):
    import optc.compiler.codegen.ops  # noqa: F401  (registers optc::sparse_linear)

    ep = torch.export.export(_OneSparseLinear(), (torch.randn(tokens, 64),))
    manifest = {"passes": [{"name": "sparsify_activations", "applied": True,
                            "plan": {"units": [{"buffer": "sparsify_t_u", "sparsity": 0.5}]}}]}
    f = cm.program_features(ep, manifest)
    weight = 64 * 32 * 4
    assert f["weight_bytes"] == int(weight * (1 - 0.5**tokens))
    assert f["flops"] == int(2 * tokens * 64 * 32 * (1 - 0.5**tokens))
    assert cm.program_features(ep)["weight_bytes"] == weight


def test_a_dynamic_batch_scales_flops_and_activations():
    lin = torch.nn.Linear(32, 16)
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(lin, (torch.randn(2, 32),), dynamic_shapes=({0: batch},))
    one, eight = cm.program_features(ep, batch=1), cm.program_features(ep, batch=8)
    assert eight["flops"] == 8 * one["flops"] == 8 * 2 * 32 * 16
    assert eight["weight_bytes"] == one["weight_bytes"] == (32 * 16 + 16) * 4
    assert eight["bytes"] - one["bytes"] == 7 * (32 + 16) * 4


def _synthetic(n, seed, model, coef):
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n):
        f = {"bytes": 0, "flops": 0, "launches": int(rng.integers(20, 400)),
             "kernels": [[int(rng.integers(1e5, 1e8)), int(rng.integers(1e5, 1e10)), int(rng.integers(1, 30))]
                         for _ in range(4)]}
        f["bytes"] = sum(b * c for b, _, c in f["kernels"])
        f["flops"] = sum(fl * c for _, fl, c in f["kernels"])
        roof, launch = model.terms(f)
        samples.append((f, coef[0] * roof + coef[1] * launch + coef[2]))
    return samples


def test_roofline_is_monotone_in_bytes():
    model = cm.CostModel.prior("cpu")
    for kernels in (True, False):
        est = []
        for nbytes in np.geomspace(1e3, 1e10, 20):
            f = {"bytes": int(nbytes), "flops": 10**6, "launches": 10}
            if kernels:
                f["kernels"] = [[int(nbytes), 10**6, 1]]
            est.append(model.estimate_ms(f))
        assert all(b >= a for a, b in zip(est, est[1:])) and est[-1] > est[0]
    fitted = model.unfitted().fit(_synthetic(12, 1, model, (1.3, 0.8, 0.01)))
    est = [fitted.estimate_ms({"bytes": int(b), "flops": 0, "launches": 10}) for b in np.geomspace(1e3, 1e10, 20)]
    assert all(b >= a for a, b in zip(est, est[1:]))


def test_target_priors():
    h200 = cm.CostModel.prior("h200")
    assert h200.bandwidth_gbs == pytest.approx(4.3e3) and h200.tflops == pytest.approx(788.0)
    assert cm.CostModel.prior("a100").bandwidth_gbs == cm.DEFAULTS["cuda"]["bandwidth_gbs"]
    assert cm.CostModel.prior("cpu").tflops == cm.DEFAULTS["cpu"]["tflops"]


def test_fit_recovers_known_coefficients():
    model = cm.CostModel.prior("h200")
    coef = (1.35, 0.7, 0.02)
    samples = _synthetic(40, 0, model, coef)
    fitted = model.unfitted().fit(samples)
    assert fitted.coef[:2] == pytest.approx(coef[:2], rel=0.05)
    typical = float(np.median([ms for _, ms in samples]))
    assert fitted.coef[2] == pytest.approx(coef[2], abs=0.01 * typical)  # the constant, in ms
    for f, ms in samples + _synthetic(10, 7, model, coef):
        assert fitted.estimate_ms(f) == pytest.approx(ms, rel=0.02)
    # The fitted state survives JSON.
    again = cm.CostModel.from_dict(json.loads(json.dumps(fitted.to_dict())))
    assert again == fitted and again.estimate_ms(samples[0][0]) == fitted.estimate_ms(samples[0][0])


def test_a_device_history_starts_the_fit_and_the_studys_own_trials_take_over():
    model = cm.CostModel.prior("h200")
    elsewhere, here = (1.35, 0.7, 0.0), (1.0, 1.2, 0.0)
    started = model.unfitted().with_history(_synthetic(30, 1, model, elsewhere))
    assert started.coef[:2] == pytest.approx(elsewhere[:2], rel=0.05)  # fitted before any own trial
    own = _synthetic(12, 2, model, here)
    fitted = started.fit(own)
    test = _synthetic(10, 3, model, here)
    err = [abs(fitted.estimate_ms(f) / ms - 1) for f, ms in test]
    err_history_only = [abs(started.unfitted().with_history(started.history).estimate_ms(f) / ms - 1) for f, ms in test]
    assert max(err) < 0.5 * max(err_history_only)
    assert fitted.to_dict()["n_history"] == 30 and fitted.n_fit == 12


def test_no_sample_keeps_the_roofline_and_a_few_scale_it():
    model = cm.CostModel.prior("h200")
    f = _synthetic(1, 3, model, (1.0, 1.0, 0.0))[0][0]
    roof, launch = model.terms(f)
    assert model.unfitted().fit([]).coef is None
    assert model.unfitted().fit([]).estimate_ms(f) == pytest.approx(roof + launch)
    # One measurement at half the roofline (a launch-bound step on a fast device): every
    # estimate is scaled by it, so another configuration of the same shape lands on its time.
    halved = _synthetic(2, 4, model, (0.5, 0.5, 0.0))
    sparse = model.prior_coef[3]  # the h200's measured sparse-kernel cost scales with the rest
    anchored = model.unfitted().fit(halved[:1])
    assert anchored.n_fit == 1 and anchored.coef == pytest.approx((0.5, 0.5, 0.0, 0.5 * sparse))
    assert anchored.estimate_ms(halved[1][0]) == pytest.approx(halved[1][1])
    # Two disagreeing ones: their geometric mean; a device-history sample counts HISTORY_WEIGHT.
    mixed = [(f, 2.0 * (roof + launch)), (f, 8.0 * (roof + launch))]
    assert model.unfitted().fit(mixed).coef == pytest.approx((4.0, 4.0, 0.0, 4.0 * sparse))
    with_history = model.unfitted().with_history([(f, 8.0 * (roof + launch))]).fit([(f, 2.0 * (roof + launch))])
    scale = math.exp((math.log(2.0) + cm.HISTORY_WEIGHT * math.log(8.0)) / (1 + cm.HISTORY_WEIGHT))
    assert with_history.coef == pytest.approx((scale, scale, 0.0, scale * sparse))
    # A sample whose estimate is zero (no bytes, FLOPs or launches) scales nothing.
    empty = {"bytes": 0, "flops": 0, "launches": 0, "kernels": []}
    assert model.unfitted().fit([(empty, 1.0)]).coef is None


def test_sparse_kernels_slower_than_dense_are_learned_from_measured_trials():
    """Trials whose sparse kernels read their bytes at half the dense rate: once a few are
    measured, the fit prices the sparse roofline apart (s near 1), and estimates another
    sparse configuration where it lands instead of where the roofline puts it. Without
    sparse trials s stays at the target's prior; a model stored with three coefficients reads
    back with s = 0."""
    model = cm.CostModel.prior("h200")
    rng = np.random.default_rng(8)
    dense = _synthetic(8, 6, model, (1.0, 1.0, 0.0))
    samples = list(dense)
    for f, _ in _synthetic(8, 9, model, (1.0, 1.0, 0.0)):
        share = float(rng.uniform(0.2, 0.6))  # of the kernels' bytes in sparse ops
        f["sparse_kernels"] = [[int(b * share), fl, c] for b, fl, c in f["kernels"]]
        roof, launch = model.terms(f)
        samples.append((f, roof + launch + model.sparse_roof(f)))
    fitted = model.unfitted().fit(samples[:12])
    assert fitted.coef[3] == pytest.approx(1.0, rel=0.1)
    for f, ms in samples[12:]:
        roof, launch = model.terms(f)
        assert fitted.estimate_ms(f) == pytest.approx(ms, rel=0.05)
        assert roof + launch < 0.9 * ms  # the roofline alone was optimistic
    assert model.unfitted().fit(dense).coef[3] == pytest.approx(model.prior_coef[3], abs=1e-6)
    stored = {**fitted.to_dict(), "coef": [1.2, 0.9, 0.01]}
    assert cm.CostModel.from_dict(stored).coef == (1.2, 0.9, 0.01, 0.0)
    with pytest.raises(ValueError, match="5 coefficients"):
        cm.CostModel.from_dict({**stored, "coef": [1.0] * 5})


def test_the_prior_prices_sparse_bytes_as_the_target_measured_them():
    """Before any trial: on the h200, where optc's sparse kernels read at about half the dense
    rate, a program's sparse bytes cost twice the roofline's figure (a TEAL configuration that
    halves the bytes of its linears is then estimated at no gain); the cpu target keeps the
    roofline. The prior survives the study's stored model."""
    f = {"bytes": 10**9, "flops": 10**6, "launches": 0, "kernels": [[10**9, 10**6, 1]],
         "sparse_kernels": [[5 * 10**8, 10**6, 1]]}
    gpu, cpu = cm.CostModel.prior("h200"), cm.CostModel.prior("cpu")
    roof = gpu.terms(f)[0]
    assert gpu.prior_coef == (1.0, 1.0, 0.0, 1.0) and gpu.estimate_ms(f) == pytest.approx(1.5 * roof)
    assert cpu.prior_coef == cm.PRIOR and cpu.estimate_ms(f) == pytest.approx(cpu.terms(f)[0])
    assert cm.CostModel.from_dict(gpu.to_dict()).prior_coef == gpu.prior_coef
    assert cm.CostModel.from_dict({**gpu.to_dict(), "prior_coef": None}).prior_coef == cm.PRIOR  # stored before it
    assert gpu.unfitted().prior_coef == gpu.prior_coef


def test_fit_never_goes_negative():
    model = cm.CostModel.prior("h200")
    samples = _synthetic(20, 4, model, (1.0, 0.0, 0.0))
    samples = [(f, ms * 0.5 + 0.001 * i) for i, (f, ms) in enumerate(samples)]
    assert all(c >= 0 for c in model.unfitted().fit(samples).coef)


def test_accuracy_on_known_vectors():
    # Ranks: predicted 1,2,3,4; measured 1,2.5,2.5,4 (a tie). Deviations (-1.5,-.5,.5,1.5)
    # and (-1.5,0,0,1.5): covariance 4.5, variances 5 and 4.5, so rho = sqrt(0.9).
    # Relative errors 0, 0.2, 0.2, 0.2: mape 0.15, one of four within 10%.
    acc = cm.accuracy([1.0, 2.0, 3.0, 4.0], [1.0, 2.5, 2.5, 5.0])
    assert acc["spearman"] == pytest.approx(math.sqrt(0.9))
    assert acc["mape"] == pytest.approx(0.15)
    assert acc["within_10pct"] == pytest.approx(0.25)
    assert acc["n"] == 4
    assert cm.accuracy([3, 2, 1], [1, 2, 3])["spearman"] == pytest.approx(-1.0)
    exact = cm.accuracy([1.1, 2.0], [1.0, 2.0])  # a 10% error counts as within 10%
    assert exact["within_10pct"] == 1.0 and exact["spearman"] == pytest.approx(1.0)
    assert cm.accuracy([1.0, 1.0], [1.0, 2.0])["spearman"] is None  # constant ranks
    assert cm.accuracy([], [])["n"] == 0


def test_holdout_and_leave_one_out():
    model = cm.CostModel.prior("h200")
    samples = _synthetic(12, 5, model, (1.2, 0.9, 0.005))
    held = model.holdout_accuracy(samples, k_fit=8, seed=0)
    assert held["n"] == 4 and held["n_fit"] == 8
    assert held["mape"] < 0.05 and held["spearman"] == pytest.approx(1.0)
    loo = model.leave_one_out(samples)
    assert loo["n"] == 12 and loo["mape"] < 0.05
    assert model.coef is None  # the base model is not fitted by either
    assert cm.holdout_accuracy(samples, 8, 0, model=model) == held
    assert cm.leave_one_out(samples, model=model) == loo
    with pytest.raises(ValueError):
        model.holdout_accuracy(samples, k_fit=12, seed=0)


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("OPTC_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert device_db.cache_dir() == tmp_path / "xdg" / "optc"
    monkeypatch.setenv("OPTC_CACHE_DIR", str(tmp_path / "own"))
    assert device_db.cache_dir() == tmp_path / "own"


def test_device_record_round_trip(monkeypatch, tmp_path):
    monkeypatch.setenv("OPTC_CACHE_DIR", str(tmp_path))
    assert device_db.load("cpu") is None
    assert cm.CostModel.for_device("cpu", "cpu") == cm.CostModel.prior("cpu")
    key = device_db.device_key("cpu")
    assert key["device"].startswith("cpu") and key["torch"] == torch.__version__
    record = {"schema": device_db.SCHEMA, "key": key,
              "constants": {"bandwidth_gbs": 12.5, "tflops": 0.25, "launch_us": 3.0, "copy_gbs": 14.0}}
    path = device_db.store(record)
    assert path.parent.parent == tmp_path and path.suffix == ".json"
    assert not list(path.parent.glob("*.tmp"))
    assert device_db.load("cpu") == record
    model = cm.CostModel.for_device("cpu", "cpu")
    assert (model.bandwidth_gbs, model.tflops, model.launch_us) == (12.5, 0.25, 3.0)
    # Another torch version is another device record.
    path.write_text(json.dumps({**record, "key": {**key, "torch": "0.0"}}))
    assert device_db.load("cpu") is None


def test_device_history_keeps_samples_per_workload_and_lowering(monkeypatch, tmp_path):
    monkeypatch.setenv("OPTC_CACHE_DIR", str(tmp_path))
    decode = {"kind": "decode", "batch": 1}
    device_db.append_sample("cpu", {"workload": decode, "lowering": "plain", "features": {"bytes": 1}, "ms": 2.0})
    device_db.append_sample("cpu", {"workload": decode, "lowering": "target", "features": {"bytes": 1}, "ms": 3.0})
    device_db.append_sample("cpu", {"workload": {"kind": "forward"}, "lowering": "plain", "features": {}, "ms": 4.0})
    path = device_db.history_file(device_db.device_key("cpu"))
    with open(path, "a") as f:
        f.write('{"workload": {"kind": "decode"}, "lowe')  # a writer killed mid-line
    got = device_db.history("cpu", kind="decode", lowering="plain")
    assert [s["ms"] for s in got] == [2.0] and got[0]["at"]
    assert device_db.history("cpu", kind="forward", lowering="target") == []


def test_calibration_on_cpu_stores_a_record_keyed_by_device(monkeypatch, tmp_path):
    monkeypatch.setenv("OPTC_CACHE_DIR", str(tmp_path))
    messages = []
    made = cm.calibrate_device("cpu", quick=True, log=messages.append)
    record = device_db.load("cpu")
    assert record is not None and messages and made["constants"] == record["constants"]
    model = cm.CostModel.for_device("cpu", "cpu")
    assert device_db.key_file(device_db.device_key("cpu")).exists()
    assert record["key"] == device_db.device_key("cpu")
    c = record["constants"]
    assert all(c[k] > 0 for k in ("bandwidth_gbs", "copy_gbs", "tflops", "launch_us"))
    assert model.source.startswith("calibrated") and model.bandwidth_gbs == c["bandwidth_gbs"]
    assert len(record["measurements"]["gemv"]) == len(device_db.SIZES["quick"]["gemv"])


def test_the_cost_model_imports_neither_runtime_nor_cli():
    code = ("import sys, optc.compiler.search.cost_model as m; "
            "bad = [k for k in sys.modules if k.startswith(('optc.runtime', 'optc.cli', 'triton'))]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_studys_lowering_label_changes_with_the_targets_lowering():
    from optc.compiler import targets
    from optc.search import trial_lowering

    h200 = targets.get("h200")
    measured_on, label = trial_lowering("target", h200)
    assert measured_on is h200 and label.startswith("target: ")
    assert "decode_attention=true" in label and "inductor.triton.enable_pdl=true" in label
    without = targets.with_overrides(h200, ["decode_attention=false"])
    assert trial_lowering("target", without)[1] != label  # its trials are another study's
    plain_on, plain = trial_lowering("plain", h200)
    assert plain_on.inductor == {} and "inductor." not in plain and plain != label
    h100 = targets.get("h100")
    assert h100.decoder_inductor and "decoder_inductor.combo_kernels=true" in trial_lowering("target", h100)[1]
    plain_on, plain = trial_lowering("plain", h100)
    assert plain_on.inductor == {} and plain_on.decoder_inductor == {} and "inductor." not in plain
    # An encoder's lowering on h100 did not change with the decoder options: nor does its label.
    encoder_on, encoder = trial_lowering("target", h100, decoder=False)
    assert encoder_on.decoder_inductor == {} and "decoder_inductor" not in encoder
    assert encoder_on.inductor == h100.inductor
