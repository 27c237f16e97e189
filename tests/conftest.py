"""Fixtures shared by every test module."""
import pytest

from tests.etcd_server import etcd_server  # noqa: F401  (a real etcd, module scope)
from tests.helpers import TcpBackend


@pytest.fixture
def backends():
    """Two TCP backends answering their names, "a" and "b" (modules may define their own)."""
    made = [TcpBackend("a"), TcpBackend("b")]
    yield made
    for backend in made:
        backend.close()
