"""The run: the processes that move events from the source to the sink.

It owns the supervisor (plan, start, watch, restart, stop), the start-up every child
process shares (`children`), the bodies of the fetcher process (`fetching`: walker threads,
the one place where the source's walk is wired to the sink's segments) and of the loader
process (`loading`), exit codes (`exits`), progress lines and the Prometheus endpoint. It may import the source, the sink and the
shared contracts, never the operator's tools or the command line.
"""
