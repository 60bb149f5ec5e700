"""What may reach an sbatch script unquoted, and how the rest is quoted.

A value on an #SBATCH line is read by sbatch, which splits at whitespace and quotes; one in a
comment ends at a newline. So such values (paths, job names, site words) must be plain words: no
whitespace, quotes, control characters or shell-active characters. Everything the shell runs is
quoted with shlex.quote instead.
"""
from __future__ import annotations

import re
import shlex

from rdp.pretrain.config import ConfigError

SBATCH_WORD = re.compile(r"^[A-Za-z0-9_./:@%+,=~-]+$")
# template values that are whole, already-quoted shell blocks (several lines by design)
SHELL_BLOCKS = frozenset({"sbatch_lines", "setup_lines", "env_lines", "srun_line"})


def has_control_character(text: str) -> bool:
    return any(ord(c) < 32 or ord(c) == 127 or c in "\u2028\u2029\x85" for c in text)


def sbatch_word(field_name: str, value: object) -> str:
    """`value` if it can stand on an #SBATCH line and in a comment as it is; else ConfigError."""
    text = str(value)
    if not SBATCH_WORD.match(text):
        bad = sorted({c for c in text if not SBATCH_WORD.match(c)}) if text else []
        shown = ", ".join(repr(c) for c in bad) if bad else "an empty value"
        raise ConfigError(f"{field_name}: {text!r} cannot go into an sbatch script (it has {shown}); "
                          f"use letters, digits and _ . / : @ % + , = ~ - only")
    return text


def shell_words(field_name: str, text: str) -> str:
    """A command prefix written as shell words ("apptainer exec --nv /img.sif"), re-quoted word by
    word: the words stay, anything shell-active inside them (; $() ` | &) becomes literal."""
    if has_control_character(text):
        raise ConfigError(f"{field_name}: {text!r} has a newline or other control character")
    try:
        return " ".join(shlex.quote(word) for word in shlex.split(text))
    except ValueError as exc:
        raise ConfigError(f"{field_name}: {text!r} is not a list of shell words ({exc})") from None


