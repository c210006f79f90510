#!/usr/bin/env python
"""A user's Django project, as small as one can be: ``manage.py test shop`` and ``pytest``
run its own test suite, with no fixture from django-celery-fulldbresult."""

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "shopsite.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
