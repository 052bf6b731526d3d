"""The ``netslim`` command line: :mod:`.parser` (torch-free, every flag declared once) and
:mod:`.commands` (what each command does, and :func:`main`)."""

from netslim.cli.commands import main

__all__ = ["main"]
