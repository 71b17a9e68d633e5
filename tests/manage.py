"""The test project's manage.py: imports its Celery app first, as a project's __init__ does."""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings_postgres")
    from django.core.management import execute_from_command_line

    import tests.celery_app  # noqa: F401

    execute_from_command_line(sys.argv)
