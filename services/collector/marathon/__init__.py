"""Marathon discovery (docs/marathon.md): apps.py (app definitions), tasks.py (which tasks serve),
builder.py (services, incrementally), mirror.py (the apps and tasks known), events.py (one event
as a pure step), client.py (HTTP and the event stream), source.py (MarathonSource: the I/O)."""
from services.collector.marathon.source import MarathonSource

__all__ = ["MarathonSource"]
