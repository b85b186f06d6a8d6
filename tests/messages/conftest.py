from __future__ import annotations

import pytest

from workers.messages.render import LayoutRenderer


@pytest.fixture(scope="session")
def renderer() -> LayoutRenderer:
    return LayoutRenderer()
