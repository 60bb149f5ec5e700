"""The project is described in pyproject.toml; this file adds the one thing setuptools has
no key for: `rdp-lm-eval-plugin.pth` at the top of site-packages, so that lm-eval's own
`lm_eval --model rdp` finds the model (see evals/lm_eval_plugin.py). Wheels carry it at
their root; an editable install (`pip install -e .`) writes it beside its own .pth."""
import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "rdp-lm-eval-plugin.pth"
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "evals", PTH)


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        # an editable build installs straight from the unpacked wheel (install_lib), not build_lib
        target = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        self.copy_file(SOURCE, os.path.join(target, PTH))

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        return outputs if self.editable_mode else outputs + [os.path.join(self.build_lib, PTH)]


setup(cmdclass={"build_py": BuildPyWithPth})
