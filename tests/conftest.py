"""Fixtures shared by every test module."""
from tests.etcd_server import etcd_server  # noqa: F401  (a real etcd, module scope)
