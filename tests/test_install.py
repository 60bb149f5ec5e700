"""rdp installs under one namespace (`rdp.*`) beside PyPI packages named like its rooms.

The PyPI `kernels` package (Hugging Face's kernel hub client, which transformers imports when
present) is installed in the test environment; both it and `rdp.kernels` must import from
their own files and work. Each check runs in a fresh interpreter outside the repository, as
a user's program would (inside the repository the folder `kernels/` would be on the path)."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOMS = ("pretrain", "data_pipeline", "launch", "kernels", "evals", "slurm")


def run_python(code: str, cwd: Path, env: dict | None = None) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_rdp_and_the_pypi_kernels_package_both_import_and_work(tmp_path):
    out = run_python("""
        import os
        os.environ["HF_HUB_OFFLINE"] = "1"
        import torch
        import kernels                      # Hugging Face's package
        from kernels import Mode, kernelize, use_kernel_forward_from_hub
        import rdp.kernels                  # ours
        from rdp.kernels import get_ops

        assert "site-packages" in kernels.__file__, kernels.__file__
        assert not rdp.kernels.__file__.startswith(os.path.dirname(kernels.__file__))

        @use_kernel_forward_from_hub("SiluAndMul")
        class SiluAndMul(torch.nn.Module):
            def forward(self, x):
                d = x.shape[-1] // 2
                return torch.nn.functional.silu(x[..., :d]) * x[..., d:]

        # no mapping registered: kernelize keeps the layer's own forward, offline
        layer = kernelize(torch.nn.Sequential(SiluAndMul()), mode=Mode.INFERENCE, device="cpu")
        x = torch.randn(3, 8)
        ops = get_ops("torch")
        torch.testing.assert_close(layer(x), ops.silu_mul(x))
        print("ok", ops.backend)
    """, cwd=tmp_path)
    assert out.split() == ["ok", "torch"]


def test_no_room_is_importable_by_its_bare_name_outside_the_repository(tmp_path):
    out = run_python(f"""
        import importlib.util
        rooms = {ROOMS!r}
        found = {{name: importlib.util.find_spec(name) for name in rooms}}
        # `kernels` is the PyPI package; no other room name may resolve to this repository
        leaked = [n for n, spec in found.items()
                  if spec is not None and (spec.origin or "").startswith({str(REPO)!r} + "/" + n)]
        assert not leaked, leaked
        import rdp.launch.cli, rdp.pretrain.config
        print(rdp.pretrain.config.load_config("tiny").model.hidden_size)
    """, cwd=tmp_path)
    assert int(out) > 0


def test_source_imports_only_through_the_rdp_namespace():
    """A bare `import pretrain` inside rdp would load a second copy of a room (or a PyPI
    package of that name) once installed."""
    bad = []
    for room in ROOMS + ("tests", "benchmarks"):
        for path in (REPO / room).rglob("*.py"):
            if path == Path(__file__).resolve():  # imports the PyPI `kernels` on purpose
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                stripped = line.strip()
                for name in ROOMS:
                    if stripped.startswith((f"from {name} import", f"from {name}.", f"import {name}")):
                        bad.append(f"{path.relative_to(REPO)}:{number}: {stripped}")
    assert not bad, "\n".join(bad)


def test_wheel_holds_every_room_under_rdp_with_its_data(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("rdp-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    top = {n.split("/")[0] for n in names if not n.startswith("rdp-")}
    assert top == {"rdp"}, top
    assert "rdp-lm-eval-plugin.pth" in names  # `lm_eval --model rdp` (evals/lm_eval_plugin.py)
    for required in ("rdp/__init__.py", "rdp/pretrain/model.py", "rdp/kernels/dispatch.py", "rdp/configs/tiny.yaml",
                     "rdp/configs/huginn-3.5b.yaml", "rdp/slurm/templates/train.sbatch.tmpl",
                     "rdp/slurm/local_cluster.sh", "rdp/launch/cli.py"):
        assert required in names, required
    # installed from the wheel alone (no editable finder), presets and the CLI still resolve
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    out = run_python("""
        import rdp.pretrain.config as c, rdp.launch.cli as cli
        print(c.load_config("huginn-3.5b").model.hidden_size, c.PRESET_DIR.parent.name)
        cli.build_parser()
    """, cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "PYTHONNOUSERSITE": "1"})
    assert out.split() == ["5280", "rdp"]
