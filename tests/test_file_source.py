import json
import os
import threading

import pytest

from services.collector.file_source import FileSource, parse_services_file
from services.collector.source import SourceError
from services.common.model import ModelError

DOCUMENTED = {"services": [{"name": "web", "port": 1234, "protocol": "tcp", "mode": "tcp",
                            "servers": [{"host": "127.0.0.1", "port": 8080, "weight": 500}]}]}


def test_documented_form_accepted():
    (service,) = parse_services_file(json.dumps(DOCUMENTED))
    assert (service.key, service.name, service.source) == ("1234/tcp", "web", "file")
    assert service.servers[0].address == "127.0.0.1:8080" and service.servers[0].weight == 500


def test_optional_fields():
    (service,) = parse_services_file(json.dumps({"services": [{
        "name": "api", "port": 80, "mode": "http", "timeoutClient": 30, "timeout_server": 40,
        "healthCheck": {"protocol": "http", "path": "/health"},
        "servers": [{"ip": "10.0.0.1", "port": 81, "maxconn": 10, "hostname": "node-1"}]}]}))
    assert service.mode == "http" and service.timeout_client == 30 and service.timeout_server == 40
    assert service.health_check.path == "/health" and service.servers[0].maxconn == 10


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    ('{"services": {}}', "services"),
    ('{"services": [], "extra": 1}', "unknown top-level"),
    ('{"services": [{"name": "a", "port": 1, "colour": "red"}]}', "unknown field"),
    ('{"services": [{"name": "a", "port": 70000}]}', "port"),
    ('{"services": [{"name": "a b", "port": 1}]}', "name"),
    ('{"services": [{"name": "a\\nb", "port": 1}]}', "name"),
    ('{"services": [{"name": "a", "port": 1, "servers": [{"host": "example.com", "port": 1}]}]}', "IP address"),
    ('{"services": [{"name": "a", "port": 1}, {"name": "b", "port": 1}]}', "already used"),
])
def test_bad_files_rejected_whole(text, message):
    with pytest.raises(ModelError, match=message):
        parse_services_file(text)


def write(path, document):
    temporary = str(path) + ".tmp"
    with open(temporary, "w") as handle:
        handle.write(document if isinstance(document, str) else json.dumps(document))
    os.replace(temporary, path)


def test_source_reports_errors_and_notices_changes(tmp_path):
    path = tmp_path / "services.json"
    source = FileSource(str(path), poll_interval=0.01)
    with pytest.raises(SourceError, match="cannot read"):
        source.current()
    write(path, DOCUMENTED)
    assert [s.port for s in source.current().services] == [1234]
    stop = threading.Event()
    changed = threading.Event()
    waiter = threading.Thread(target=lambda: (source.wait_for_change(30, stop), changed.set()))
    waiter.start()
    assert not changed.wait(0.1)
    # in-place edit
    with open(path, "a") as handle:
        handle.write(" ")
    assert changed.wait(5)
    waiter.join()
    assert [s.port for s in source.current().services] == [1234]
    write(path, "{broken")
    with pytest.raises(SourceError, match="not valid JSON"):
        source.current()


def test_wait_honours_stop(tmp_path):
    source = FileSource(str(tmp_path / "none.json"), poll_interval=0.01)
    stop = threading.Event()
    stop.set()
    source.wait_for_change(60, stop)  # returns at once
