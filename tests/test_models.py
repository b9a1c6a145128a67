"""Model families: shapes, resizing, factories, attention scale, MoE routing and load balancing."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from sharpscope.models import CNN, FAMILIES, MLP, MoE, MoELayer, Transformer, build_model


def _batch(model, n=3):
    x, y = model.example_batch(n, torch.Generator().manual_seed(0))
    return x, y


@pytest.mark.parametrize("family,out_shape", [(MLP, (3, 4)), (CNN, (3, 4)), (Transformer, (3, 16, 32)), (MoE, (3, 4))])
def test_forward_shapes_and_width_knob(family, out_shape):
    for width in (16, 48):
        model = family(width=width)
        x, y = _batch(model)
        out = model(x)
        assert out.shape == out_shape and torch.isfinite(out).all()
        assert y.shape == out_shape[:-1]
        assert model.width == width and model.with_width(2 * width).width == 2 * width
    deeper = model.with_depth(3)
    assert deeper.depth == 3 and deeper.config == {**model.config, "depth": 3}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_factory_string_with_json_kwargs_rebuilds_the_model(name):
    model = FAMILIES[name](width=32)
    kwargs = json.loads(json.dumps(model.config))
    again = build_model(model.factory, kwargs)
    assert type(again) is type(model)
    assert [(n, p.shape) for n, p in again.named_parameters()] == [(n, p.shape) for n, p in model.named_parameters()]
    assert type(build_model(name, {"width": 16})) is type(model)


def test_build_model_errors():
    with pytest.raises(ValueError, match="'module:function'"):
        build_model("perceptron", {})
    with pytest.raises(ValueError, match="cannot import"):
        build_model("no_such_module_xyz:f", {})
    with pytest.raises(ValueError, match="has no attribute"):
        build_model("sharpscope.models:Nope", {})
    with pytest.raises(ValueError, match="rejected kwargs"):
        build_model("sharpscope.models:MLP", {"widht": 3})
    with pytest.raises(ValueError, match="not an nn.Module"):
        build_model("collections:OrderedDict", {})
    with pytest.raises(ValueError, match="width must be a positive integer"):
        MLP(width=0)
    with pytest.raises(ValueError, match="multiple of head_dim"):
        Transformer(width=20, head_dim=16)
    with pytest.raises(ValueError, match="unknown activation"):
        MLP(activation="swish2")


def test_residual_variants_and_branch_multiplier():
    plain, res = MLP(width=16, depth=3), MLP(width=16, depth=3, residual=True)
    assert plain.residual_branches() == [] and len(res.residual_branches()) == 3
    x = torch.randn(5, 8)
    out = res(x)
    res.branch_multiplier = 0.0                       # branches off: input -> readout only
    expected = res.readout(res.act(res.input(x)))
    torch.testing.assert_close(res(x), expected)
    assert not torch.allclose(out, expected)
    assert len(CNN(width=8, depth=2, residual=True).residual_branches()) == 2
    assert len(Transformer(width=16, depth=2).residual_branches()) == 4


def test_attention_uses_the_explicit_logit_scale_and_is_causal():
    torch.manual_seed(0)
    model = Transformer(width=32, depth=1, heads=2, vocab_size=9, max_len=6).double()
    attn = model.blocks[0].attn
    h = torch.randn(2, 6, 32, dtype=torch.float64)

    def manual(scale):
        q, k, v = (z.reshape(2, 6, 2, 16).transpose(1, 2) for z in attn.qkv(h).split(32, -1))
        logits = (q @ k.transpose(-1, -2)) * scale
        logits = logits.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
        return attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(2, 6, 32))

    torch.testing.assert_close(attn(h), manual(1 / math.sqrt(16)))
    attn.set_logit_scale(1 / 16)
    torch.testing.assert_close(attn(h), manual(1 / 16))
    idx = torch.randint(0, 9, (1, 6))
    changed = idx.clone()
    changed[0, -1] = (idx[0, -1] + 1) % 9
    torch.testing.assert_close(model(idx)[:, :-1], model(changed)[:, :-1])     # no look-ahead
    with pytest.raises(ValueError, match="exceeds max_len"):
        model(torch.zeros(1, 7, dtype=torch.long))


def test_moe_routing_top_k_gates_and_dense_combine():
    torch.manual_seed(0)
    layer = MoELayer(width=12, num_experts=5, top_k=2).double()
    h = torch.randn(7, 12, dtype=torch.float64)
    gates, probs = layer.gates(h)
    assert ((gates > 0).sum(-1) == 2).all()
    torch.testing.assert_close(gates.sum(-1), torch.ones(7, dtype=torch.float64))
    top2 = probs.topk(2, -1).indices
    assert torch.equal((gates > 0), torch.zeros_like(gates, dtype=torch.bool).scatter(-1, top2, True))
    expected = torch.stack([sum(gates[i, e] * layer.experts[e](h[i]) for e in range(5)) for i in range(7)])
    torch.testing.assert_close(layer(h), expected)
    # Switch-Transformer balance loss: E * sum_e f_e P_e, f_e = share of the top-k slots
    f = (gates > 0).double().mean(0) / 2
    torch.testing.assert_close(layer.last_aux_loss, 5 * (f * probs.mean(0)).sum())


def test_moe_aux_loss_and_router_gradient():
    model = MoE(width=16, depth=2, aux_loss_weight=0.1)
    x, y = _batch(model, 8)
    loss = nn.functional.cross_entropy(model(x), y)
    aux = model.auxiliary_loss()
    assert aux.item() > 0 and aux.requires_grad
    (loss + aux).backward()
    assert model.blocks[0].router.weight.grad.abs().sum() > 0
    silent = MoE(width=16, aux_loss_weight=0.0)
    silent(x)
    assert silent.auxiliary_loss().item() == 0.0
    moe_tf = Transformer(width=16, depth=1, num_experts=3, top_k=1, aux_loss_weight=1.0)
    moe_tf(_batch(moe_tf)[0])
    assert moe_tf.auxiliary_loss().item() > 0
    with pytest.raises(ValueError, match="top_k=3 exceeds"):
        MoELayer(8, num_experts=2, top_k=3)


def test_moe_balance_loss_in_backward_matches_the_loop_and_leaves_eval_alone():
    """aux_loss_mode="backward": the layers add the balance loss's gradient themselves, so a plain loop
    gets the gradient of loss + aux; the loss value and eval-mode (curvature) gradients are untouched."""
    grads = {}
    for mode in ("loop", "backward"):
        torch.manual_seed(0)
        model = MoE(width=16, depth=2, aux_loss_weight=0.3, aux_loss_mode=mode).double()
        x, y = _batch(model, 8)
        x = x.double()
        loss = nn.functional.cross_entropy(model(x), y)
        total = loss + model.auxiliary_loss()
        total.backward()
        grads[mode] = [p.grad.clone() for p in model.parameters()]
        if mode == "backward":
            assert model.auxiliary_loss().item() == 0.0 and total.item() == loss.item()
            model.zero_grad()
            model.eval()
            nn.functional.cross_entropy(model(x), y).backward()
            plain = [p.grad.clone() for p in model.parameters()]
    for a, b in zip(grads["loop"], grads["backward"]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    router = [i for i, (n, _) in enumerate(model.named_parameters()) if "router" in n][0]
    assert not torch.allclose(plain[router], grads["backward"][router])     # training mode did add aux
    with pytest.raises(ValueError, match="unknown aux_loss_mode"):
        MoE(width=16, aux_loss_mode="sometimes")
