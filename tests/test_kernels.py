"""Kernels: dispatch, public entry points, and every Triton kernel against the reference.

The Triton kernels are checked on CPU through Triton's interpreter, which reads
TRITON_INTERPRET=1 when triton is first imported. Other test files import torch/triton in
this process, so tests/kernels/interpreted_checks.py runs in one separate pytest process
(started once per session) and each of its check functions is reported here as a test.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rdp import kernels
from rdp.kernels import reference as R
from rdp.kernels.dispatch import OP_NAMES, VALIDATED_TRITON_OPS, KernelBackendError, get_ops, resolve_backend

REPO = Path(__file__).resolve().parents[1]
CHECKS = REPO / "tests" / "kernels" / "interpreted_checks.py"
CHECK_NAMES = [node.name for node in ast.parse(CHECKS.read_text()).body
               if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")]


@pytest.fixture(scope="session")
def interpreted_results(tmp_path_factory):
    """Run the interpreted checks once; map check name -> [(case id, failure text or None)]."""
    report = tmp_path_factory.mktemp("kernels") / "report.xml"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CHECKS),
                           f"--junitxml={report}"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    if not report.exists():
        pytest.fail(f"interpreted checks did not run (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    results: dict[str, list[tuple[str, str | None]]] = {}
    for case in ET.parse(report).iter("testcase"):
        name = case.get("name", "")
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        skipped = case.find("skipped")
        text = None
        if problem is not None:
            text = (problem.get("message") or "") + "\n" + (problem.text or "")
        elif skipped is not None:
            text = "skipped: " + (skipped.get("message") or "")
        results.setdefault(name.split("[")[0], []).append((name, text))
    return results


@pytest.mark.parametrize("check", CHECK_NAMES)
def test_triton_kernel_interpreted(check, interpreted_results):
    cases = interpreted_results.get(check)
    assert cases, f"{check} did not run in the interpreted process"
    failures = [f"{name}: {text}" for name, text in cases if text is not None]
    assert not failures, "\n\n".join(failures)


# ---- in this process (no interpreter): dispatch and the reference path ---------------------
def test_resolve_backend(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert resolve_backend("torch") == "torch"
    # until a GPU run validates them (VALIDATED_TRITON_OPS), auto takes the PyTorch path, on CUDA too
    assert VALIDATED_TRITON_OPS == frozenset()
    assert resolve_backend("auto") == "torch"
    with pytest.raises(ValueError, match="auto, triton or torch"):
        resolve_backend("cuda")
    if not torch.cuda.is_available():
        with pytest.raises(KernelBackendError, match="no CUDA GPU .*TRITON_INTERPRET"):
            resolve_backend("triton")


def test_auto_uses_triton_only_for_validated_ops_on_cuda(monkeypatch):
    import rdp.kernels.dispatch as dispatch

    monkeypatch.setattr(dispatch, "VALIDATED_TRITON_OPS", frozenset({"rms_norm", "silu_mul"}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    ops = dispatch.get_ops("auto")
    assert ops.backend == "mixed"
    from rdp.kernels import triton_ops

    assert ops.rms_norm is triton_ops.rms_norm and ops.silu_mul is triton_ops.silu_mul
    assert ops.attention is R.attention and ops.bias_rope is R.bias_rope


def test_torch_backend_is_the_reference():
    ops = get_ops("torch")
    assert ops.backend == "torch"
    for name in OP_NAMES:
        assert getattr(ops, name) is getattr(R, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [16, 64, 96])  # the presets' (8+ pairs: whole SIMD vectors)
def test_rope_complex_form_equals_the_real_form_bit_for_bit(dtype, head_dim):
    # eager runs the complex form, torch.compile traces the real one: same values, same grads
    q = torch.randn(2, 7, 3, head_dim, 3, dtype=dtype)[..., 0].requires_grad_()  # strided, as Wqkv's split
    cos_sin = R.rope_cos_sin(head_dim, 16, 50000.0)[5:12].to(dtype)  # a decode offset
    outs = []
    for rotate in (R.rope_real, R.rope_complex):
        out = rotate(q, cos_sin)
        (grad,) = torch.autograd.grad(out, q, torch.linspace(-1, 1, out.numel()).view_as(out).to(dtype))
        outs.append((out, grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_public_entry_points_fall_back_to_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 5, 16), torch.randn(2, 3, 9, 16), torch.randn(2, 3, 9, 16)
    out = kernels.flash_attention(q, k, v, causal=True)
    # bottom-right aligned causal mask, written out: query i sees keys j <= i + (9 - 5)
    scores = q @ k.transpose(-1, -2) / 4.0
    allowed = torch.ones(5, 9, dtype=torch.bool).tril(diagonal=4)
    expected = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    full = kernels.flash_attention(q, q, q, causal=True)
    torch.testing.assert_close(full, F.scaled_dot_product_attention(q, q, q, is_causal=True))
    x, w = torch.randn(4, 10), torch.rand(10)
    torch.testing.assert_close(kernels.rms_norm(x, w, 1e-6), x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w)


def test_triton_ops_fall_back_for_tensors_triton_cannot_reach(monkeypatch):
    """model.kernels=auto on a GPU machine with a CPU model must not fail inside Triton."""
    import rdp.kernels.triton_ops as T

    monkeypatch.setattr(T, "INTERPRET", False)  # CPU tensors unreachable, as without the interpreter
    torch.manual_seed(1)
    x, f, w = torch.randn(3, 20), torch.randn(3, 20), torch.rand(20)
    assert torch.equal(T.add_rms_norm(x, f, w, 1e-6), R.add_rms_norm(x, f, w, 1e-6))
    q = torch.randn(1, 2, 5, 16)
    assert torch.equal(T.attention(q, q, q, causal=True), R.attention(q, q, q, causal=True))


def test_attention_forward_compiles_for_h100():
    """The interpreter compiles nothing: build the flash-attention forward (3.5B shapes, bf16,
    the GPU tile config) down to an sm_90 cubin with Triton's bundled ptxas, no GPU needed.
    `python -m rdp.kernels.aot_check` does the same for every kernel (about a minute)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-m", "rdp.kernels.aot_check", "--arch", "90", "--dtypes", "bf16",
                           "--only", "_attn_fwd"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if "_attn_fwd_kernel" in line]
    assert len(lines) == 2 and all(line.startswith("ok") for line in lines), proc.stdout  # prefill + decode tiles
