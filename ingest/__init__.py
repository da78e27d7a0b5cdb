"""datasync-ingest: copy every event of a DataSync API into PostgreSQL, exactly once."""

__version__ = "0.1.0"
