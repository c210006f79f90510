"""Sphinx helpers that keep the documentation true to the code.

* ``.. setting:: NAME`` / ``:setting:`NAME``` (as in Django's own documentation), and a check
  that ``ref/settings.rst`` documents every entry of ``conf.DEFAULTS`` (and of
  ``conf.ALIASES``) with the default the code has: a difference is a build warning, so an
  error under ``-W``.
* ``.. fulldb-command:: NAME``: a management command's description and options, read from
  its argument parser, so the reference cannot drift from ``--help``.
* Files included from the repository root (README.rst, CHANGELOG.rst) keep working links:
  a relative image or link is rewritten to where it lives in the site (a page of the site,
  or the file in the repository).
* After an HTML build, every relative link and anchor of the output is checked to exist.
"""

from __future__ import annotations

import ast
import os
import posixpath
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from docutils import nodes
from docutils.parsers.rst import directives
from docutils.statemachine import StringList
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

logger = logging.getLogger(__name__)

REPOSITORY = "https://github.com/resulto-admin/django-celery-fulldbresult"
#: Files of the repository that are pages of the site (repository path -> docname).
SITE_PAGES = {"README.rst": "readme", "CHANGELOG.rst": "changelog"}
PREFIX = "DJANGO_CELERY_FULLDBRESULT_"

# -- settings ---------------------------------------------------------------------------

SETTING_BLOCK = re.compile(
    r"^\.\. setting:: (?P<name>\S+)\s*$(?P<body>.*?)(?=^\.\. setting:: |\Z)", re.M | re.S
)
FIELD = re.compile(r"^:(?P<field>Type|Default|Alias of):\s*(?P<value>.+?)\s*$", re.M)


def _literal(text: str) -> str | None:
    match = re.fullmatch(r"``(.+?)``", text.strip())
    return match.group(1) if match else None


def check_settings(app: Any) -> None:
    """Every setting of ``conf.py`` is documented with its default and a type that fits it."""
    from django_celery_fulldbresult import conf

    path = "ref/settings"  # warnings name the page: docs/ref/settings.rst
    text = (Path(app.srcdir) / "ref" / "settings.rst").read_text(encoding="utf-8")
    documented: dict[str, dict[str, str]] = {}
    for block in SETTING_BLOCK.finditer(text):
        line = text.count("\n", 0, block.start()) + 1
        name = block.group("name")
        if not name.startswith(PREFIX):
            logger.warning("setting %s lacks the %s prefix", name, PREFIX, location=(path, line))
            continue
        fields = {m.group("field"): m.group("value") for m in FIELD.finditer(block.group("body"))}
        fields["line"] = str(line)
        documented[name[len(PREFIX) :]] = fields

    for name, default in conf.DEFAULTS.items():
        fields = documented.get(name)
        if fields is None:
            logger.warning("%s%s (conf.DEFAULTS) is not documented", PREFIX, name, location=path)
            continue
        location = (path, int(fields["line"]))
        shown = _literal(fields.get("Default", ""))
        try:
            value = ast.literal_eval(shown) if shown is not None else None
        except (ValueError, SyntaxError):
            value = shown
        if shown is None or value != default or type(value) is not type(default):
            logger.warning(
                "%s%s: documented default %r, conf.DEFAULTS has %r",
                PREFIX,
                name,
                fields.get("Default"),
                default,
                location=location,
            )
        kind = type(default).__name__
        if kind not in fields.get("Type", ""):
            logger.warning(
                "%s%s: documented type %r does not name %r (the default's type)",
                PREFIX,
                name,
                fields.get("Type"),
                kind,
                location=location,
            )
    for old, new in conf.ALIASES.items():
        fields = documented.get(old)
        if fields is None or _literal(fields.get("Alias of", "")) != PREFIX + new:
            logger.warning(
                "%s%s: document it with ':Alias of: ``%s%s``'",
                PREFIX,
                old,
                PREFIX,
                new,
                location=path,
            )
    for name, fields in documented.items():
        if name not in conf.DEFAULTS and name not in conf.ALIASES:
            logger.warning(
                "%s%s is documented but is not a setting of conf.py",
                PREFIX,
                name,
                location=(path, int(fields["line"])),
            )


# -- management commands -------------------------------------------------------------------


def check_commands(app: Any) -> None:
    """Every management command of the package has its ``fulldb-command`` in the reference."""
    from django.core.management import find_commands

    import django_celery_fulldbresult

    path = "ref/commands"
    text = (Path(app.srcdir) / "ref" / "commands.rst").read_text("utf-8")
    documented = set(re.findall(r"^\.\. fulldb-command:: (\S+)", text, re.M))
    package = Path(django_celery_fulldbresult.__file__).parent / "management"
    for name in sorted(set(find_commands(str(package))) - documented):
        logger.warning(
            "manage.py %s is not documented (.. fulldb-command:: %s)", name, name, location=path
        )


#: Options every Django command has; the reference names them once instead of per command.
COMMON_OPTIONS = {
    "help",
    "version",
    "verbosity",
    "settings",
    "pythonpath",
    "traceback",
    "no_color",
    "force_color",
    "skip_checks",
}


def _escape(text: str) -> str:
    """Help text as literal reStructuredText (no markup of its own)."""
    return re.sub(r"([\\`*_|])", r"\\\1", " ".join(text.split()))


class CommandDirective(SphinxDirective):
    """The description and options of ``manage.py NAME``, from its parser."""

    required_arguments = 1
    option_spec = {"app": directives.unchanged}

    def run(self) -> list[nodes.Node]:
        from django.core.management import load_command_class

        name = self.arguments[0]
        command = load_command_class(self.options.get("app", "django_celery_fulldbresult"), name)
        parser = command.create_parser("manage.py", name)
        lines = [f".. program:: {name}", ""]
        lines += [".. code-block:: text", ""]
        usage = [
            action
            for action in parser._actions  # argparse keeps no public list of its actions
            if action.dest not in COMMON_OPTIONS
        ]
        synopsis = f"python manage.py {name}"
        for action in usage:
            option = action.option_strings[0]
            synopsis += f" [{option}" + ("" if action.nargs == 0 else f" {_metavar(action)}") + "]"
        lines += ["    " + part for part in _wrap(synopsis, 88)] + [""]
        lines += [_escape(str(command.help)), ""]
        for action in usage:
            signature = ", ".join(
                opt if action.nargs == 0 else f"{opt} {_metavar(action)}"
                for opt in action.option_strings
            )
            lines += [f".. option:: {signature}", ""]
            details = _escape(str(action.help or "")).replace("%%", "%")
            if action.choices:
                details += " One of: " + ", ".join(f"``{c}``" for c in action.choices) + "."
            if action.nargs != 0 and action.default not in (None, False):
                details += f" Default: ``{action.default}``."
            if action.__class__.__name__ == "_AppendAction" and "repeatable" not in details:
                details += " Repeatable."
            lines += ["   " + details, ""]
        container = nodes.container()
        self.state.nested_parse(StringList(lines, source=f"<command {name}>"), 0, container)
        return container.children


class ModelFieldsDirective(SphinxDirective):
    """The columns of a model, from its ``_meta``: name, type, NULL allowed, description."""

    required_arguments = 1

    def run(self) -> list[nodes.Node]:
        from django.apps import apps

        model = apps.get_model(self.arguments[0])
        lines = [
            ".. list-table::",
            "   :header-rows: 1",
            "   :widths: 22 22 8 48",
            "",
            "   * - Column",
            "     - Type",
            "     - NULL",
            "     - Description",
        ]
        for field in model._meta.concrete_fields:
            kind = field.get_internal_type()
            if getattr(field, "max_length", None) and kind == "CharField":
                kind += f" ({field.max_length})"
            if field.unique and not field.primary_key:
                kind += ", unique"
            if field.primary_key:
                kind += ", primary key"
            description = str(field.verbose_name)
            if field.help_text:
                description += f": {field.help_text}"
            lines += [
                f"   * - ``{field.column}``",
                f"     - {_escape(kind)}",
                f"     - {'yes' if field.null else 'no'}",
                f"     - {_escape(description)}",
            ]
        container = nodes.container()
        self.state.nested_parse(StringList(lines, source=f"<model {model.__name__}>"), 0, container)
        return container.children


class AdminActionsDirective(SphinxDirective):
    """The actions of a ModelAdmin: name, label, the permission it needs (from the action's
    ``allowed_permissions`` and Django's ``<app>.<permission>_<model>`` naming)."""

    required_arguments = 1
    option_spec = {"model": directives.unchanged_required}

    def run(self) -> list[nodes.Node]:
        from django.apps import apps
        from django.utils.module_loading import import_string

        model_admin = import_string(self.arguments[0])
        opts = apps.get_model(self.options["model"])._meta
        lines = [
            ".. list-table::",
            "   :header-rows: 1",
            "   :widths: 30 40 30",
            "",
            "   * - Action (``action`` value)",
            "     - Label",
            "     - Permission",
        ]
        for action in model_admin.actions:
            permissions = getattr(action, "allowed_permissions", ())
            names = ", ".join(f"``{opts.app_label}.{p}_{opts.model_name}``" for p in permissions)
            lines += [
                f"   * - ``{action.__name__}``",
                f"     - {_escape(str(action.short_description))}",
                f"     - {names or 'none'}",
            ]
        container = nodes.container()
        self.state.nested_parse(StringList(lines, source="<admin actions>"), 0, container)
        return container.children


def _metavar(action: Any) -> str:
    if action.metavar:
        return str(action.metavar)
    if action.choices:
        return "{" + ",".join(action.choices) + "}"
    return action.dest.upper()


def _wrap(text: str, width: int) -> list[str]:
    lines, current = [], ""
    for word in re.split(r" (?=\[)", text):
        if current and len(current) + 1 + len(word) > width:
            lines.append(current)
            current = "    " + word
        else:
            current = f"{current} {word}" if current else word
    return lines + [current]


# -- files included from the repository root -----------------------------------------------

EMBEDDED = re.compile(r"`(?P<text>[^`<]*?)\s*<(?P<target>[^<>`\s]+)>`(?P<underscores>__?)")
NAMED_TARGET = re.compile(r"^(?P<lead>[ \t]*\.\. _[^:\n]+:[ \t]+)(?P<target>\S+)[ \t]*$", re.M)
IMAGE = re.compile(r"^(?P<lead>[ \t]*\.\. (?:image|figure):: )(?P<target>\S+)[ \t]*$", re.M)


def _is_relative(target: str) -> bool:
    return not (
        re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I)
        or target.startswith(("#", "/"))
        or target.endswith("_")  # a reference to another target, not a URI
    )


def _site_doc(path: str) -> str | None:
    """The docname of a repository file that is a page of the site, if it is one."""
    if path in SITE_PAGES:
        return SITE_PAGES[path]
    if path.startswith("docs/"):
        base, ext = posixpath.splitext(path[len("docs/") :])
        if ext in (".rst", ".md"):
            return base
    return None


def fix_included_links(app: Any, relative_path: Path, parent_docname: str, content: list) -> None:
    """``include-read``: relative links of a file from the repository root, made to work here."""
    srcdir = Path(app.srcdir)
    included = (srcdir / relative_path).resolve()
    root = srcdir.parent.resolve()
    if included.parent != root:
        return  # only files of the repository root (README.rst, CHANGELOG.rst)
    here = posixpath.dirname(parent_docname)

    def uri(target: str) -> tuple[str | None, str]:
        """(docname, "") for a page of the site, else (None, a URI for the target)."""
        path, _, fragment = target.partition("#")
        path = posixpath.normpath(path)
        docname = _site_doc(path)
        if docname is not None and not fragment:
            return docname, ""
        if docname is not None:
            return None, posixpath.relpath(docname, here or ".") + ".html#" + fragment
        blob = "tree" if (root / path).is_dir() else "blob"
        return None, f"{REPOSITORY}/{blob}/master/{path}" + (f"#{fragment}" if fragment else "")

    def embedded(match: re.Match) -> str:
        target = match.group("target")
        if not _is_relative(target):
            return match.group(0)
        docname, link = uri(target)
        text = match.group("text") or target
        if docname is not None:
            return f":doc:`{text} </{docname}>`"
        return f"`{text} <{link}>`__"

    def named(match: re.Match) -> str:
        target = match.group("target")
        if not _is_relative(target):
            return match.group(0)
        docname, link = uri(target)
        if docname is not None:
            link = posixpath.relpath(docname, here or ".") + ".html"
        return match.group("lead") + link

    def image(match: re.Match) -> str:
        target = match.group("target")
        if not _is_relative(target):
            return match.group(0)
        return match.group("lead") + os.path.relpath(root / target, srcdir / here)

    text = content[0]
    text = EMBEDDED.sub(embedded, text)
    text = NAMED_TARGET.sub(named, text)
    content[0] = IMAGE.sub(image, text)


# -- internal links of the built site ------------------------------------------------------


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for key, value in attrs:
            if key in ("id", "name") and value:
                self.ids.add(value)
            elif key in ("href", "src") and value and tag in ("a", "img", "link", "script"):
                self.links.append(value)


def check_internal_links(app: Any, exception: Exception | None) -> None:
    """Every relative href/src of the HTML output names a file that exists, and its
    fragment an id of that file."""
    if exception is not None or app.builder.format != "html":
        return
    outdir = Path(app.outdir)
    pages: dict[Path, _Links] = {}

    def parsed(page: Path) -> _Links:
        if page not in pages:
            links = _Links()
            links.feed(page.read_text(encoding="utf-8"))
            pages[page] = links
        return pages[page]

    for page in sorted(outdir.rglob("*.html")):
        if page.relative_to(outdir).parts[0] in ("_static", "_sources"):
            continue
        for link in parsed(page).links:
            if re.match(r"^[a-z][a-z0-9+.-]*:", link, re.I) or link.startswith("//"):
                continue
            path, _, fragment = link.partition("#")
            path = path.split("?", 1)[0]
            target = (page.parent / path).resolve() if path else page
            where = page.relative_to(outdir)
            if not target.exists():
                logger.warning("broken link in %s: %s (no such file)", where, link)
            elif fragment and target.suffix == ".html" and fragment not in parsed(target).ids:
                logger.warning("broken link in %s: %s (no such anchor)", where, link)


def setup(app: Any) -> dict[str, Any]:
    app.add_crossref_type("setting", "setting", indextemplate="pair: %s; setting")
    app.add_directive("fulldb-command", CommandDirective)
    app.add_directive("fulldb-model-fields", ModelFieldsDirective)
    app.add_directive("fulldb-admin-actions", AdminActionsDirective)
    app.connect("builder-inited", check_settings)
    app.connect("builder-inited", check_commands)
    app.connect("include-read", fix_included_links)
    app.connect("build-finished", check_internal_links)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
