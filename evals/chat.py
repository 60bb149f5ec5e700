"""Chat templates for lm-eval's `--apply_chat_template`: found beside the tokenizer (as
Hugging Face keeps them) or given explicitly, rendered with jinja2 the way Hugging Face
tokenizers render them, so a template written for huginn-0125 gives the same prompt here.

Where a template comes from, first match wins:
  1. `chat_template=` (model_args) / `rdp eval --chat-template`: a file, or the template text
  2. `chat_template.jinja` beside the tokenizer file
  3. the `chat_template` field of `tokenizer_config.json` beside the tokenizer file
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Optional

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"


class ChatTemplateError(ValueError):
    user_facing = True


def read_tokenizer_config(directory: Path) -> dict:
    path = directory / TOKENIZER_CONFIG
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ChatTemplateError(f"{path}: not valid JSON ({exc.msg})") from None
    return data if isinstance(data, dict) else {}


def find_chat_template(tokenizer_dir: Path, given: Optional[str] = None) -> Optional[str]:
    """The template text, or None when there is none."""
    if given:
        path = Path(given)
        return path.read_text() if path.is_file() else given
    if (tokenizer_dir / TEMPLATE_FILE).is_file():
        return (tokenizer_dir / TEMPLATE_FILE).read_text()
    template = read_tokenizer_config(tokenizer_dir).get("chat_template")
    if isinstance(template, list):  # Hugging Face's named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


@lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2 import TemplateError, nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """`{% generation %}...{% endgeneration %}` marks the assistant's tokens for training
        masks (huginn-0125's template uses it); for a prompt it renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols, GenerationBlock])
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent, ensure_ascii=False)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = True, **specials) -> str:
    """The prompt for `messages`. Without a generation prompt the last (assistant) message is
    left open, so the model continues it (lm-eval's gen_prefix), as Hugging Face's
    `continue_final_message` does: the text is cut right after that message's content."""
    from jinja2 import TemplateError

    try:
        text = _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **specials)
    except TemplateError as exc:
        raise ChatTemplateError(f"chat template: {exc}") from None
    if not add_generation_prompt and messages:
        final = str(messages[-1]["content"]).strip()
        cut = text.rfind(final)
        if final and cut >= 0:
            text = text[:cut + len(final)]
    return text
