"""Fault campaign, class 1 (issue 21): a file cannot grant itself trust, and a trusted name reaches nothing else.

Every case is what a stranger's run file could hold, or a pattern a user could type. Each gadget leaves a marker
file when it runs (or, for a module, when it is imported): a case passes when the job is refused with one line
and the marker is absent, so "nothing ran" is proven, not assumed. On 7abbbde the probe-file cases, the attribute
chains, the re-exports and the glob patterns all ran their gadgets.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import posixpath
import re
import shutil
import socket
import subprocess
import sys
import textwrap

import h5py
import pytest
import torch
from torch import nn

import sharpscope as ss
from sharpscope.cli import main
from sharpscope.runs.jobs import SpectrumSettings, run_spectrum_job
from sharpscope.runs.rebuild import model_at
from sharpscope.runs.spectra import spectra_path

KWARGS = {"width": 8, "depth": 1, "in_features": 4, "out_features": 3}
MODULES = ("mymodels", "mymodels.sub", "mm_helpers", "mm_evil_import")


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """One clean run (sharpscope's MLP, Adam, 2 steps) that each case copies and edits."""
    path = tmp_path_factory.mktemp("template") / "run.h5"
    torch.manual_seed(0)
    model = ss.MLP(**KWARGS)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    opt, ce = torch.optim.Adam(model.parameters(), lr=1e-2), nn.CrossEntropyLoss()
    with ss.Recorder(path, model, opt, batch=(x, y), every=1, loss_fn=ce,
                     meta={"model_factory": "sharpscope.models:MLP", "model_kwargs": KWARGS}) as rec:
        for _ in range(2):
            opt.zero_grad()
            loss = ce(model(x), y)
            loss.backward()
            opt.step()
            rec.step(loss=loss)
    return path


@pytest.fixture
def world(tmp_path, monkeypatch):
    """A user's package ``mymodels`` (on sys.path) that, like real code, imports things, plus gadgets that leave
    ``tmp_path/MARK`` when they run: what a wildcard over ``mymodels`` might reach."""
    marker = tmp_path / "MARK"
    pkgs = tmp_path / "pkgs"
    (pkgs / "mymodels").mkdir(parents=True)
    touch = f"import pathlib\ndef _mark(*a, **k):\n    pathlib.Path({str(marker)!r}).write_text('ran')\n"
    (pkgs / "mm_helpers.py").write_text(touch + textwrap.dedent("""
        def wipe(*a, **k):
            _mark()
        class Wiper:
            def __init__(self, *a, **k):
                _mark()
    """))
    (pkgs / "mm_evil_import.py").write_text(touch + "_mark()\n")
    (pkgs / "mymodels" / "__init__.py").write_text(touch + textwrap.dedent("""
        import functools
        import importlib
        import os
        import subprocess
        from os import system
        from subprocess import Popen, run

        import torch

        from mm_helpers import Wiper, wipe
        from sharpscope.models import MLP

        def make(**kwargs):
            return MLP(**kwargs)

        def _private(**kwargs):
            _mark()

        def __run__(**kwargs):
            _mark()

        class Maker:
            run = staticmethod(_mark)

        runner = functools.partial(_mark)
    """))
    (pkgs / "mymodels" / "sub.py").write_text(touch + "import importlib\nfrom os import system\n"
                                                      "from sharpscope.models import MLP\n"
                                                      "def make(**kwargs):\n    return MLP(**kwargs)\n")
    monkeypatch.syspath_prepend(str(pkgs))
    yield marker
    for name in MODULES:
        sys.modules.pop(name, None)


def _crafted(template, folder, **meta_changes):
    path = folder / "run.h5"
    shutil.copy(template, path)
    with h5py.File(path, "r+") as f:
        meta = json.loads(f["meta"].attrs["json"])
        meta.update(meta_changes)
        f["meta"].attrs["json"] = json.dumps(meta)
    return path


def _refused(capsys, argv, expected: str) -> str:
    """`sharpscope spectrum ...` exits 2 with one stderr line containing ``expected``."""
    capsys.readouterr()
    assert main(["spectrum", *argv, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and expected in err, err
    return err


def _cmd(marker) -> str:
    return f"touch {marker}"


# -- a file cannot vouch for itself (the first case and variants) --------------------------------------
def _probe_beside(folder, text: str) -> dict:
    """An attacker-written probe file and the run-file record that names it (path relative to the run's folder)."""
    data = text.encode()
    (folder / "probe.toml").write_bytes(data)
    return {"probe": {"file": "probe.toml", "sha256": hashlib.sha256(data).hexdigest()}}


@pytest.mark.parametrize("where", ["relative", "absolute-world-writable"])
def test_a_probe_file_beside_a_run_grants_nothing(template, world, tmp_path, monkeypatch, capsys, where):
    """Issue 21.1: `model_factory = "subprocess:run"` and meta.user.probe naming a sha-matching 2-line probe.toml."""
    text = '[model]\nfactory = "subprocess:run"\n'
    folder = tmp_path / "shared"
    folder.mkdir()
    user = _probe_beside(folder, text)
    if where == "absolute-world-writable":
        elsewhere = tmp_path / "tmpdir"
        elsewhere.mkdir()
        os.chmod(elsewhere, 0o777)
        (elsewhere / "probe.toml").write_text(text)
        os.chmod(elsewhere / "probe.toml", 0o666)
        user["probe"]["file"] = str(elsewhere / "probe.toml")
    path = _crafted(template, folder, model_factory="subprocess:run",
                    model_kwargs={"args": _cmd(world), "shell": True}, user=user)
    monkeypatch.chdir(folder)
    _refused(capsys, ["run.h5"], "names the model 'subprocess:run', which is not trusted")
    with pytest.raises(ss.UntrustedNameError, match="run that sweep again"):
        run_spectrum_job([path], ["hessian"], SpectrumSettings(k=1), progress=False)
    with ss.open_run(path) as run, pytest.raises(ss.UntrustedNameError):
        model_at(run, 1)
    assert not world.exists() and not spectra_path(path).exists()


def test_a_probe_file_beside_a_run_grants_no_loss(template, world, tmp_path, monkeypatch, capsys):
    """The same for the loss, the other name a probe record vouched for: a re-exported function as the loss."""
    folder = tmp_path / "shared"
    folder.mkdir()
    user = _probe_beside(folder, '[model]\nfactory = "mlp"\n[train]\nloss = "mm_helpers:wipe"\n')
    path = _crafted(template, folder, loss="mm_helpers:wipe", user=user)
    monkeypatch.chdir(folder)
    _refused(capsys, ["run.h5"], "names the loss 'mm_helpers:wipe', which is not trusted")
    assert not world.exists() and not spectra_path(path).exists()


# -- names: module-level functions and classes, never attribute chains ----------------------------------------
# (model factory or loss or optimizer, the name, the allow-patterns the user gave, the kwargs, the refusal)
CHAIN = "is not a 'module:function' name"
WILD = "outside the modules"
NOT_FN = "not a function or class"
PATTERN = "is not accepted"
CASES = {
    # the cases
    "chain-through-reexported-torch": ("model", "mymodels:torch.os.system", ["mymodels:*"], "command", CHAIN),
    "sharpscope-star-import-module": ("model", "sharpscope.models:importlib.import_module", ["sharpscope.*"],
                                      {"name": "mm_evil_import"}, PATTERN),
    # variants
    "sharpscope-star-star-import-module": ("model", "sharpscope.models:importlib.import_module", ["sharpscope.*:*"],
                                           {"name": "mm_evil_import"}, "no wildcard over sharpscope"),
    "submodule-chain-import-module": ("model", "mymodels.sub:importlib.import_module", ["mymodels.*:*"],
                                      {"name": "mm_evil_import"}, CHAIN),
    "chain-through-module": ("model", "mymodels:os.system", ["mymodels:*"], "command", CHAIN),
    "reexported-function": ("model", "mymodels:system", ["mymodels:*"], "command", WILD),
    "reexported-function-submodule": ("model", "mymodels.sub:system", ["mymodels.*:*"], "command", WILD),
    "reexported-subprocess-run": ("model", "mymodels:run", ["mymodels:*"], "shell", WILD),
    "reexported-class": ("model", "mymodels:Popen", ["mymodels:*"], "shell", WILD),
    "class-dot-method": ("model", "mymodels:Maker.run", ["mymodels:*"], {}, CHAIN),
    "module-level-partial-allowed-exactly": ("model", "mymodels:runner", ["mymodels:runner"], {}, NOT_FN),
    "module-level-partial-under-star": ("model", "mymodels:runner", ["mymodels:*"], {}, WILD),
    "private-name-under-star": ("model", "mymodels:_private", ["mymodels:*"], {}, "is not trusted"),
    "dunder-name": ("model", "mymodels:__run__", ["mymodels:*"], {}, CHAIN),
    "fullwidth-unicode-name": ("model", "mymodels:\uff53\uff59\uff53\uff54\uff45\uff4d", ["mymodels:*"], "command", CHAIN),
    "unicode-lookalike-module": ("model", "mymodel\u0455:make", ["mymodel?:*"], {}, PATTERN),
    "double-star-pattern": ("model", "mymodels:torch.os.system", ["mymodels:**"], "command", PATTERN),
    "question-mark-pattern": ("model", "mymodels:run", ["mymodels:ru?"], "shell", PATTERN),
    "bracket-pattern": ("model", "mymodels:os.system", ["mymodels:[a-z]*"], "command", PATTERN),
    "star-module-pattern": ("model", "subprocess:run", ["*:run"], "shell", PATTERN),
    "no-colon-pattern": ("model", "mymodels:os.system", ["mymodels*"], "command", PATTERN),
    "stdlib-wildcard-os-path-join": ("model", "os.path:join", ["os.*:*"], {"a": "MARK-ARG"}, "no wildcard over os"),
    "os-path-join-under-os-star": ("model", "os.path:join", ["os*"], {"a": "MARK-ARG"}, PATTERN),
    "loss-reexported": ("loss", "mymodels:wipe", ["mymodels:*"], None, WILD),
    "loss-class-dot-method": ("loss", "mymodels:Maker.run", ["mymodels:*"], None, CHAIN),
    "optimizer-reexported-class": ("optimizer", "mymodels.Wiper", ["mymodels:*"], None, WILD),
}


def _kwargs(kind, marker):
    if kind == "command":
        return {"command": _cmd(marker)}
    if kind == "shell":
        return {"args": _cmd(marker), "shell": True}
    return kind


@pytest.mark.parametrize("case", list(CASES))
def test_a_name_reaches_only_what_the_user_allowed(template, world, tmp_path, monkeypatch, capsys, case):
    field, name, allow, kwargs, refusal = CASES[case]
    if field == "model":
        change = {"model_factory": name, "model_kwargs": _kwargs(kwargs, world)}
    elif field == "loss":
        change = {"loss": name}
    else:
        with h5py.File(template) as f:
            optimizer = json.loads(f["meta"].attrs["json"])["optimizer"]
        change = {"optimizer": {**optimizer, "class": name}}
    real_join = posixpath.join

    def join(a, *p):  # os.path:join leaves the marker when a file calls it with its own argument
        if a == "MARK-ARG":
            world.write_text("ran")
        return real_join(a, *p)

    monkeypatch.setattr(posixpath, "join", join)
    path = _crafted(template, tmp_path, **change)
    argv = [str(path), "--what", "hessian,precond"]
    for pattern in allow:
        argv += ["--allow-factory", pattern]
    _refused(capsys, argv, refusal)
    with pytest.raises(ValueError, match=re.escape(refusal)):
        run_spectrum_job([path], ["hessian", "precond"], SpectrumSettings(k=1), progress=False, allow_factories=allow)
    assert not world.exists() and not spectra_path(path).exists()
    assert "mm_evil_import" not in sys.modules


@pytest.mark.slow
def test_a_module_shadowed_from_the_working_directory_is_not_imported(template, world, tmp_path):
    """`python -m sharpscope` in a folder holding the run and a module named like the user's allowed package:
    the folder is not on the import path (as for the `sharpscope` console script), the user's package is used."""
    folder = tmp_path / "downloaded"
    folder.mkdir()
    _crafted(template, folder, model_factory="mymodels:make", model_kwargs=KWARGS)
    (folder / "mymodels.py").write_text(f"import pathlib\npathlib.Path({str(world)!r}).write_text('shadow')\n"
                                        "def make(**kwargs):\n    raise SystemExit('the shadow ran')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "pkgs"), *sys.path])}
    done = subprocess.run([sys.executable, "-m", "sharpscope", "spectrum", "run.h5", "--quiet",
                           "--allow-factory", "mymodels:make"], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert not world.exists() and spectra_path(folder / "run.h5").exists()


# -- Hugging Face configs: no field reaches the network or loads code ------------------------------------------
class NetworkReached(BaseException):  # noqa: N818 - not an Exception: no `except Exception` may swallow it
    """A Hub or socket entry point was called."""


@pytest.fixture
def no_network(monkeypatch):
    """HF_HUB_OFFLINE=1, and every way out fails the test: sockets, the Hub API, file downloads, Hub kernels."""
    transformers = pytest.importorskip("transformers")
    import huggingface_hub

    transformers.logging.set_verbosity_error()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # the variable is read at import
    calls = []

    def reached(what):
        def fail(*args, **kwargs):
            calls.append(what)
            raise NetworkReached(what)
        return fail

    monkeypatch.setattr(socket, "getaddrinfo", reached("socket.getaddrinfo"))
    monkeypatch.setattr(socket.socket, "connect", reached("socket.connect"))
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_exists", reached("HfApi.repo_exists"))
    monkeypatch.setattr(huggingface_hub.constants, "is_offline_mode", reached("a Hub request"))
    for module, name in (("huggingface_hub", "hf_hub_download"), ("huggingface_hub", "snapshot_download"),
                         ("transformers.utils.hub", "cached_file"), ("kernels", "get_kernel")):
        try:
            mod = importlib.import_module(module)
        except ImportError:  # kernels is optional
            continue
        if hasattr(mod, name):
            monkeypatch.setattr(mod, name, reached(f"{module}.{name}"))
    hub_kernels = sys.modules.get("transformers.integrations.hub_kernels")
    if hub_kernels is not None and hasattr(hub_kernels, "lazy_import_flash_attention"):
        monkeypatch.setattr(hub_kernels, "lazy_import_flash_attention", reached("a Hub attention kernel"))
    return calls


def _gpt2_config() -> dict:
    import transformers

    config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=20, n_positions=8,
                                     bos_token_id=0, eos_token_id=0)
    return config.to_dict()


def _with(config: dict, path: str, value) -> dict:
    config = json.loads(json.dumps(config))
    *parents, key = path.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[key] = value
    return config


def _detr_with_hub_backbone() -> dict:
    import transformers

    config = transformers.AutoConfig.for_model("detr", backbone_config={"model_type": "resnet"}).to_dict()
    config.pop("backbone_config")
    return {**config, "use_pretrained_backbone": True, "use_timm_backbone": False, "backbone": "org/backbone-repo"}


def _clip() -> dict:
    import transformers

    return transformers.AutoConfig.for_model("clip", text_config={"hidden_size": 8, "num_hidden_layers": 1,
                                                                  "num_attention_heads": 2, "intermediate_size": 8},
                                             vision_config={"hidden_size": 8, "num_hidden_layers": 1,
                                                            "num_attention_heads": 2, "intermediate_size": 8,
                                                            "image_size": 8, "patch_size": 4}).to_dict()


HF_CASES = {  # name: (factory, config builder, architecture, field named in the refusal)
    "attn-implementation-hub-repo": ("causal", lambda: _with(_gpt2_config(), "attn_implementation",
                                                             "kernels-community/flash-attn"), None, "attn_implementation"),
    "attn-implementation-flash-fallback": ("causal", lambda: _with(_gpt2_config(), "attn_implementation",
                                                                   "flash_attention_2"), None, "attn_implementation"),
    "use-pretrained-backbone-repo": ("model", _detr_with_hub_backbone, "DetrForObjectDetection", "use_pretrained_backbone"),
    "nested-attn-implementation": ("model", lambda: _with(_clip(), "text_config.attn_implementation",
                                                          "evil-org/kernel"), "CLIPModel", "attn_implementation"),
    "trust-remote-code": ("causal", lambda: {**_gpt2_config(), "trust_remote_code": True}, None, "trust_remote_code"),
    "auto-map": ("causal", lambda: {**_gpt2_config(), "auto_map": {"AutoModelForCausalLM": "evil-org/repo--m.M"}},
                 None, "auto_map"),
    "quantization-config": ("causal", lambda: {**_gpt2_config(), "quantization_config": {"quant_method": "bitsandbytes",
                                                                                          "load_in_8bit": True}},
                            None, "quantization_config"),
    "timm-model-type": ("model", lambda: {"model_type": "timm_wrapper", "architecture": "hf-hub:evil-org/model"},
                        "TimmWrapperModel", "timm_wrapper"),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_hugging_face_configs_refuse_every_field_that_reaches_the_network(no_network, case):
    from sharpscope import hf

    factory, build, architecture, field = HF_CASES[case]
    config = build()
    with pytest.raises(ValueError, match=field) as err:
        if factory == "causal":
            hf.causal_lm_from_config(config)
        else:
            hf.model_from_config(config, architecture)
    assert "\n" not in str(err.value) and "no download, no remote code" in str(err.value)
    assert no_network == []


def test_a_clean_hugging_face_config_still_builds_offline(no_network):
    """The allow-list takes what configs hold: a GPT-2 (its Hub label dropped) and a CLIP with sub-configs."""
    from sharpscope import hf

    model = hf.causal_lm_from_config({**_gpt2_config(), "_name_or_path": "openai-community/gpt2",
                                      "attn_implementation": "eager"}, "GPT2LMHeadModel", "float64")
    assert next(model.parameters()).dtype == torch.float64 and model.config._name_or_path == ""
    assert type(hf.model_from_config(_clip(), "CLIPModel")).__name__ == "CLIPModel"
    assert no_network == []
