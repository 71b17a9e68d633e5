from __future__ import annotations

from django.apps import AppConfig


class DemoConfig(AppConfig):
    """``manage.py demo``: the whole story end to end, with a real worker (``make demo``)."""

    name = "demo"
