"""abc-parameterizations: the tables at three widths, the Everett et al. symmetry, round trips, user models, errors."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from sharpscope.models import CNN, MLP, MoE, Transformer
from sharpscope.optim import OptimizerList, build_optimizer
from sharpscope.param import PARAMETERIZATIONS, Multiplier, eps_exponent, infer_roles, lr_exponent, parametrize, parametrize_from_record

H = 0.5
# Everett et al. 2024, Table 1 / docs/science.md, written out independently of sharpscope.param's data:
# (a, b) per base role (embedding, hidden, readout) ...
AB = {"sp": ((0, 0), (0, H), (0, H)), "ntk": ((0, 0), (H, 0), (H, 0)),
      "mup": ((-H, H), (0, H), (H, H)), "mf": ((0, 0), (H, 0), (1, 0))}
# ... and full-alignment lr exponents c per optimizer
C = {("sp", "sgd"): (-H, H, 1), ("sp", "adam"): (0, 1, 1), ("sp", "adafactor"): (0, H, H),
     ("ntk", "sgd"): (-H, -H, 0), ("ntk", "adam"): (0, H, H), ("ntk", "adafactor"): (0, H, H),
     ("mup", "sgd"): (0, 0, 0), ("mup", "adam"): (H, 1, H), ("mup", "adafactor"): (0, H, 0),
     ("mf", "sgd"): (-1, -1, -1), ("mf", "adam"): (0, H, 0), ("mf", "adafactor"): (0, H, 0)}
BASE = {"embedding": 0, "vector": 0, "hidden": 1, "expert": 1, "readout": 2, "router": 2}
WIDTHS = (64, 128, 256)


def expected_c(param: str, opt: str, role: str, ndim: int, scaling: str) -> float:
    if role == "fixed" or scaling == "global":
        return 0.0
    i = BASE[role]
    if opt == "muon" and i == 1 and ndim == 2:
        return -AB[param][1][0]           # orthogonal update, adjust_lr_fn="original": c = -a
    c = C[(param, "adam" if opt in ("adamw", "muon") else opt)][i]
    return c - 0.5 if scaling == "no_alignment" and i in (1, 2) else c


def base_std(name: str, model: nn.Module, base: nn.Module) -> float:
    shape = dict(base.named_parameters())[name].shape
    return 1.0 / math.sqrt(math.prod(shape[1:]))


@pytest.mark.parametrize("family", [MLP, MoE])
@pytest.mark.parametrize("param", ["sp", "ntk", "mup", "mf"])
def test_table_init_lr_and_multipliers_at_three_widths(family, param):
    base = family(width=32, depth=1)
    seen_roles = set()
    for width in WIDTHS:
        m = width / 32
        for opt in ("sgd", "adam", "adamw", "adafactor", "muon"):
            for scaling in ("global", "full_alignment", "no_alignment"):
                model = family(width=width, depth=1).double()
                groups = parametrize(model, param, optimizer=opt, lr=0.1, base_width=32, lr_scaling=scaling)
                for g in groups:
                    role, t = g["role"], g["params"][0]
                    seen_roles.add(role)
                    a, b = (0, 0) if role == "fixed" else AB[param][BASE[role]]
                    assert g["width_mult"] == (1.0 if role == "fixed" else m)
                    assert g["multiplier"] == pytest.approx(m ** -a if role != "fixed" else 1.0, rel=1e-12)
                    c = expected_c(param, opt, role, t.ndim, scaling)
                    assert g["lr"] == pytest.approx(0.1 * m ** -c, rel=1e-12), (g["name"], opt, scaling)
                    assert g["optimizer"] == (("muon" if role in ("hidden", "expert") else "adamw")
                                              if opt == "muon" else opt)
                if opt != "sgd" or scaling != "full_alignment":
                    continue
                for g in groups:                                   # init: exact formula + sample check
                    role, t = g["role"], g["params"][0]
                    a, b = (0, 0) if role == "fixed" else AB[param][BASE[role]]
                    if g["init"]["kind"] == "normal":
                        std = base_std(g["name"], model, base) * m ** -b
                        assert g["init"]["std"] == pytest.approx(std, rel=1e-12)
                        assert float(t.detach().std()) == pytest.approx(std, rel=0.1 if t.numel() > 500 else 0.35)
                    else:
                        assert g["init"]["value"] == 0.0 and torch.all(t == 0)
                    module, attr = g["name"].rsplit(".", 1)
                    used = getattr(model.get_submodule(module), attr)    # W = m^{-a} w in the forward pass
                    torch.testing.assert_close(used, t * g["multiplier"], rtol=1e-14, atol=0)
    expected = {"embedding", "vector", "readout", "fixed"} | ({"hidden"} if family is MLP else {"router", "expert"})
    assert seen_roles == expected


def test_default_lr_scaling_is_global_for_sp_ntk_and_table_for_mup_mf():
    for param, scaling in [("sp", "global"), ("ntk", "global"), ("mup", "full_alignment"), ("mf", "full_alignment")]:
        groups = parametrize(MLP(width=128), param, optimizer="adam", lr=1e-2, base_width=32)
        assert groups.record["lr_scaling"] == scaling
        assert {g["lr"] == 1e-2 for g in groups} == ({True} if scaling == "global" else {True, False})


def test_layer_norm_gains_and_transformer_roles():
    model = Transformer(width=64, depth=1, vocab_size=11, max_len=5, head_dim=16).double()
    groups = parametrize(model, "mup", optimizer="adam", lr=1e-2, base_width=16)
    by = {g["name"]: g for g in groups}
    assert by["tok_emb.weight"]["role"] == by["pos_emb.weight"]["role"] == "embedding"
    assert by["blocks.0.attn.qkv.weight"]["role"] == by["blocks.0.mlp.fc2.weight"]["role"] == "hidden"
    assert by["readout.weight"]["role"] == "readout" and by["readout.bias"]["role"] == "fixed"
    gain = by["blocks.0.ln1.weight"]
    assert gain["role"] == "vector" and gain["init"] == {"kind": "constant", "value": 0.5}   # 1 * 4^{-1/2}
    assert torch.allclose(model.blocks[0].ln1.weight, torch.ones(64, dtype=torch.float64))  # W = 2 * 0.5
    assert float(model.tok_emb.weight.detach().std()) == pytest.approx(1.0, rel=0.05)  # nn.Embedding: sigma_0 = 1


def test_attention_logit_scale_rules():
    fixed_heads = Transformer(width=64, depth=1, heads=2, vocab_size=7, max_len=4)       # head_dim grows 8 -> 32
    parametrize(fixed_heads, "mup", optimizer="adam", base_width=16)
    assert fixed_heads.blocks[0].attn.logit_scale == pytest.approx(math.sqrt(8) / 32)
    parametrize(fixed_heads, "sp", optimizer="adam", base_width=16)
    assert fixed_heads.blocks[0].attn.logit_scale == pytest.approx(1 / math.sqrt(32))
    groups = parametrize(fixed_heads, "sp", optimizer="adam", base_width=16, attention="1/d")
    assert groups.record["attention"]["rule"] == "1/d"
    fixed_dim = Transformer(width=64, depth=1, head_dim=16, vocab_size=7, max_len=4)     # heads grow: 1/sqrt(16)
    parametrize(fixed_dim, "mup", optimizer="adam", base_width=16)
    assert fixed_dim.blocks[0].attn.logit_scale == pytest.approx(0.25)


# -- the symmetry (a, b, c) -> (a + t, b - t, c') ------------------------------------------------------------
def _trajectory(param, opt, seed=0, steps=4, **opt_kwargs):
    torch.manual_seed(0)
    model = MLP(width=128, depth=2, in_features=5, out_features=3, activation="tanh").double()
    groups = parametrize(model, param, optimizer=opt, lr=0.05 if opt == "sgd" else 1e-2, base_width=32,
                         lr_scaling="full_alignment", seed=seed)
    optimizer = build_optimizer(groups, **opt_kwargs)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(24, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (24,), generator=g)
    outs = []
    for _ in range(steps):
        out = model(x)
        outs.append(out.detach())
        optimizer.zero_grad()
        nn.functional.cross_entropy(out, y).backward()
        optimizer.step()
    return torch.stack(outs + [model(x).detach()])


@pytest.mark.parametrize("opt,kwargs", [("sgd", {}), ("adam", {"eps": 1e-30}), ("adafactor", {})])
def test_named_equivalence_classes_train_identically(opt, kwargs):
    """NTK = SP shifted by t = 1/2 (hidden, readout); MF = muP shifted by t = 1/2 everywhere."""
    torch.testing.assert_close(_trajectory("ntk", opt, **kwargs), _trajectory("sp", opt, **kwargs),
                               rtol=1e-9, atol=1e-12)
    if opt == "adafactor":  # biases start at 0 < eps2: Adafactor's RMS(w) floor breaks the vector-role shift
        return
    torch.testing.assert_close(_trajectory("mf", opt, **kwargs), _trajectory("mup", opt, **kwargs),
                               rtol=1e-9, atol=1e-12)


MUON_EXACT = {"eps": 1e-30, "adamw_kwargs": {"eps": 1e-30}}


@pytest.mark.parametrize("opt,kwargs,role,t", [
    *[(o, k, r, t) for o, k in [("sgd", {}), ("adam", {"eps": 1e-30}), ("adafactor", {})]
      for r, t in [("hidden", 0.3), ("readout", -0.4), ("embedding", 0.25)]
      if (o, r) != ("adafactor", "embedding")],   # zero-init biases sit below Adafactor's eps2 floor on RMS(w)
    # torch's Muon orthogonalizes in bfloat16: the symmetry is exact only for power-of-2 rescalings (4^{1/2} = 2)
    ("muon", MUON_EXACT, "hidden", 0.5), ("muon", MUON_EXACT, "hidden", -0.5), ("muon", MUON_EXACT, "readout", 0.3)])
def test_everett_symmetry_leaves_trajectory_unchanged(opt, kwargs, role, t):
    base = PARAMETERIZATIONS["mup"]
    shifted = base.shifted(role, t)
    e0, e1 = base.exponents(role), shifted.exponents(role)
    assert (e1.a, e1.b) == (e0.a + t, e0.b - t)
    assert (e1.c_sgd, e1.c_adam, e1.c_adafactor) == (e0.c_sgd - 2 * t, e0.c_adam - t, e0.c_adafactor)
    ref, moved = _trajectory(base, opt, **kwargs), _trajectory(shifted, opt, **kwargs)
    assert not torch.allclose(ref[-1], ref[0])                     # it did train
    torch.testing.assert_close(moved, ref, rtol=1e-9, atol=1e-12)


def test_symmetry_is_not_a_tautology():
    """Changing a without compensating b and c does change the trajectory."""
    p = PARAMETERIZATIONS["mup"]
    broken = type(p)(p.name, p.embedding, type(p.hidden)(0.3, p.hidden.b, p.hidden.c_sgd, p.hidden.c_adam,
                                                          p.hidden.c_adafactor), p.readout)
    assert not torch.allclose(_trajectory(broken, "sgd"), _trajectory(p, "sgd"), rtol=1e-3)


# -- round trips ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", [MLP, CNN, Transformer, MoE])
def test_state_dict_round_trip_and_functional_call(family):
    model = family(width=64).double()
    groups = parametrize(model, "mup", optimizer="adam", lr=1e-2, base_width=16, seed=3)
    x, _ = model.example_batch(3, torch.Generator().manual_seed(0))
    x = x.double() if x.is_floating_point() else x
    out = model(x)
    named = dict(model.named_parameters())
    assert {id(t) for t in named.values()} == {id(g["params"][0]) for g in groups}
    assert any("parametrizations" in n for n in named)
    # functional_call with the trainable tensors: same output; with changed tensors: the changed model's output
    torch.testing.assert_close(functional_call(model, named, (x,)), out, rtol=0, atol=0)
    doubled = {n: 1.5 * t.detach() for n, t in named.items()}
    via_call = functional_call(model, doubled, (x,))
    fresh = family(width=64).double()
    parametrize_from_record(fresh, json.loads(json.dumps(groups.record)))
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(x), out, rtol=0, atol=0)
    with torch.no_grad():
        for n, t in fresh.named_parameters():
            t.copy_(doubled[n])
    torch.testing.assert_close(fresh(x), via_call, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(via_call, out)


def test_record_is_json_and_reproduces_groups():
    model = MoE(width=64, depth=1)
    groups = parametrize(model, "mf", optimizer="muon", lr=3e-3, base_width=16, depth_scaling=True)
    rec = json.loads(json.dumps(groups.record))
    assert rec["format"] == "sharpscope.parameterization/1"
    assert rec["parameterization"]["name"] == "mf" and rec["base_width"] == 16 and rec["width"] == 64
    again = parametrize_from_record(MoE(width=64, depth=1), rec)
    assert [(g["name"], g["lr"], g["multiplier"]) for g in again] == [(g["name"], g["lr"], g["multiplier"]) for g in groups]
    with pytest.raises(ValueError, match="does not match the record"):
        parametrize_from_record(MoE(width=32, depth=1), rec)


def test_reparametrizing_replaces_multipliers():
    model = MLP(width=64)
    parametrize(model, "mup", optimizer="adam", base_width=16)
    parametrize(model, "mf", optimizer="adam", base_width=16)
    scaled = {n for n, m in model.named_modules() if hasattr(m, "parametrizations") and "parametrizations" not in n}
    assert scaled == {"hidden.0", "hidden.1", "readout"}             # MF: a = 1/2 hidden, 1 readout, 0 otherwise
    assert all(len(model.get_submodule(n).parametrizations.weight) == 1 for n in scaled)
    assert not hasattr(model.input, "parametrizations")               # muP's embedding multiplier is gone
    assert model.readout.parametrizations.weight[0].value == pytest.approx(1 / 4)        # a = 1: 4^{-1}
    parametrize(model, "sp", optimizer="adam", base_width=16)
    assert not any(isinstance(m, Multiplier) for m in model.modules())


def test_frozen_tensors_are_left_alone():
    model = MLP(width=64)
    model.readout.bias.requires_grad_(False)
    kept = model.readout.bias.detach().clone()
    groups = parametrize(model, "mup", optimizer="adam", base_width=16)
    assert "readout.bias" not in {g["name"] for g in groups} and groups.record["frozen"] == ["readout.bias"]
    assert torch.equal(model.readout.bias, kept)


# -- MoE, Muon, depth --------------------------------------------------------------------------------------
def test_moe_roles():
    roles = infer_roles(MoE(width=64, depth=2), MoE(width=16, depth=2))
    assert roles["blocks.1.router.weight"] == "router"
    assert {roles[f"blocks.0.experts.{e}.fc{i}.weight"] for e in range(4) for i in (1, 2)} == {"expert"}
    assert roles["blocks.0.experts.3.fc1.bias"] == "vector"
    assert roles["input.weight"] == "embedding" and roles["readout.weight"] == "readout"
    tr = infer_roles(Transformer(width=64, num_experts=3, top_k=1), Transformer(width=32, num_experts=3, top_k=1))
    assert tr["blocks.0.mlp.router.weight"] == "router" and tr["blocks.1.mlp.experts.2.fc2.weight"] == "expert"


@pytest.mark.parametrize("param,adjust,expected_c", [("mup", "original", 0.0), ("mf", "original", -0.5),
                                                     ("mup", "match_rms_adamw", 0.5)])
def test_muon_groups_and_optimizer(param, adjust, expected_c):
    model = CNN(width=32, depth=1)
    mlp = MLP(width=64, depth=2)
    groups = parametrize(mlp, param, optimizer="muon", lr=0.02, base_width=16, muon_adjust_lr_fn=adjust)
    hidden = [g for g in groups if g["role"] == "hidden"]
    assert all(g["optimizer"] == "muon" and g["lr"] == pytest.approx(0.02 * 4 ** -expected_c) for g in hidden)
    assert lr_exponent(param, "hidden", "muon", "no_alignment", muon_adjust_lr_fn=adjust) == expected_c
    opt = build_optimizer(groups)
    assert isinstance(opt, OptimizerList)
    assert [type(o).__name__ for o in opt.optimizers] == ["Muon", "AdamW"]
    assert {id(g["params"][0]) for g in opt.optimizers[0].param_groups} == {id(g["params"][0]) for g in hidden}
    before = mlp.hidden[0].weight.detach().clone()
    mlp(torch.randn(4, 8)).square().mean().backward()
    opt.step()
    assert not torch.equal(before, mlp.hidden[0].weight)
    opt.load_state_dict(opt.state_dict())
    conv_groups = parametrize(model, param, optimizer="muon", base_width=16)   # 4-D hidden kernels: AdamW
    assert {g["optimizer"] for g in conv_groups} == {"adamw"}
    with pytest.raises(ValueError, match="muon_adjust_lr_fn"):
        build_optimizer(groups, muon_adjust_lr_fn="original" if adjust != "original" else "match_rms_adamw")


def test_depth_scaling():
    model = MLP(width=64, depth=16, residual=True)
    adam = parametrize(model, "mup", optimizer="adam", lr=1e-2, base_width=16, depth_scaling=True, base_depth=4)
    assert model.branch_multiplier == pytest.approx(0.5)
    by = {g["name"]: g for g in adam}
    assert by["hidden.3.weight"]["lr"] == pytest.approx(1e-2 / 4 * 0.5) and by["hidden.3.weight"]["in_residual_branch"]
    assert by["input.weight"]["lr"] == pytest.approx(1e-2 / 2)                # not in a branch: no depth factor
    sgd = parametrize(model, "mup", optimizer="sgd", lr=0.1, base_width=16, depth_scaling=True, base_depth=4)
    assert {g["lr"] for g in sgd if g["in_residual_branch"]} == {0.1}
    parametrize(model, "mup", optimizer="sgd", base_width=16)
    assert model.branch_multiplier == 1.0

    def final_rms(depth, scaled):
        net = MLP(width=64, depth=depth, residual=True, activation="tanh").double()
        parametrize(net, "mup", optimizer="sgd", base_width=16, depth_scaling=scaled)
        h = net.input(torch.randn(64, 8, dtype=torch.float64))
        for layer in net.hidden:
            h = net._branch(h, layer(net.act(h)))
        return float(h.detach().square().mean().sqrt())
    assert final_rms(64, True) / final_rms(4, True) < 1.6 < final_rms(64, False) / final_rms(4, False)
    with pytest.raises(ValueError, match="residual"):
        parametrize(MLP(width=32, depth=2), "mup", base_width=16, depth_scaling=True)


# -- a user's own models ---------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """torchvision-style ResNet basic block (conv-BN-ReLU-conv-BN + identity)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class TinyResNet(nn.Module):
    def __init__(self, width: int, blocks: int = 2, classes: int = 5) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.layer1 = nn.Sequential(*[BasicBlock(width) for _ in range(blocks)])
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        return self.fc(self.layer1(torch.relu(self.bn1(self.conv1(x)))).mean((2, 3)))


class Conv1D(nn.Module):
    """Hugging Face GPT-2's linear layer: weight stored (in, out)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(nx, nf) * 0.02), nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


class GPT2ishBlock(nn.Module):
    def __init__(self, d: int, head_dim: int = 8) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = Conv1D(3 * d, d), Conv1D(d, d)
        self.c_fc, self.mlp_proj = Conv1D(4 * d, d), Conv1D(d, 4 * d)
        self.heads = d // head_dim

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in self.c_attn(self.ln_1(x)).split(d, -1))
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp_proj(nn.functional.gelu(self.c_fc(self.ln_2(x))))


class GPT2ish(nn.Module):
    def __init__(self, d: int, vocab: int = 13, n_pos: int = 6) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(n_pos, d)
        self.h = nn.ModuleList([GPT2ishBlock(d), GPT2ishBlock(d)])
        self.ln_f, self.lm_head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def test_users_resnet_via_base_model():
    model = TinyResNet(64).double()
    with pytest.raises(ValueError, match="with_width"):
        parametrize(model, "mup", optimizer="sgd", base_width=16)
    groups = parametrize(model, "mup", optimizer="sgd", lr=0.1, base_model=TinyResNet(16))
    by = {g["name"]: g for g in groups}
    assert by["conv1.weight"]["role"] == "embedding" and by["layer1.1.conv2.weight"]["role"] == "hidden"
    assert by["layer1.0.bn1.weight"]["role"] == "vector" and by["fc.weight"]["role"] == "readout"
    assert by["fc.weight"]["init"]["std"] == pytest.approx(1 / math.sqrt(16) / 2)    # sigma_0 4^{-1/2}
    assert by["layer1.1.conv2.weight"]["init"]["std"] == pytest.approx(1 / math.sqrt(16 * 9) / 2)
    assert by["conv1.weight"]["lr"] == by["fc.weight"]["lr"] == 0.1            # muP SGD: c = 0
    out = model(torch.randn(2, 3, 5, 5, dtype=torch.float64))
    assert out.shape == (2, 5) and torch.isfinite(out).all()


def test_users_hf_style_transformer_via_base_model():
    model = GPT2ish(64).double()
    groups = parametrize(model, "mup", optimizer="adam", lr=1e-3, base_model=GPT2ish(16))
    by = {g["name"]: g for g in groups}
    assert by["wte.weight"]["role"] == by["wpe.weight"]["role"] == "embedding"
    for name in ("h.0.c_attn.weight", "h.1.mlp_proj.weight", "h.0.c_fc.weight"):
        assert by[name]["role"] == "hidden" and by[name]["lr"] == pytest.approx(1e-3 / 4)
    # Conv1D stores (in, out): sigma_0 = 1/sqrt(fan-in at base) with fan-in on axis 0
    assert by["h.1.mlp_proj.weight"]["init"]["std"] == pytest.approx(1 / math.sqrt(64) / 2)
    assert by["lm_head.weight"]["role"] == "readout" and by["lm_head.weight"]["multiplier"] == 0.5
    logits = model(torch.randint(0, 13, (2, 6)))
    assert logits.shape == (2, 6, 13)
    # at the base width itself: tell the growing dims with a third width
    at_base = GPT2ish(16)
    roles = infer_roles(at_base, GPT2ish(16), delta_model=GPT2ish(32))
    assert roles["h.0.c_attn.weight"] == "hidden" and roles["ln_f.bias"] == "vector"


class WithRawParameter(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.inp = nn.Linear(4, d)
        self.rnn = nn.GRU(d, d, batch_first=True)
        self.scale = Scale(d)
        self.out = nn.Linear(d, 2)

    def forward(self, x):
        return self.out(self.scale(self.rnn(self.inp(x))[0][:, -1]))


class Scale(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * self.gamma


def test_unsupported_layers_are_named_and_roles_override():
    with pytest.raises(ValueError, match=r"unsupported layers: rnn\.weight_ih_l0 \(GRU\).*scale\.gamma \(Scale\)"):
        parametrize(WithRawParameter(32), "mup", base_model=WithRawParameter(8))
    roles = {"rnn.weight_*": "hidden", "rnn.bias_*": "vector", "scale.gamma": "vector"}
    model = WithRawParameter(32)
    groups = parametrize(model, "mup", optimizer="adam", base_model=WithRawParameter(8), roles=roles)
    assert {g["name"]: g["role"] for g in groups}["rnn.weight_hh_l0"] == "hidden"
    assert model(torch.randn(2, 3, 4)).shape == (2, 2)


def test_multihead_attention_with_growing_head_dim_is_refused_under_mup():
    class M(nn.Module):
        def __init__(self, d, heads):
            super().__init__()
            self.inp, self.attn, self.out = nn.Linear(3, d), nn.MultiheadAttention(d, heads, batch_first=True), nn.Linear(d, 2)

    with pytest.raises(ValueError, match=r"'attn' \(nn.MultiheadAttention\).*head_dim grows"):
        parametrize(M(32, 2), "mup", base_model=M(8, 2))
    groups = parametrize(M(32, 8), "mup", base_model=M(8, 2))            # fixed head_dim 4: fine
    assert {g["name"]: g["role"] for g in groups}["attn.in_proj_weight"] == "hidden"
    parametrize(M(32, 2), "sp", base_model=M(8, 2))                       # SP's 1/sqrt(d) is what MHA does


# -- bad input ---------------------------------------------------------------------------------------------------
class Tied(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.emb, self.head = nn.Embedding(7, d), nn.Linear(d, 7, bias=False)
        self.head.weight = self.emb.weight


class RouterTooWide(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.router = nn.Linear(d, d)


class GrowingKernel(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.conv = nn.Conv1d(d, d, kernel_size=d // 4)


@pytest.mark.parametrize("call,message", [
    (lambda: parametrize(MLP(width=64), "mu-p", base_width=16), "unknown parameterization 'mu-p'"),
    (lambda: parametrize(MLP(width=64), "mup", optimizer="lion", base_width=16), "unknown optimizer 'lion'"),
    (lambda: parametrize(MLP(width=64), "mup", lr_scaling="partial", base_width=16), "unknown lr_scaling"),
    (lambda: parametrize(MLP(width=64), "mup", lr=0.0, base_width=16), "lr must be positive"),
    (lambda: parametrize(MLP(width=64), "mup"), "needs base_width"),
    (lambda: parametrize(MLP(width=64), "mup", base_width=16, base_model=MLP(width=16)), "not both"),
    (lambda: parametrize(MLP(width=64), "mup", base_model=MLP(width=16, depth=3)), "incompatible base model"),
    (lambda: parametrize(MLP(width=64), "mup", base_model=CNN(width=16)), "incompatible base model"),
    (lambda: parametrize(MLP(width=64), "mup", optimizer="muon", base_model=MLP(width=64)), "needs the layer roles"),
    (lambda: parametrize(MLP(width=64), "mup", base_width=16, roles={"readout.weight": "output"}), "unknown role 'output'"),
    (lambda: parametrize(MLP(width=64), "mup", base_width=16, roles={"head.*": "readout"}), "match no tensor"),
    (lambda: parametrize(RouterTooWide(32), "mup", base_model=RouterTooWide(8)), "looks like an MoE router"),
    (lambda: parametrize(GrowingKernel(32), "mup", base_model=GrowingKernel(8)), "cannot infer the role of 'conv.weight'"),
    (lambda: parametrize(Tied(32), "mup", base_model=Tied(8)), "tied parameters"),
    (lambda: parametrize(MLP(width=64), "mup", base_width=16, attention="1/d^2"), "unknown attention scaling"),
    (lambda: build_optimizer([{"params": [nn.Parameter(torch.ones(2))], "lr": 1.0}], "rmsprop", lr=1.0), "unknown optimizer"),
    (lambda: parametrize_from_record(MLP(width=64), {"format": "something"}), "not a sharpscope parameterization record"),
])
def test_bad_input_gives_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# -- Adam's epsilon scaled with width (eps_scaling) ------------------------------------------------------------
# e of eps_r = eps m^-e, written out from the derivation in docs/parameterizations.md: the gradient of w is
# m^-a delta h, delta = 1 at the readout and m^-(a+b)_readout below it; the router's logit gradient is an
# unaligned inner product at init, m^(1/2 - (a+b)_readout).
EPS_E = {"sp": {"embedding": H, "hidden": H, "readout": 0, "router": 0},
         "ntk": {"embedding": H, "hidden": 1, "readout": H, "router": H},
         "mup": {"embedding": H, "hidden": 1, "readout": H, "router": 1},
         "mf": {"embedding": 1, "hidden": 1.5, "readout": 1, "router": 1.5}}


@pytest.mark.parametrize("param", ["sp", "ntk", "mup", "mf"])
def test_eps_exponents_groups_and_record(param):
    for width in (32, 128):
        model = MoE(width=width, depth=1)
        groups = parametrize(model, param, optimizer="adam", lr=1e-2, base_width=32, eps_scaling=True, base_eps=1e-6)
        m = width / 32
        for g in groups:
            base = {"vector": "embedding", "expert": "hidden"}.get(g["role"], g["role"])
            e = 0.0 if g["role"] == "fixed" else EPS_E[param][base]
            assert g["eps_exponent"] == e and eps_exponent(param, g["role"]) == e
            assert g["eps"] == pytest.approx(1e-6 * m ** -e, rel=1e-12)
        opt = build_optimizer(groups)
        assert [pg["eps"] for pg in opt.param_groups] == [g["eps"] for g in groups]
        rec = json.loads(json.dumps(groups.record))
        assert rec["eps_scaling"] is True and rec["eps"] == 1e-6
        again = build_optimizer(parametrize_from_record(MoE(width=width, depth=1), rec))
        assert [pg["eps"] for pg in again.param_groups] == [g["eps"] for g in groups]


def _grad_rms_slope(family, param, widths, base, seeds=3, **kw):
    """Fitted d log RMS(grad of w) / d log width per tensor, at init, averaged over seeds."""
    rms: dict = {}
    for width in widths:
        acc: dict = {}
        for seed in range(seeds):
            model = family(width=width, depth=1, in_features=16, out_features=5, activation="tanh", **kw).double()
            groups = parametrize(model, param, optimizer="adam", base_width=base, seed=seed)
            gen = torch.Generator().manual_seed(seed)
            x = torch.randn(256, 16, generator=gen, dtype=torch.float64)
            nn.functional.cross_entropy(model(x), torch.randint(0, 5, (256,), generator=gen)).backward()
            for g in groups:
                acc.setdefault((g["name"], g["role"]), []).append(float(g["params"][0].grad.square().mean()))
        for key, v in acc.items():
            rms.setdefault(key, []).append(0.5 * math.log(sum(v) / len(v)))
    logm = [math.log(w) for w in widths]
    mean_x = sum(logm) / len(logm)
    out = {}
    for key, ys in rms.items():
        mean_y = sum(ys) / len(ys)
        out[key] = sum((a - mean_x) * (b - mean_y) for a, b in zip(logm, ys)) / sum((a - mean_x) ** 2 for a in logm)
    return out


@pytest.mark.parametrize("param", ["sp", "ntk", "mup", "mf"])
def test_eps_exponent_is_the_measured_gradient_scaling(param):
    """The gradient RMS of every tensor falls as m^-e (muP/MF: past the base-width crossover of their
    vanishing logits, hence widths from 4x the base)."""
    widths = (64, 128, 256, 512) if param in ("sp", "ntk") else (256, 512, 1024)
    for (name, role), slope in _grad_rms_slope(MLP, param, widths, 64).items():
        assert slope == pytest.approx(-eps_exponent(param, role), abs=0.08), (name, role, slope)
    if param == "mup":    # the router: unaligned at init, m^(1/2 - 1) on top of its a = 1/2
        slopes = _grad_rms_slope(MoE, param, (128, 256, 512), 32, num_experts=2, top_k=1, expert_ratio=1)
        router = [s for (n, r), s in slopes.items() if r == "router"]
        assert router and all(s == pytest.approx(-1.0, abs=0.1) for s in router), router


@pytest.mark.parametrize("pair", [("ntk", "sp"), ("mf", "mup")])
def test_eps_scaling_keeps_the_symmetry_exact_with_a_large_eps(pair):
    """NTK = SP and MF = muP shifted along (a + t, b - t): with eps_scaling the trajectories agree even
    where eps dominates the update; with one eps for every width they do not."""
    def traj(param, scaled):
        torch.manual_seed(0)
        model = MLP(width=128, depth=2, in_features=5, out_features=3, activation="tanh").double()
        kw = {"eps_scaling": True, "base_eps": 1e-2} if scaled else {}
        groups = parametrize(model, param, optimizer="adam", lr=1e-2, base_width=32, lr_scaling="full_alignment", **kw)
        opt = build_optimizer(groups, **({} if scaled else {"eps": 1e-2}))
        gen = torch.Generator().manual_seed(3)
        x, y = torch.randn(24, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (24,), generator=gen)
        for _ in range(4):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        return model(x).detach()

    a, b = pair
    torch.testing.assert_close(traj(a, True), traj(b, True), rtol=1e-9, atol=1e-12)
    assert not torch.allclose(traj(a, False), traj(b, False), rtol=1e-4)


def test_eps_given_to_build_optimizer_is_the_base_eps_and_muon_scales_its_adamw_groups():
    groups = parametrize(MLP(width=128), "mup", optimizer="adam", base_width=32, eps_scaling=True)
    assert groups.record["eps"] == 1e-8                                   # torch's default
    opt = build_optimizer(groups, eps=1e-3)
    by = {g["name"]: g for g in opt.param_groups}
    assert by["hidden.0.weight"]["eps"] == pytest.approx(1e-3 / 4) and by["readout.bias"]["eps"] == 1e-3
    assert groups.record["eps"] == 1e-3                                   # the record follows the optimizer
    assert {e["name"]: e["eps"] for e in groups.record["params"]}["hidden.0.weight"] == pytest.approx(1e-3 / 4)
    muon = parametrize(MLP(width=128), "mup", optimizer="muon", base_width=32, eps_scaling=True)
    assert {g["optimizer"] for g in muon if "eps" in g} == {"adamw"} and any(g["optimizer"] == "muon" for g in muon)
    ol = build_optimizer(muon, adamw_kwargs={"eps": 1e-4})
    assert all("eps_exponent" not in g for g in ol.optimizers[0].param_groups)    # Muon's own eps untouched
    assert {g["name"]: g["eps"] for g in ol.optimizers[1].param_groups}["input.weight"] == pytest.approx(1e-4 / 2)
    sgd = parametrize(MLP(width=128), "mup", optimizer="sgd", base_width=32, eps_scaling=True)
    assert not any("eps" in g for g in sgd) and sgd.record["eps"] is None and sgd.record["eps_scaling"]
    fixed = parametrize(MLP(width=128), "mup", optimizer="adam", base_width=32, base_eps=1e-3)   # one eps, in the groups
    assert {g["eps"] for g in fixed} == {1e-3} and {g["eps_exponent"] for g in fixed} == {0.0}
    assert fixed.record["eps"] == 1e-3 and not fixed.record["eps_scaling"]
    assert {g["eps"] for g in build_optimizer(fixed).param_groups} == {1e-3}
    atan = parametrize(MLP(width=128), "mup", optimizer="adam-atan2", base_width=32, base_eps=1e-3, eps_scaling=True)
    assert not any("eps" in g for g in atan) and atan.record["eps"] is None
    with pytest.raises(ValueError, match="base_eps must be a positive number"):
        parametrize(MLP(width=128), "mup", optimizer="adam", base_width=32, base_eps=0.0)


# -- MoE alternatives: the expert input projection and the router ---------------------------------------------
def test_moe_expert_input_and_router_options():
    default = {g["name"]: g for g in parametrize(MoE(width=128, depth=1), "mup", optimizer="sgd", lr=0.1,
                                                   base_width=32)}
    emb = {g["name"]: g for g in parametrize(MoE(width=128, depth=1), "mup", optimizer="sgd", lr=0.1, base_width=32,
                                               expert_input="embedding", router="hidden")}
    for e in range(4):
        assert emb[f"blocks.0.experts.{e}.fc1.weight"]["role"] == "embedding"
        assert emb[f"blocks.0.experts.{e}.fc1.weight"]["multiplier"] == pytest.approx(2.0)   # muP embedding a = -1/2
        assert emb[f"blocks.0.experts.{e}.fc2.weight"]["role"] == "expert"
        assert emb[f"blocks.0.experts.{e}.fc1.bias"]["role"] == "vector"
    assert emb["blocks.0.router.weight"]["role"] == "hidden" and emb["blocks.0.router.weight"]["multiplier"] == 1.0
    assert default["blocks.0.router.weight"]["role"] == "router"
    na = {g["name"]: g for g in parametrize(MoE(width=128, depth=1), "mup", optimizer="adam", lr=0.1,
                                              base_width=32, router="no_alignment")}
    ro = {g["name"]: g for g in parametrize(MoE(width=128, depth=1), "mup", optimizer="adam", lr=0.1, base_width=32)}
    assert na["blocks.0.router.weight"]["lr"] == pytest.approx(ro["blocks.0.router.weight"]["lr"] * 2)   # x m^1/2
    assert na["readout.weight"]["lr"] == ro["readout.weight"]["lr"]
    user = parametrize(MoE(width=128, depth=1), "mup", base_width=32, expert_input="embedding",
                       roles={"blocks.0.experts.0.fc1.weight": "expert"})
    assert {g["name"]: g["role"] for g in user}["blocks.0.experts.0.fc1.weight"] == "expert"   # the user's roles win
    rec = json.loads(json.dumps(user.record))
    assert rec["expert_input"] == "embedding" and rec["router"] == "readout"
    with pytest.raises(ValueError, match="unknown expert_input"):
        parametrize(MoE(width=128), "mup", base_width=32, expert_input="output")
    with pytest.raises(ValueError, match="unknown router scaling"):
        parametrize(MoE(width=128), "mup", base_width=32, router="zero")


# -- the settings as one frozen ParametrizeOptions ------------------------------------------------------------
def test_options_object_and_keywords_give_the_same_groups():
    from sharpscope.param import ParametrizeOptions

    opts = ParametrizeOptions(optimizer="sgd", lr=0.1, base_width=32, eps_scaling=False, seed=1)
    by_options = parametrize(MLP(width=128), "mup", options=opts)
    by_keywords = parametrize(MLP(width=128), "mup", optimizer="sgd", lr=0.1, base_width=32, seed=1)
    assert json.dumps(by_options.record) == json.dumps(by_keywords.record)
    assert all(torch.equal(a["params"][0], b["params"][0]) for a, b in zip(by_options, by_keywords))
    replaced = parametrize(MLP(width=128), "mup", options=opts, lr=0.2)         # a keyword replaces a field
    assert replaced.record["lr"] == 0.2 and replaced.record["optimizer"] == "sgd" and opts.lr == 0.1
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['learning_rate'\\].*ParametrizeOptions"):
        parametrize(MLP(width=128), "mup", base_width=32, learning_rate=0.1)
    with pytest.raises(ValueError, match="lr must be positive"):
        ParametrizeOptions(lr=-1.0)


@pytest.mark.parametrize("bad", [dict(router="zero"), dict(attention="1/d^2"),
                                 dict(optimizer="muon", muon_adjust_lr_fn="spectral")])
def test_a_bad_setting_leaves_a_parametrized_model_as_it_was(bad):
    """A bad setting raises before the model is touched: before, the multipliers were already removed (router,
    attention) or every tensor re-drawn (Muon's adjust_lr_fn) when it raised."""
    model = MLP(width=64)
    parametrize(model, "mup", optimizer="sgd", lr=0.1, base_width=16, seed=0)
    x = torch.randn(5, 8)   # MLP's default in_features
    before_out, before = model(x), {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="unknown"):
        parametrize(model, "mup", base_width=16, seed=1, **bad)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(model(x), before_out)
