"""The one backend choice (latentattn.kernels.backend): by the tensors' device unless forced, one
environment variable, one function to force it. No GPU needed: a CUDA machine is simulated by
patching torch.cuda.is_available, and a CUDA tensor by an object that says it is one."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch

from conftest import cli_error
from latentattn import kernels
from latentattn.errors import ConfigError
from latentattn.kernels import backend

HAS_TRITON = importlib.util.find_spec("triton") is not None


@pytest.fixture(autouse=True)
def _fresh_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test reads the environment afresh and leaves the process's choice as it found it."""
    monkeypatch.setattr(backend, "_forced", None)
    monkeypatch.delenv(backend.ENV, raising=False)


def test_auto_chooses_by_the_tensors_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine
    assert backend.get_backend() == "auto"
    assert not backend.runs_triton(torch.zeros(1))  # CPU tensors: PyTorch, GPU or not
    cuda_like = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1))
    assert backend.runs_triton(cuda_like) == HAS_TRITON  # type: ignore[arg-type]
    monkeypatch.setattr(backend, "triton_available", lambda: False)
    assert not backend.runs_triton(cuda_like)  # type: ignore[arg-type]  # no Triton: PyTorch


@pytest.mark.parametrize("name", ["sdpa", "reference"])
def test_forcing_pytorch_never_runs_triton(name: str) -> None:
    with backend.use_backend(name):
        assert backend.get_backend() == name
        assert not backend.runs_triton(SimpleNamespace(is_cuda=True))  # type: ignore[arg-type]
    assert backend.get_backend() == "auto"


def test_reference_backend_runs_the_fp32_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(kernels, "attention_ref", lambda *a, **k: calls.append("ref") or 0)
    monkeypatch.setattr(kernels, "attention_sdpa", lambda *a, **k: calls.append("sdpa") or 0)
    q = torch.zeros(1, 1, 2, 4)
    kernels.attention(q, q, q, 1.0)
    monkeypatch.setenv(backend.ENV, "reference")
    monkeypatch.setattr(backend, "_forced", None)
    kernels.attention(q, q, q, 1.0)
    assert calls == ["sdpa", "ref"]


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_forced_triton_on_cpu_tensors_needs_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(backend.ENV, "triton")
    assert backend.get_backend() == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.runs_triton(torch.zeros(1))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ConfigError, match=r"on CPU tensors in Triton's interpreter.*auto or sdpa"):
        backend.runs_triton(torch.zeros(1))
    with pytest.raises(ConfigError, match="not on cpu: use --backend auto or sdpa, or --device cuda"):
        backend.check_device_backend("cpu")
    backend.check_device_backend("cuda:1")  # the kernels' own device: no complaint


def test_unknown_names_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="the backend must be one of auto, sdpa, reference, triton, "
                                          "got 'cuda'"):
        backend.set_backend("cuda")
    monkeypatch.setenv(backend.ENV, "torch")  # the old name of the PyTorch path
    with pytest.raises(ConfigError, match="LATENTATTN_BACKEND must be one of auto, sdpa"):
        backend.get_backend()
    monkeypatch.setattr(backend, "triton_available", lambda: False)
    with pytest.raises(ConfigError, match=r"pip install 'latentattn\[gpu\]'"):
        backend.set_backend("triton")


def test_a_cpu_model_generates_through_pytorch_on_a_gpu_machine(monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    """What a CUDA machine did before: triton chosen globally, then refused for CPU tensors at
    the first decode step. Now the CPU model's decode runs PyTorch, with no kernel launch."""
    from latentattn import load
    from latentattn.kernels import mla_decode, sparse_mla

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def no_kernel(*args: object, **kwargs: object) -> None:
        raise AssertionError("a Triton kernel was called for CPU tensors")

    for module, name in ((mla_decode, "mla_decode_triton"), (mla_decode, "mla_decode_fp8_triton"),
                         (sparse_mla, "sparse_mla_triton"), (sparse_mla, "sparse_mla_fp8_triton")):
        monkeypatch.setattr(module, name, no_kernel)
    import latentattn.attention.dsa as dsa_mod
    import latentattn.attention.mla as mla_mod

    for mod in (mla_mod, dsa_mod):
        for name in ("mla_decode_triton", "mla_decode_fp8_triton", "sparse_mla_triton",
                     "sparse_mla_fp8_triton", "indexer_logits_triton"):
            if hasattr(mod, name):
                monkeypatch.setattr(mod, name, no_kernel)
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(0))
    for preset in ("tiny-mla", "tiny-dsa"):
        model = load(preset, seed=0)
        out = model.generate(prompt, 4)
        assert out.shape == (2, 9) and torch.equal(out[:, :5], prompt)


def test_generate_refuses_a_forced_triton_backend_on_the_cpu(capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    if not HAS_TRITON:
        pytest.skip("needs triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    line = cli_error(capsys, ["generate", "--model", "tiny-mla", "--prompt", "hi",
                              "--max-new-tokens", "2", "--backend", "triton"])
    assert "the triton backend runs on CUDA devices" in line and "--backend auto" in line
    assert backend.get_backend() == "auto"  # the CLI's choice did not leak

