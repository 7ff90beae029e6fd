"""nonstop: keeps network services on the air when a process, a link or a node dies."""

__version__ = "0.1.0"
