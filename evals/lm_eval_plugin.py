"""`lm_eval --model rdp ...` from lm-eval's own command.

lm-eval 0.4.13 finds models only in its registry, which holds its built-in names
(lm_eval/models/__init__.py) and whatever was imported and decorated with
`@register_model` before the lookup; it reads no entry points. So the installed rdp adds
one line to site-packages, `rdp-lm-eval-plugin.pth`, which Python runs at start-up: it
imports this module, which waits for `lm_eval.models` to be imported and then registers
`rdp` there as a lazy placeholder ("module:Class", the form lm-eval uses for its own
models). Nothing of rdp or torch is imported until a run asks for `--model rdp`, and a
program that never imports lm-eval only pays for this module.

pyproject.toml also declares the entry point `rdp` in the group `lm_eval.models`, which
is how lm-eval versions that discover plugins find models; there the name is already
registered when this hook runs, and it leaves it alone.
"""
from __future__ import annotations

import sys

MODEL_NAME = "rdp"
TARGET = "rdp.evals.lm_adapter:RecurrentDepthLM"
WATCHED = "lm_eval.models"


def register() -> None:
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=TARGET)


class _RegisterAfter:
    """The real loader of `lm_eval.models`, then the registration. (No importlib.abc base
    classes: this module is imported at every interpreter start and must stay light.)"""

    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module) -> None:
        self.inner.exec_module(module)
        register()


class _WatchLmEvalModels:
    """Finds `lm_eval.models` with the finders after it, then registers once it has run."""

    def find_spec(self, name, path=None, target=None):
        if name != WATCHED:
            return None
        for finder in sys.meta_path[sys.meta_path.index(self) + 1:]:
            spec = getattr(finder, "find_spec", lambda *a: None)(name, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _RegisterAfter(spec.loader)
                return spec
        return None


def install() -> None:
    """Run by the .pth line at interpreter start; never lets a failure stop Python."""
    try:
        if WATCHED in sys.modules:
            register()
        elif not any(isinstance(f, _WatchLmEvalModels) for f in sys.meta_path):
            sys.meta_path.insert(0, _WatchLmEvalModels())
    except Exception as exc:  # noqa: BLE001 - a broken lm-eval must not break every Python start
        print(f"rdp: could not register the lm-eval model 'rdp' ({exc})", file=sys.stderr)
