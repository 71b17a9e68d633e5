"""pytest plugin (the ``pytest11`` entry point): the ``deferred`` fixture.

Loaded whenever the package is installed, so this module imports nothing from Django: the
fixture imports :mod:`deferred_signals.testing` when a test asks for it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from .testing import DeferredCapture


@pytest.fixture
def deferred() -> Iterator[DeferredCapture]:
    """Deferred calls captured instead of published (see ``capture_deferred()``).

    With pytest-django's ``db`` a call counts when made outside your atomic blocks, or when
    your outermost ``atomic()`` exits without rolling back; with ``transactional_db``, at
    commit. ``deferred.calls``, ``deferred.assert_deferred(handler, **kwargs)``,
    ``deferred.assert_not_deferred(handler)``, ``deferred.run()``.
    """
    from .testing import capture_deferred

    with capture_deferred() as capture:
        yield capture
