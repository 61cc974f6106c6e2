"""torch.compile(backend="optc") on the GPU: the target's lowering (patch GEMM, merged q/k/v,
optc's encoder attention where the target has it) on a bf16 ViT and a padded bf16 BERT,
against the eager model; with and without token merging."""

import pytest
import torch

from bf16_checks import _needs_cuda  # noqa: F401 (fixture)

from optc.backend import optc_backend

pytestmark = pytest.mark.gpu


def _vit():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=64, patch_size=16, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=256)
    model = ViTForImageClassification(cfg).eval().to("cuda", torch.bfloat16)
    return model, {"pixel_values": torch.randn(2, 3, 64, 64, device="cuda", dtype=torch.bfloat16)}, "logits"


def _bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=256, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=256)
    model = BertModel(cfg).eval().to("cuda", torch.bfloat16)
    mask = torch.ones(2, 32, dtype=torch.long, device="cuda")
    mask[1, 20:] = 0
    ids = torch.randint(0, 256, (2, 32), device="cuda")
    return model, {"input_ids": ids, "attention_mask": mask}, "pooler_output"


@pytest.mark.parametrize("build", [_vit, _bert])
@pytest.mark.parametrize("sets", [{}, {"merge_tokens.r": 2}])
def test_the_backend_on_cuda_matches_eager(build, sets):
    model, inputs, output = build()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=lambda gm, ex: optc_backend(gm, ex, {"strict": True, **sets}))
    with torch.no_grad():
        ref = getattr(model(**inputs), output).float()
        out = getattr(compiled(**inputs), output).float()
    torch._dynamo.reset()
    cos = torch.nn.functional.cosine_similarity(out, ref, dim=-1).min().item()
    assert cos > (0.99 if not sets else 0.95), cos
