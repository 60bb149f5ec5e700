"""scripts/gpu_check.sh: refuses without CUDA; on CPU, the parts that do not need a GPU
(report assembly, verdict rules, the training-step timer on the torch path). Nothing here
runs a kernel compiled on a GPU."""
from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def test_refuses_in_one_line_without_cuda(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "RDP_PYTHON": str(ROOT / ".venv" / "bin" / "python")}
    result = subprocess.run([str(ROOT / "scripts" / "gpu_check.sh"), "--out", str(tmp_path / "report")],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is False); run it on a GPU node "
        "-- nothing was checked or written"]
    assert not (tmp_path / "report").exists()


def test_every_kernel_check_maps_to_ops():
    source = (ROOT / "tests" / "kernels" / "interpreted_checks.py").read_text()
    names = [node.name for node in ast.parse(source).body
             if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")]
    assert len(names) > 10
    for name in names:
        assert set(gpu_check.ops_of_check(f"{name}[bf16]")) <= set(gpu_check.OPS), name
    assert gpu_check.ops_of_check("test_injection[bf16]") == ("injection",)
    assert gpu_check.ops_of_check("test_injection_reused_embedding_over_steps[fp32]") == (
        "injection_embedding", "injection_with_embedding")


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="interpreted_checks" name="test_rms_norm[shape0-True-bf16]" time="0.1"/>
<testcase classname="interpreted_checks" name="test_add_rms_norm[shape0-bf16]" time="0.1"/>
<testcase classname="interpreted_checks" name="test_silu_mul[shape0-bf16]" time="0.1">
  <failure message="AssertionError: silu_mul bf16 error 0.3">trace</failure></testcase>
<testcase classname="interpreted_checks" name="test_flash_attention[case0-bf16]" time="0.1"/>
<testcase classname="interpreted_checks" name="test_tiny_model_same_logits_and_grads" time="0.1"/>
</testsuite></testsuites>"""


def test_report_validates_only_ops_both_correct_and_faster(tmp_path):
    (tmp_path / "checks.xml").write_text(JUNIT)
    checks = gpu_check.parse_junit(tmp_path / "checks.xml")
    assert [c["passed"] for c in checks] == [True, True, False, True, True]
    assert checks[2]["message"].startswith("failure: AssertionError: silu_mul")
    rows = [
        # rms_norm: faster than eager and torch.compile in both modes
        *(dict(op="rms_norm", mode=m, impl=i, seconds=t) for m in ("fwd", "fwd+bwd")
          for i, t in (("triton", 1.0), ("eager", 3.0), ("compile", 1.5))),
        # add_rms_norm: slower than torch.compile backward
        dict(op="add_rms_norm", mode="fwd", impl="triton", seconds=1.0),
        dict(op="add_rms_norm", mode="fwd", impl="eager", seconds=2.0),
        dict(op="add_rms_norm", mode="fwd+bwd", impl="triton", seconds=2.0),
        dict(op="add_rms_norm", mode="fwd+bwd", impl="compile", seconds=1.9),
        # silu_mul: faster, but a check failed
        dict(op="silu_mul", mode="fwd", impl="triton", seconds=1.0),
        dict(op="silu_mul", mode="fwd", impl="eager", seconds=5.0),
        # attention: slower than SDPA
        dict(op="attention", mode="fwd", impl="triton", seconds=1.2),
        dict(op="attention", mode="fwd", impl="sdpa", seconds=1.0),
        # injection with the reused embedding: timed as injection_with_embedding
        dict(op="injection", mode="fwd", impl="triton", seconds=1.0),
        dict(op="injection", mode="fwd", impl="eager", seconds=2.0),
        dict(op="injection", mode="fwd", impl="triton_reused_e", seconds=0.5),
    ]
    report = gpu_check.assemble(checks, {"rows": rows}, None, {}, "cpu (test)")
    v = report["verdicts"]
    assert report["validated_ops"] == ["injection", "rms_norm"]
    assert v["rms_norm"] == dict(checks=2, failed=0, correct=True, min_speedup=1.5, faster=True)
    assert not v["add_rms_norm"]["faster"] and v["add_rms_norm"]["correct"]
    assert v["silu_mul"]["faster"] and not v["silu_mul"]["correct"]
    assert v["attention"]["correct"] and not v["attention"]["faster"]
    assert v["injection_with_embedding"]["min_speedup"] == 4.0  # faster, but no check here ran it
    assert v["injection_with_embedding"]["checks"] == 0 and not v["injection_with_embedding"]["correct"]
    assert v["linear_cross_entropy"]["min_speedup"] is None and not v["linear_cross_entropy"]["faster"]
    # nothing ran: nothing validated
    assert gpu_check.assemble(None, None, None, {}, "cpu")["validated_ops"] == []


def test_train_step_record_on_the_torch_path():
    record = gpu_check.train_step("tiny", steps=1, n=2, k=1, layers="reduced", seq=16, device="cpu")
    assert record["layers"] == dict(prelude=1, core=1, coda=1)
    assert record["full_layers"] == dict(prelude=1, core=2, coda=1) and record["reduced"]
    assert record["kernels"] == "torch" and record["num_steps"] == [2, 1]
    assert record["tokens_per_s"] == 16 / record["seconds_per_step"] > 0
    assert record["mfu"] is None and record["peak_flops"] is None  # no GPU peak on a CPU
    from rdp.pretrain.config import load_config
    from rdp.pretrain.flops import FlopsModel

    built = load_config("tiny", ["model.prelude_layers=1", "model.core_layers=1", "model.coda_layers=1"]).model
    assert record["model_flops_per_token"] == FlopsModel.from_config(built, 16).train(2, 1)
