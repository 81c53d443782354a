"""Name-based pairing: every naming convention, and clear errors."""

from __future__ import annotations

import pytest
import torch

from difflora.optim import ScaledAdamW, factor_role, partner_name


@pytest.mark.parametrize("a_name,b_name", [
    ("base_model.model.down_blocks.0.attn1.to_q.lora_A.default.weight",
     "base_model.model.down_blocks.0.attn1.to_q.lora_B.default.weight"),
    ("text.emb.lora_embedding_A.default", "text.emb.lora_embedding_B.default"),
    ("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
     "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"),
    ("unet.mid.attn1.to_k.lora_down.weight", "unet.mid.attn1.to_k.lora_up.weight"),
    ("attn1.processor.to_q_lora.down.weight", "attn1.processor.to_q_lora.up.weight"),
    ("attn1.to_q.lora_layer.down.weight", "attn1.to_q.lora_layer.up.weight"),
    ("lora.down.weight", "lora.up.weight"),
])
def test_conventions_pair(a_name, b_name):
    ra, rb = factor_role(a_name), factor_role(b_name)
    assert ra is not None and rb is not None
    assert (ra[0], rb[0]) == ("A", "B") and ra[1] == rb[1]
    assert partner_name(a_name) == b_name and partner_name(b_name) == a_name


@pytest.mark.parametrize("name", ["text_model.embeddings.token_embedding.weight",
                                  "unet.to_q.lora_magnitude_vector.default.weight",
                                  "down_blocks.0.downsamplers.0.conv.weight", "up.bias", "mlp.up.weight"])
def test_plain_parameters_are_not_factors(name):
    assert factor_role(name) is None


def test_pairing_ignores_position():
    a = torch.randn(2, 5, requires_grad=True)
    b = torch.randn(4, 2, requires_grad=True)
    emb = torch.randn(3, 3, requires_grad=True)
    # B before A, a plain parameter in between, factors of different groups
    opt = ScaledAdamW([{"params": [("x.lora_B.d.weight", b), ("emb", emb)]},
                       {"params": [("x.lora_A.d.weight", a)], "lr": 1e-4}])
    (pair,) = opt._pairing()
    assert (pair.name_a, pair.name_b) == ("x.lora_A.d.weight", "x.lora_B.d.weight")
    for p in (a, b, emb):
        p.grad = torch.ones_like(p)
    before = emb.detach().clone()
    opt.step()
    assert not torch.equal(emb.detach(), before)  # the lone plain parameter is updated


def test_unpaired_factor_is_an_error_naming_the_fix():
    a = torch.randn(2, 5, requires_grad=True)
    b = torch.randn(4, 2)  # frozen partner
    with pytest.raises(ValueError, match=r"'x\.lora_A\.d\.weight' has no trainable partner 'x\.lora_B\.d\.weight'"):
        ScaledAdamW([("x.lora_A.d.weight", a), ("x.lora_B.d.weight", b)])


def test_mismatched_ranks_and_unnamed_params_are_errors():
    with pytest.raises(ValueError, match="do not form a rank-2 pair"):
        ScaledAdamW([("x.lora_A.w", torch.randn(2, 5, requires_grad=True)),
                     ("x.lora_B.w", torch.randn(4, 3, requires_grad=True))])
    with pytest.raises(ValueError, match="named parameters"):
        ScaledAdamW([torch.randn(2, 2, requires_grad=True)])
    with pytest.raises(ValueError, match="appears twice"):
        p = torch.randn(2, 2, requires_grad=True)
        ScaledAdamW([{"params": [("w", p)]}, {"params": [("w", torch.randn(2, requires_grad=True))]}])
