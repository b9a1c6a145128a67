"""Loss closures over dict batches on a tiny GPT-2 (built from a config: no download) against dense float64
ground truth and finite differences; token weighting; the bad-input lines; the built-in HF losses."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch.func import functional_call

import sharpscope as ss
from conftest import assert_hvp_matches_central_differences

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("sharpscope.hf")
transformers.logging.set_verbosity_error()

VOCAB, SEQ, BATCH = 50, 8, 4
# the selection the dense references run on: attention (query/key/value biases of both layers, an output
# projection) and a LayerNorm, 400 of the model's 7520 parameters (all of them: the finite-difference test)
SUBSET = ["transformer.h.1.attn.c_attn.bias", "transformer.h.0.attn.c_proj", "transformer.h.1.ln_1",
          "transformer.h.0.attn.c_attn.bias"]


def gpt2(seed: int = 0) -> torch.nn.Module:
    """A 2-layer GPT-2 (n_embd 16, 2 heads, vocab 50, 8 positions) in float64, dropout on (curvature is
    measured with it off)."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=SEQ,
                                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    return transformers.GPT2LMHeadModel(config).double()


def lm_batch(seed: int, pad: int = 0, n: int = BATCH) -> dict:
    """Random tokens; the last ``pad`` positions of every other row padded (attention 0, label -100)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    mask = torch.ones(n, SEQ, dtype=torch.long)
    if pad:
        mask[::2, SEQ - pad:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the math-SDPA fallback notice
        return fn(*args, **kwargs)


def _by_hand(model, batches, names):
    """The token-weighted mean next-token loss as a function of the flat selected parameters, written
    here from functional_call on the model (independent of sharpscope's closure machinery)."""
    params = dict(model.named_parameters())
    chosen = [n for s in names for n in params if n == s or n.startswith(s + ".")]  # sharpscope's order
    shapes = [params[n].shape for n in chosen]
    sizes = [params[n].numel() for n in chosen]
    tokens = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]

    def loss_of(flat):
        mapping = {n: t.view(s) for n, t, s in zip(chosen, torch.split(flat, sizes), shapes)}
        total = 0.0
        for b, n_b in zip(batches, tokens):
            logits = functional_call(model, mapping, (), {"input_ids": b["input_ids"],
                                                          "attention_mask": b["attention_mask"], "use_cache": False}).logits
            ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), b["labels"][:, 1:].reshape(-1),
                                                   ignore_index=-100, reduction="sum")
            total = total + ce / sum(tokens)
        return total

    flat = torch.cat([params[n].detach().reshape(-1) for n in chosen])
    return loss_of, flat


def _dense_by_hand(model, batches, names):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    loss_of, flat = _by_hand(model, batches, names)
    model.eval()
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            H = torch.autograd.functional.hessian(loss_of, flat)
    finally:
        model.train()
    return (H + H.T) / 2


def test_closure_hessian_matches_dense_float64_in_every_mode():
    model, batch, loss = gpt2(1), lm_batch(1, pad=2), hf.causal_lm_loss()
    Hd = _dense_by_hand(model, [batch], SUBSET)
    torch.testing.assert_close(_quiet(ss.dense_hessian, model, loss, batch, params=SUBSET), Hd, rtol=0,
                               atol=1e-11 * Hd.abs().max().item())
    V = torch.randn(Hd.shape[0], 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for mode in ("cached", "reverse", "forward"):
        H = ss.hessian_operator(model, loss, batch, params=SUBSET, hvp_mode=mode)
        assert H.shape == Hd.shape == (400, 400) and H.fn.names[0] == "transformer.h.1.attn.c_attn.bias"
        for batched in (False, True):
            H.batched = batched
            torch.testing.assert_close(_quiet(H.matmat, V), Hd @ V, rtol=0, atol=1e-11 * Hd.abs().max().item())
    assert model.training  # flags restored; dropout was off during the products (else not symmetric / not equal)
    top = ss.lanczos(H, k=3, tol=1e-10).eigenvalues
    torch.testing.assert_close(top, torch.linalg.eigvalsh(Hd).flip(0)[:3], rtol=1e-6, atol=0)
    # finite differences of the closure's gradients: the stated float64 accuracy (1e-6 relative)
    F = ss.hessian_operator(model, loss, batch, params=SUBSET, hvp_mode="finite-difference")
    torch.testing.assert_close(_quiet(F.matmat, V), Hd @ V, rtol=0, atol=1e-6 * Hd.abs().max().item())
    top_fd = ss.lanczos(F, k=3, tol=1e-8).eigenvalues
    torch.testing.assert_close(top_fd, torch.linalg.eigvalsh(Hd).flip(0)[:3], rtol=1e-6, atol=0)


def test_closure_ggn_ntk_and_preconditioned_match_dense():
    model, batch, loss = gpt2(2), lm_batch(2, pad=3), hf.causal_lm_loss()
    # GGN: J^T H_L J with J of the logits, H_L of the shifted token cross-entropy, by dense pieces
    Gd = _quiet(ss.dense_ggn, model, loss, batch, params=SUBSET)
    G = ss.ggn_operator(model, loss, batch, params=SUBSET)
    V = torch.randn(G.shape[0], 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_quiet(G.matmat, V), Gd @ V, rtol=0, atol=1e-11 * Gd.abs().max().item())
    # the NTK of the logits: (4 x 8 x 50) outputs
    Kd = _quiet(ss.ntk_gram, model, loss, batch, params=SUBSET)
    K = ss.ntk_operator(model, loss, batch, params=SUBSET)
    assert K.shape == (BATCH * SEQ * VOCAB,) * 2 == Kd.shape
    U = torch.randn(K.shape[0], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(_quiet(K.matmat, U), Kd @ U, rtol=0, atol=1e-11 * Kd.abs().max().item())
    # preconditioned by AdamW after two steps on the causal-LM loss
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    P = ss.preconditioned_hessian_operator(model, loss, batch, opt, params=SUBSET)
    Hd = _dense_by_hand(model, [batch], SUBSET)
    d = P.d_sqrt
    Pd = d[:, None] * Hd * d[None, :]
    torch.testing.assert_close(_quiet(P.matmat, V), Pd @ V, rtol=0, atol=1e-11 * Pd.abs().max().item())
    assert P.threshold == pytest.approx((2 + 2 * 0.9) / (0.1 * 1e-3))
    names = dict(model.named_parameters())
    state = opt.state[names["transformer.h.1.attn.c_attn.bias"]]  # D from AdamW's state, written out
    v_hat = state["exp_avg_sq"] / (1 - 0.999 ** 2)
    expected = (1 / ((1 - 0.9 ** 2) * (v_hat.sqrt() + 1e-8))).reshape(-1).sqrt()
    torch.testing.assert_close(d[:expected.numel()], expected)


def test_gpt2_hessian_matches_finite_differences():
    """Every parameter (attention included), against central differences of the gradient (eps 1e-5):
    no second-order autodiff path in the reference."""
    model, batch = gpt2(3), lm_batch(3, pad=2)
    H = ss.hessian_operator(model, hf.causal_lm_loss(), batch)
    assert H.shape[0] == sum(p.numel() for p in model.parameters()) == 7520  # the tied lm_head once
    v = torch.randn(H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert_hvp_matches_central_differences(H, v / v.norm())


def test_token_weighted_batches_equal_the_concatenated_batch():
    model = gpt2(4)
    loss = hf.causal_lm_loss()
    parts = [lm_batch(10, pad=5, n=2), lm_batch(11, pad=0, n=3)]  # 2 x 7 - 5 and 3 x 7 predicted tokens
    whole = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    assert [loss.batch_weight(p, 0) for p in parts] == [9.0, 21.0]
    V = torch.randn(sum(p.numel() for p in model.parameters()), 3, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(3))
    H_parts = ss.hessian_operator(model, loss, parts, hvp_mode="reverse")
    H_whole = ss.hessian_operator(model, loss, whole, hvp_mode="reverse")
    torch.testing.assert_close(_quiet(H_parts.matmat, V), _quiet(H_whole.matmat, V), rtol=0, atol=1e-12)
    model.eval()
    with torch.no_grad():
        assert H_parts.loss() == pytest.approx(model(**whole).loss.item(), rel=1e-6)  # HF's loss, in float32
    loader = torch.utils.data.DataLoader([{k: v[i] for k, v in whole.items()} for i in range(5)], batch_size=2)
    H_loader = ss.hessian_operator(model, loss, loader, hvp_mode="reverse")
    torch.testing.assert_close(_quiet(H_loader.matmat, V), _quiet(H_whole.matmat, V), rtol=0, atol=1e-12)
    # sample weighting (the default weight) is another operator when the token counts differ
    plain = ss.batch_loss(outputs=loss.outputs, loss_of_outputs=loss.loss_of_outputs)
    assert not torch.allclose(_quiet(ss.hessian_operator(model, plain, parts).matmat, V), _quiet(H_whole.matmat, V))


def test_a_bare_closure_of_the_models_own_loss():
    """``lambda m, b: m(**b).loss``: the Hessian of HF's loss (computed in float32 inside the float64 model)."""
    model, batch = gpt2(5), lm_batch(5, pad=2)
    bare = ss.batch_loss(lambda m, b: m(**b).loss, weight=lambda b: (b["labels"][:, 1:] != -100).sum())
    H = ss.hessian_operator(model, bare, batch)
    v = torch.randn(H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    exact = _quiet(ss.hessian_operator(model, hf.causal_lm_loss(), batch).matvec, v)
    assert (_quiet(H.matvec, v) - exact).norm() <= 1e-5 * exact.norm()
    both = ss.batch_loss(bare.fn, outputs=hf.causal_lm_loss().outputs, loss_of_outputs=hf.causal_lm_loss().loss_of_outputs)
    _quiet(ss.ggn_operator(model, both, batch).matvec, v)  # fn and the split agree: accepted
    wrong = ss.batch_loss(bare.fn, outputs=hf.masked_lm_loss().outputs, loss_of_outputs=hf.masked_lm_loss().loss_of_outputs)
    with pytest.raises(ValueError, match="must describe the same loss"):
        _quiet(ss.ggn_operator(model, wrong, batch).matvec, v)


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_bad_input_is_one_line():
    model, batch = gpt2(6), lm_batch(6)
    loss = hf.causal_lm_loss()
    with pytest.raises(ValueError, match="Mapping batch .* needs a loss closure") as err:
        ss.hessian_operator(model, torch.nn.CrossEntropyLoss(), batch)
    assert "ss.batch_loss" in _one_line(err)
    with pytest.raises(ValueError, match="Mapping batch"):
        ss.hessian_operator(model, torch.nn.CrossEntropyLoss(), [batch, batch])
    loader = torch.utils.data.DataLoader([{k: v[i] for k, v in batch.items()} for i in range(4)], batch_size=2)
    with pytest.raises(ValueError, match="Mapping batch"):
        ss.lanczos(ss.hessian_operator(model, torch.nn.CrossEntropyLoss(), loader), k=1)
    with pytest.raises(ValueError, match="Mapping batch"):
        ss.ntk_operator(model, batch)
    for bad in (0, -2.0, float("nan"), torch.tensor(0)):
        weighted = ss.batch_loss(loss.fn, weight=lambda b, bad=bad: bad, outputs=loss.outputs,
                                 loss_of_outputs=loss.loss_of_outputs)
        with pytest.raises(ValueError, match="weight\\(batch\\) returned .* for batch 0: a batch's weight must be a "
                                             "positive, finite number") as err:
            ss.hessian_operator(model, weighted, batch).matvec(torch.zeros(7520, dtype=torch.float64))
        _one_line(err)
    vector = ss.batch_loss(lambda m, b: m(**b).logits.sum(-1))
    with pytest.raises(ValueError, match="returned a tensor of shape \\(4, 8\\) on the first batch: it must return a "
                                         "scalar") as err:
        _quiet(ss.hessian_operator(model, vector, batch).matvec, torch.zeros(7520, dtype=torch.float64))
    _one_line(err)
    bare = ss.batch_loss(lambda m, b: m(**b).loss)
    for make in (lambda: ss.ggn_operator(model, bare, batch), lambda: ss.ntk_operator(model, bare, batch)):
        with pytest.raises(ValueError, match="needs the model's outputs apart from the loss") as err:
            make()
        _one_line(err)
    with pytest.raises(ValueError, match="give outputs= and loss_of_outputs= together"):
        ss.batch_loss(outputs=loss.outputs)
    with pytest.raises(ValueError, match="weight\\(batch\\) returned 0"):  # all labels ignored
        ss.hessian_operator(model, loss, {**batch, "labels": torch.full_like(batch["labels"], -100)}).matvec(
            torch.zeros(7520, dtype=torch.float64))


def test_more_bad_input_is_one_line(tmp_path):
    """The same one-line refusals where a Mapping batch reaches the Recorder or an offline job with a criterion,
    and for other non-scalar losses and non-numeric weights."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).double()
    batch = {"x": torch.randn(4, 3, dtype=torch.float64), "y": torch.randint(0, 2, (4,))}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="Mapping batch \\(keys x, y\\) needs a loss closure") as err:
        ss.Recorder(tmp_path / "r.h5", model, opt, batch=batch, loss_fn=torch.nn.CrossEntropyLoss(), sharpness_every=1)
    _one_line(err)
    mlp = ss.MLP(width=4, depth=1, in_features=3, out_features=2)
    float_batch = {"x": batch["x"].float(), "y": batch["y"]}
    with ss.Recorder(tmp_path / "run.h5", mlp, None, batch=float_batch, every=1,
                     meta={"model_factory": "sharpscope.models:MLP", "model_kwargs": mlp.config}):
        pass
    report = ss.run_spectrum_job([tmp_path / "run.h5"], ["hessian"], loss="CrossEntropyLoss", progress=False)
    [(_, step, message)] = report.failures
    assert step == 0 and "\n" not in message
    assert "the stored batch is a Mapping (keys x, y) but the loss 'CrossEntropyLoss' is a criterion" in message
    split = ss.batch_loss(outputs=lambda m, b: m(b["x"]), loss_of_outputs=lambda out, b: torch.nn.functional.cross_entropy(
        out, b["y"], reduction="none"))
    with pytest.raises(ValueError, match="loss_of_outputs\\(outputs, batch\\) returned a tensor of shape \\(4,\\)") as err:
        ss.ggn_operator(model, split, batch).matvec(torch.zeros(8, dtype=torch.float64))
    _one_line(err)
    with pytest.raises(ValueError, match="returned a float on the first batch: it must return a scalar tensor") as err:
        ss.hessian_operator(model, ss.batch_loss(lambda m, b: 1.0), batch).matvec(torch.zeros(8, dtype=torch.float64))
    _one_line(err)
    for bad in ("4", None, True, torch.ones(2)):
        weighted = ss.batch_loss(lambda m, b: torch.nn.functional.cross_entropy(m(b["x"]), b["y"]), weight=lambda b, bad=bad: bad)
        with pytest.raises(ValueError, match="weight\\(batch\\) returned .* for batch 0") as err:
            ss.hessian_operator(model, weighted, batch).matvec(torch.zeros(8, dtype=torch.float64))
        _one_line(err)



def test_builtin_losses_are_huggingfaces():
    """The built-in closures' losses equal Hugging Face's own loss functions on the same logits."""
    from transformers.loss.loss_utils import ForCausalLMLoss, ForMaskedLMLoss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=g)
    labels = torch.randint(0, 11, (3, 6), generator=g).masked_fill(torch.rand(3, 6, generator=g) < 0.3, -100)
    batch = {"labels": labels}
    torch.testing.assert_close(hf.causal_lm_loss().loss_of_outputs(logits, batch), ForCausalLMLoss(logits, labels, 11))
    torch.testing.assert_close(hf.masked_lm_loss().loss_of_outputs(logits, batch), ForMaskedLMLoss(logits, labels, 11))
    assert hf.causal_lm_loss().batch_weight(batch, 0) == float((labels[:, 1:] != -100).sum())
    assert hf.masked_lm_loss().batch_weight(batch, 0) == float((labels != -100).sum())
    seq = hf.sequence_classification_loss()
    cls_logits, cls_labels = logits[:, 0, :], labels[:, 0].clamp(min=0)
    torch.testing.assert_close(seq.loss_of_outputs(cls_logits, {"labels": cls_labels}),
                               torch.nn.functional.cross_entropy(cls_logits, cls_labels))
    assert seq.batch_weight({"labels": cls_labels}, 0) == 3.0
    with pytest.raises(ValueError, match="needs a dict batch with 'labels'"):
        hf.causal_lm_loss().loss_of_outputs(logits, {"input_ids": labels})


def test_causal_lm_from_config_rebuilds_the_model():
    model = gpt2(7)
    meta = hf.causal_lm_meta(model)
    assert meta["model_factory"] == "sharpscope.hf:causal_lm_from_config" and meta["loss"] == "sharpscope.hf:causal_lm_loss"
    rebuilt = hf.causal_lm_from_config(**meta["model_kwargs"])
    assert type(rebuilt) is type(model) and next(rebuilt.parameters()).dtype == torch.float64
    assert [(n, p.shape) for n, p in rebuilt.named_parameters()] == [(n, p.shape) for n, p in model.named_parameters()]
    with pytest.raises(ValueError, match="not the recorded"):
        hf.causal_lm_from_config(meta["model_kwargs"]["config"], architecture="LlamaForCausalLM")
    with pytest.raises(ValueError, match="not a transformers model class"):
        hf.model_from_config(meta["model_kwargs"]["config"], "pipeline")
    assert hf.is_causal_lm(model) and not hf.is_causal_lm(torch.nn.Linear(2, 2))


def test_configs_are_built_only_from_their_fields():
    """A Hub config's leftovers (entries its class does not define, e.g. GPT-2's ``n_ctx``) are left out of the
    meta with a warning; a config that holds one anyway, or a class of another config, is refused in one line.
    The fields that reach the network or load code: tests/faults/test_trust.py."""
    model = gpt2(8)
    model.config.n_ctx = SEQ
    with pytest.warns(UserWarning, match="does not define \\(n_ctx\\)"):
        meta = hf.causal_lm_meta(model)
    config = meta["model_kwargs"]["config"]
    assert "n_ctx" not in config and config["n_embd"] == 16
    rebuilt = hf.causal_lm_from_config(**meta["model_kwargs"])
    assert [(n, p.shape) for n, p in rebuilt.named_parameters()] == [(n, p.shape) for n, p in model.named_parameters()]
    with pytest.raises(ValueError, match="field 'config.n_ctx' is not a field of GPT2Config") as err:
        hf.causal_lm_from_config({**config, "n_ctx": SEQ})
    _one_line(err)
    with pytest.raises(ValueError, match="BertForMaskedLM takes a BertConfig, not the config's GPT2Config"):
        hf.model_from_config(config, "BertForMaskedLM")
    with pytest.raises(ValueError, match="not a model type of this transformers"):
        hf.causal_lm_from_config({**config, "model_type": "evil_remote_type"})


def test_models_are_built_in_hub_offline_mode(monkeypatch):
    """Whatever the allow-list let through could not download: the build runs with the Hub offline, and the
    user's setting is restored after it."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    seen = []
    original = transformers.AutoModelForCausalLM.from_config

    def spy(*args, **kwargs):
        seen.append(constants.HF_HUB_OFFLINE)
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", spy)
    hf.causal_lm_from_config(hf.causal_lm_meta(gpt2(9))["model_kwargs"]["config"])
    assert seen == [True] and constants.HF_HUB_OFFLINE is False
