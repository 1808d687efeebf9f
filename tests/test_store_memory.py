from __future__ import annotations

import pytest

from gridnode.store.memory import MemoryBackend
from tests.store_contract import StoreContract


class MemoryStoreTests(StoreContract):
    @pytest.fixture
    def backend(self) -> MemoryBackend:
        return MemoryBackend()
