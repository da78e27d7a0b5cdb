"""datasync-ingest: copy every event of a DataSync API into PostgreSQL, exactly once.

The folders are the data path, read top to bottom (`make lint` keeps imports one way down):

- `cli` the command line; `ops/` the operator's reports and tools (status, verify, load,
  demo, bench, the compose check);
- `run/` the processes of a run: the supervisor, child start-up, progress, metrics;
- `source/` API -> pages -> segment lines, and `sink/` segment files -> PostgreSQL: the two
  halves never import each other; a run hands the sink's segment writer to the source;
- the contracts every room shares: `config` (the one typed config), `logs`, `tsv` (the
  byte format between source and sink), `durable` (fsync and atomic replace), `locks`,
  `counters` (the run's one vocabulary of counters), `waits` (the one wait and backoff);
- `simulator/` a stand-in for the API that imports nothing else of ours.
"""

__version__ = "0.1.0"
