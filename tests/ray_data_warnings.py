"""A mark for test modules that run Ray Data: it copies its DataContext attribute by attribute,
which trips its own deprecation notices for legacy fields; nothing here sets them."""

from __future__ import annotations

import pytest

IGNORE_LEGACY_FIELDS = pytest.mark.filterwarnings(
    "ignore:`use_push_based_shuffle` is deprecated:DeprecationWarning",
    "ignore:`use_polars` is deprecated:DeprecationWarning",
    "ignore:`use_arrow_tensor_v2` is deprecated:DeprecationWarning",
)
