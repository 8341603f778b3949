"""Help output shared by the command-line tools: flags render as flags.

Typer's rich help prints a type column for every option, so an on/off switch reads
``--quiet <bool>`` as if it took a value. A switch takes none: its type cell stays empty.
"""

from __future__ import annotations

import typer.core

_Option = getattr(typer.core, "TyperOption", None)
_display = getattr(_Option, "display_type_rich", None)

if _display is not None and not getattr(_display, "_flags_as_flags", False):
    def _display_type_rich(self, ctx):
        return None if getattr(self, "is_flag", False) and self.metavar is None else _display(self, ctx)

    _display_type_rich._flags_as_flags = True
    _Option.display_type_rich = _display_type_rich
