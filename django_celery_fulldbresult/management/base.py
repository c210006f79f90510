"""What every management command of the package shares: its ``--help`` ends with where its
documentation is (the site, and ``docs/ref/commands.rst`` in the source distribution)."""

from __future__ import annotations

import textwrap
from typing import Any

from django.core.management.base import BaseCommand, CommandParser, DjangoHelpFormatter

DOCS = "https://django-celery-fulldbresult.readthedocs.io/en/latest/ref/commands.html"


class HelpFormatter(DjangoHelpFormatter):
    """Django's, but a URL is never cut at its hyphens or its length."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n".join(
            textwrap.fill(
                paragraph,
                width,
                initial_indent=indent,
                subsequent_indent=indent,
                break_on_hyphens=False,
                break_long_words=False,
            )
            for paragraph in text.split("\n")
        )


class DocumentedCommand(BaseCommand):
    def create_parser(self, prog_name: str, subcommand: str, **kwargs: Any) -> CommandParser:
        anchor = self.__module__.rpartition(".")[2].replace("_", "-")
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault(
            "epilog",
            f"Documentation:\n{DOCS}#{anchor}\n(docs/ref/commands.rst in the source distribution)",
        )
        return super().create_parser(prog_name, subcommand, **kwargs)
