"""Command-line flags shared by the tools, generated from the backend table.

:func:`registry_flags` adds every backend, model or sampling option of
:mod:`rddm_infer.backends.registry` to a typer command, so a new row's options reach
``restore``, ``bench``, ``info`` and ``rddm-export`` with no edit here. The command receives
them as one ``options`` dict (``None``: not given, the backend's default applies).

Typer's rich help prints a type column for every option, so an on/off switch reads
``--quiet <bool>`` as if it took a value. A switch takes none: its type cell stays empty.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable, Optional

import typer
import typer.core

from .backends.registry import cli_options, option_help

PANELS = {"backend": "Backend tuning", "model": "Reference checkpoints", "sampling": None}

_Option = getattr(typer.core, "TyperOption", None)
_display = getattr(_Option, "display_type_rich", None)

if _display is not None and not getattr(_display, "_flags_as_flags", False):
    def _display_type_rich(self, ctx):
        return None if getattr(self, "is_flag", False) and self.metavar is None else _display(self, ctx)

    _display_type_rich._flags_as_flags = True
    _Option.display_type_rich = _display_type_rich


def _parameter(option, owners: list[str], panel: str | None) -> inspect.Parameter:
    text = option_help(option.name, owners) if owners else option.help[:1].upper() + option.help[1:] + (
        f" ({', '.join(map(str, option.choices))})." if not all(str(c) in option.help for c in option.choices)
        else ".")
    if option.type is bool:
        decls, kind = (f"{option.flag}/--no-{option.flag[2:]}",), Optional[bool]
    else:
        decls, kind = (option.flag,), Optional[{int: int, float: float}.get(option.type, str)]
    default = typer.Option(None, *decls, help=text, rich_help_panel=panel, show_default=False)
    return inspect.Parameter(option.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=kind)


def registry_flags(*groups: str, panels: dict | None = None) -> Callable:
    """Decorate a command taking ``options: dict``: each option of ``groups`` (``backend``, ``model``,
    ``sampling``) becomes a flag, after the command's own; their values arrive in ``options``."""
    panels = {**PANELS, **(panels or {})}

    def decorate(func: Callable) -> Callable:
        sig = inspect.signature(func)
        own = [p for name, p in sig.parameters.items() if name != "options"]
        taken = {p.name for p in own}
        added = []
        for group in groups:
            for option, owners in cli_options(group):
                if option.name in taken:
                    raise ValueError(f"{func.__name__}: the {group} option {option.name!r} clashes with the "
                                     f"command's own --{option.name.replace('_', '-')}")
                taken.add(option.name)
                added.append(_parameter(option, owners, panels.get(group)))
        names = {p.name for p in added}

        @functools.wraps(func)
        def command(**kwargs):
            options = {k: kwargs.pop(k) for k in names}
            return func(**kwargs, options=options)

        command.__signature__ = sig.replace(parameters=own + added)
        command.__annotations__ = {**{k: v for k, v in func.__annotations__.items() if k != "options"},
                                   **{p.name: p.annotation for p in added}}
        return command

    return decorate
