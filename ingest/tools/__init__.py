"""Developer tools run by `make lint`; not part of the ingestion path."""
