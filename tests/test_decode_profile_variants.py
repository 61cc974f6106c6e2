"""benchmarks/decode_profile.split_target_fields: a variant's words are pass settings,
target fields and Inductor options of the target's lowering (the profile itself needs
a GPU; reading the variant does not)."""

import pytest

import benchmark_scripts

from optc.compiler import targets
from optc.errors import UsageError


@pytest.fixture(scope="module")
def split_target_fields():
    return benchmark_scripts.load("decode_profile").split_target_fields


def test_a_variant_sets_passes_target_fields_and_inductor_options(split_target_fields):
    h200 = targets.get("h200")
    words = "prune_mlp.ratio=0.25 target.decode_attention=false target.inductor.combo_kernels=true".split()
    settings, target = split_target_fields(words, h200)
    assert settings == {"prune_mlp": {"ratio": 0.25}}
    assert h200.decode_attention and not target.decode_attention
    assert target.inductor == {**h200.inductor, "combo_kernels": True}
    assert "combo_kernels" not in h200.inductor  # the profile's target is not changed


def test_a_variant_changes_the_decoder_programs_options_apart(split_target_fields):
    h100 = targets.get("h100")
    _, target = split_target_fields(["target.decoder_inductor.combo_kernels=false"], h100)
    assert target.decoder_inductor == {**h100.decoder_inductor, "combo_kernels": False}
    assert target.inductor == h100.inductor
    assert "decoder_inductor.combo_kernels=false" in targets.lowering_words(target)
    assert targets.lowering_words(target) != targets.lowering_words(h100)  # the device history keeps them apart


def test_a_rewrite_newer_than_the_device_histories_is_named_only_when_on(split_target_fields):
    h200 = targets.get("h200")
    _, target = split_target_fields(["target.decode_qkv=true"], h200)
    assert "decode_qkv" not in targets.lowering_words(h200)  # measurements made before it still match
    assert "decode_qkv=true" in targets.lowering_words(target)


def test_a_setting_that_is_not_a_lowering_one_is_refused(split_target_fields):
    for word in ("target.fast=true", "target.align=128", "target.decode_attention=maybe", "target.decode_attention",
                 "target.decoder_inductor.=true"):
        with pytest.raises(UsageError):
            split_target_fields([word], targets.get("h200"))


def test_the_forward_profile_names_the_attention_backend_from_kernel_names():
    backends = benchmark_scripts.load("forward_profile").attention_backends
    rows = [dict(name="fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<...>)",
                 us_per_step=30.0),
            dict(name="void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>", us_per_step=5.0),
            dict(name="triton_poi_fused_add_0", us_per_step=2.0),
            dict(name="fmha_cutlassF_bf16_aligned_64x64_rf_sm80(other)", us_per_step=10.0)]
    assert backends(rows) == {"mem_efficient": 40.0, "flash": 5.0}
    assert backends(rows[2:3]) == {}
    # ViT-B/16 on the H100: a cuDNN convolution is not attention; SDPA's math path is.
    vit = [dict(name="void cutlass__5x_cudnn::Kernel<cutlass_tensorop_bf16_s16816fprop_optimized_bf16_128x128_32",
                us_per_step=83.3),
           dict(name="triton_per_fused__safe_softmax_add_arange_exp_expand_ge_prepare_softmax_online",
                us_per_step=42.8),
           dict(name="cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x64", us_per_step=71.5)]
    assert backends(vit) == {"math": 42.8, "cudnn": 71.5}
