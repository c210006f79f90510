"""Sphinx configuration of the documentation site (``make docs``).

Django is set up with a minimal settings module (``_ext/docs_settings.py``) so that autodoc
can import the models and the commands' parsers can be read; no database is opened.
"""

import os
import sys
from pathlib import Path

import django

DOCS = Path(__file__).resolve().parent
sys.path[:0] = [str(DOCS.parent), str(DOCS / "_ext")]
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "docs_settings")
django.setup()

import django_celery_fulldbresult  # noqa: E402  (after django.setup())

project = "django-celery-fulldbresult"
author = "django-celery-fulldbresult contributors"
copyright = "django-celery-fulldbresult contributors"
release = django_celery_fulldbresult.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "myst_parser",
    "fulldb_docs",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_ext", "Thumbs.db", ".DS_Store"]
# design.md is written for GitHub as well: its headings are linkable, its tables are GFM.
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"exclude-members": "DoesNotExist, MultipleObjectsReturned"}

html_theme = "furo"
html_title = f"django-celery-fulldbresult {release}"
html_theme_options = {
    "source_repository": "https://github.com/resulto-admin/django-celery-fulldbresult/",
    "source_branch": "master",
    "source_directory": "docs/",
}
pygments_style = "sphinx"
