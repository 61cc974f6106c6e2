"""Shared fixtures: tiny Hugging Face models (random weights, fixed seeds) and their
captured programs, built once per test session."""

import os
import warnings


def _share_the_cores() -> int | None:
    """Under pytest-xdist each worker gets its share of the cores: torch's intra-op
    threads and Inductor's compile workers sized for the whole machine in every worker
    (and in the CLI processes the tests start, which inherit this environment) would
    oversubscribe it, and threads waiting on each other slow every worker down. Set
    before torch is imported; a value already in the environment is kept."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
    if workers < 2:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    share = str(max(1, cores // workers))
    for name in ("OMP_NUM_THREADS", "TORCHINDUCTOR_COMPILE_THREADS"):
        os.environ.setdefault(name, share)
    value = os.environ["OMP_NUM_THREADS"]
    return int(value) if value.isdigit() else None


_THREADS = _share_the_cores()

import pytest  # noqa: E402
import torch  # noqa: E402

if _THREADS is not None:
    torch.set_num_threads(_THREADS)  # also where a plugin imported torch before this file

warnings.filterwarnings("ignore", message=".*not properly registered as a parameter.*")


@pytest.fixture(autouse=True, scope="session")
def _own_cache_dir(tmp_path_factory):
    """optc's cache (device records, the search's latency history) in a fresh folder for
    the test run: what a user's earlier runs stored must not change what a test sees."""
    import os

    before = os.environ.get("OPTC_CACHE_DIR")
    os.environ["OPTC_CACHE_DIR"] = str(tmp_path_factory.mktemp("optc-cache"))
    yield
    if before is None:
        os.environ.pop("OPTC_CACHE_DIR", None)
    else:
        os.environ["OPTC_CACHE_DIR"] = before


def tiny_llama(layers=4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval().requires_grad_(False)


def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=256, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128)
    return BertModel(cfg, add_pooling_layer=False).eval().requires_grad_(False)


def tiny_vit():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                    intermediate_size=128, num_labels=10)
    return ViTForImageClassification(cfg).eval().requires_grad_(False)


@pytest.fixture(scope="session")
def llama_captured():
    from optc.compiler import capture

    model = tiny_llama()
    return model, capture.capture(model, (torch.zeros(1, 8, dtype=torch.long),), max_cache_len=64)


@pytest.fixture(scope="session")
def bert_captured():
    from optc.compiler import capture

    model = tiny_bert()
    inputs = (torch.randint(0, 256, (2, 12)), torch.ones(2, 12, dtype=torch.long))
    return model, capture.capture(model, inputs)


@pytest.fixture(scope="session")
def vit_captured():
    from optc.compiler import capture

    model = tiny_vit()
    return model, capture.capture(model, (torch.randn(2, 3, 32, 32),))


def _postgres():
    """tests/postgres.py, loaded by its path (tests/ is not a package)."""
    import importlib.util
    import sys
    from pathlib import Path

    name = "optc_tests_postgres"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("postgres.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="session")
def postgres_url():
    """URL (SQLAlchemy form) of a real PostgreSQL server's database, for the whole session: from
    OPTC_TEST_POSTGRES_URL, or a throwaway server that `.ci/postgres.sh` starts and stops around the
    session. Without either the test skips, and fails when OPTC_REQUIRE_POSTGRES=1 (tests/postgres.py)."""
    yield from _postgres().session_server()


@pytest.fixture
def postgres_db_url(postgres_url, request):
    """A fresh, empty database on that server for this test alone (dropped after it), as a URL that
    optuna.storages.RDBStorage takes: studies do not leak between tests."""
    pg = _postgres()
    name = pg.database_name(request.node.name)
    url = pg.create_database(postgres_url, name)
    yield url
    pg.drop_database(postgres_url, name)


def _decode_step_and_full(gms, ids):
    """Prefill all but the last token, hand its KV caches to the decode program, decode the
    last token; returns (decode logits, prefill logits of the whole sequence)."""
    prefill, decode = gms["prefill"], gms["decode"]
    n = ids.shape[1] - 1
    prefill(input_ids=ids[:, :n], cache_position=torch.arange(n))
    decode_buffers = dict(decode.named_buffers())  # names may be dotted (a wrapper's prefix)
    for bname, buf in prefill.named_buffers():
        if "cache" in bname and bname in decode_buffers:
            decode_buffers[bname].copy_(buf)
    step = decode(input_ids=ids[:, n:], cache_position=torch.tensor([n]))
    return step, prefill(input_ids=ids, cache_position=torch.arange(n + 1))


@pytest.fixture
def decode_after_prefill():
    return _decode_step_and_full


@pytest.fixture
def eager_lower(monkeypatch) -> list:
    """lowering.lower replaced by dynamo without Inductor (a load's fallback path in
    seconds); the list collects the options of every call."""
    from optc.compiler.codegen import lowering

    calls = []

    def lower(gm, target, **options):
        calls.append(options)
        return torch.compile(gm, backend="eager", fullgraph=True, dynamic=False)

    monkeypatch.setattr(lowering, "lower", lower)
    return calls


@pytest.fixture
def make_tiny_llama():
    """tiny_llama itself, for tests that build a fresh model (conftest modules of
    subfolders shadow `import conftest`)."""
    return tiny_llama


@pytest.fixture(scope="session")
def make_tiny_bert():
    """tiny_bert itself (`from conftest import` finds whichever conftest.py loaded last)."""
    return tiny_bert


@pytest.fixture(scope="session")
def make_tiny_vit():
    return tiny_vit


# -- what `make test-fast` leaves out ------------------------------------------------------
# Tests marked `slow` here by node-id prefix (a file, or file::test for all its parameters)
# on top of the files that mark themselves: end-to-end work that takes seconds each on CI's
# 2 cores: compiling and re-exporting whole models, decode loops, calibration repairs, the
# CLI in subprocesses, Inductor lowering. One list, so a daily run's gaps are in one place;
# `make test` runs them all. Chosen from per-test durations (about 3 s and above on a busy
# 2-core machine; the fixtures of a file move with its first test).
SLOW_TESTS = (
    # the CLI and the dynamo backend in fresh interpreters, each loading and compiling a model
    "tests/test_cli.py", "tests/test_bench_cli.py", "tests/test_export_cli.py", "tests/test_backend.py",
    "tests/models/test_calibration_file.py::test_cli_", "tests/models/test_user_text_data.py::test_cli_",
    # Triton's compiler for sm_90 in a subprocess, every kernel
    "tests/compiler/codegen/test_compiles_for_hopper.py",
    "tests/compiler/codegen/test_token_merge_kernels.py::test_kernels_compile_for_sm90_bf16",
    # whole-model compiles with verification, Inductor lowering, re-export
    "tests/compiler/codegen/test_verify_thresholded.py::test_optc_compile_verifies_a_thresholded_model_at_both_ends",
    "tests/compiler/codegen/test_rounding_noise.py::test_inductor_lowering_of_a_bf16_llama_passes_within_its_noise",
    # (these three share a module fixture that compiles a model with each sparsity method)
    "tests/compiler/search/test_cost_model.py::test_skipping_a_block_removes_its_weight_bytes",
    "tests/compiler/search/test_cost_model.py::test_decode_reads_every_weight_once",
    "tests/compiler/search/test_cost_model.py::test_sparse_ops_read_the_planned_share_of_their_weights",
    "tests/compiler/test_gpt2.py::test_lossy_passes_apply_and_decode_continues_prefill",
    "tests/compiler/test_merge_projections.py",
    "tests/compiler/test_merge_tokens.py::test_padded_bert_with_token_outputs_lowers_through_inductor",
    # least-squares repair on calibration data, decode after prefill, artifacts generating
    "tests/compiler/test_prune_heads.py::test_lstsq_repair_lowers_the_calibration_error",
    "tests/compiler/test_prune_heads.py::test_with_prune_mlp",
    "tests/compiler/test_prune_heads.py::test_decode_continues_prefill_and_reexport",
    "tests/compiler/test_prune_heads.py::test_artifact_generates_over_the_narrow_cache",
    "tests/compiler/test_prune_heads.py::test_global_allocation_leaves_some_layers_whole",
    "tests/compiler/test_prune_heads.py::test_after_skip_layers_removed_an_attention",
    "tests/compiler/test_prune_mlp.py::test_repair_lowers_calibration_error",
    "tests/compiler/test_prune_mlp.py::test_decode_continues_prefill_and_reexport",
    "tests/compiler/test_prune_mlp.py::test_widths_are_multiples_of_align",
    "tests/compiler/test_prune_mlp.py::test_half_pruned_matches_eager_with_channels_zeroed",
    "tests/compiler/test_pruning_models.py::test_pruned_widths_heads_and_numerics",
    "tests/compiler/test_pruning_models.py::test_gpt2_heads_match_eager_with_heads_zeroed",
    # compile sessions: several full compiles each, held-out evaluation
    "tests/compiler/test_session.py",
    # greedy skip plans on calibration data, sub-layer skips re-captured
    "tests/compiler/test_skip_layers.py::test_sublayer_budget_in_block_equivalents",
    "tests/compiler/test_skip_layers.py::test_anatomy_reads_blocks_left_with_one_half",
    "tests/compiler/test_skip_layers.py::test_count_selects_by_calibration",
    "tests/compiler/test_skip_layers.py::test_compensation_adds_mean_output",
    # other decoder architectures built, sparsified and compiled end to end
    "tests/models/test_user_architectures.py",
    "tests/models/test_calibration_file.py::test_pt_file_round_trips_and_changes_the_config_hash",
    # each a few seconds: whole tiny models pruned, shared or sparsified and compared or re-exported
    "tests/compiler/test_prune_heads.py::test_llama_matches_eager_with_heads_zeroed",
    "tests/compiler/test_prune_heads.py::test_encoders",
    "tests/compiler/test_prune_mlp.py::test_encoders_with_biases",
    "tests/compiler/test_share_kv_heads.py::test_works_with_the_other_passes",
    "tests/compiler/test_share_kv_heads.py::test_batch_of_two_sequences",
    "tests/compiler/test_share_kv_heads.py::test_decode_attends_to_shared_heads_and_is_unchanged",
    "tests/compiler/test_sparsify_activations.py::test_reexport_runs_on_cpu",
    "tests/compiler/codegen/test_verify_thresholded.py::test_a_faithful_lowering_passes_and_the_thresholds_come_back",
    # decode loops over held-out text, artifacts compiled, packaged, loaded and timed
    "tests/runtime/test_decode_quality.py",
    "tests/runtime/test_packages.py",
    "tests/runtime/test_shared_weights.py",
    "tests/runtime/test_measure.py::test_forward_latency",
    "tests/runtime/test_measure.py::test_decode_latency_and_remeasure",
    "tests/runtime/test_loaded.py::test_manifest_records_the_lowering_the_check_used",
    "tests/runtime/test_loaded.py::test_second_generate_reuses_the_decoder",
    "tests/runtime/test_loaded.py::test_loading_lowers_for_the_manifest_target_not_a_detected_one",
    # a compile, then a load in a fresh interpreter
    "tests/runtime/test_kernel_cache.py::test_a_fresh_process_runs_the_recorded_kernels",
    "tests/runtime/test_loaded.py::test_a_prefill_length_chosen_at_compile_is_what_a_load_chunks_by",
    # least-squares refits and whole-model passes on other architectures, several seconds each
    "tests/compiler/test_prune_heads.py::test_sequential_refit_lowers_the_calibration_error",
    "tests/compiler/test_opt.py::test_the_default_pipeline_gives_the_models_greedy_tokens",
    "tests/compiler/test_parallel_blocks.py::test_channel_passes_apply_and_decode_continues_prefill",
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.startswith(SLOW_TESTS):
            item.add_marker(pytest.mark.slow)
