"""The operator's tools: views of and checks on a data directory, a database and a source.

It owns `status`, `verify` and `load` (`report`), the demo, the benchmark and the compose
check. It may import everything below it (run, source, sink, the shared contracts) and the
simulator; only the command line sits above it (the compose check reads the CLI it checks
commands against, the one import upwards, allowed by name in setup.cfg).
"""
