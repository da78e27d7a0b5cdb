"""The operator's tools: views of and checks on a data directory, a database and a source.

It owns `check` (can a run start?), `reset` (start a data directory over), `status`,
`verify` and `load` (`report`, with `crawl`: verify's parallel walk of the source's ids),
who may work in a data directory and which database a look may use (`datadir`), the demo,
the benchmark and the compose check. It may import everything below it (run, source, sink, the shared contracts) and the
simulator; only the command line sits above it (the compose check reads the CLI it checks
commands against, the one import upwards, allowed by name in setup.cfg).
"""
