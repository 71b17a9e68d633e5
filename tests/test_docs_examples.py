"""The testing how-to's first example (docs/how-to/testing.md), collected and run as written.

Executed at import, so pytest collects the example's own test function: its fixtures are
requested in the order the page gives them, which is what a reader copying it gets.
"""

from __future__ import annotations

import re
from typing import Any

from django.db.models.signals import post_save  # noqa: F401  (the example uses it)

from tests.workers import ROOT

EXAMPLE_PAGE = "docs/how-to/testing.md"


def send_welcome_email(sender: Any, instance: Any, created: bool, **kwargs: Any) -> None:
    """The tutorial's handler, which the example calls directly."""
    if created:
        instance.email_user("Welcome", f"Hello {instance.username}!")


def docs_example() -> str:
    page = (ROOT / EXAMPLE_PAGE).read_text()
    found = re.search(r"## Call the handler directly\n.*?```python\n(.*?)```\n", page, re.DOTALL)
    assert found, f"the first example of {EXAMPLE_PAGE} is gone"
    return found.group(1)


_names = set(globals())
exec(compile(docs_example(), f"{EXAMPLE_PAGE} (call the handler directly)", "exec"), globals())
assert any(name.startswith("test_") for name in set(globals()) - _names), "no test in it"
