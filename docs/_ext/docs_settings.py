"""The smallest Django settings under which the package imports, for autodoc (docs/conf.py).

No database is opened while the documentation builds: the models are only imported.
"""

SECRET_KEY = "docs-not-secret"
USE_TZ = True
INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django_celery_fulldbresult",
]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
CELERY_RESULT_BACKEND = "django_celery_fulldbresult.result_backends:DatabaseResultBackend"
