"""The source: the DataSync API, walked into segment lines.

It owns the HTTP client and its outcome -> action tables (`api`, `retries`), cursors,
pacing against the API's budgets, the lanes, the partition plan (`plan`, and `probe`, which
asks the API for what the plan needs), the checkpoint that says where each walk resumes,
the walk itself (`fetcher`), and normalisation of events into TSV lines (`normalise`).
It may import the shared contracts at the top of the package (config, logs, tsv, durable,
locks, counters, waits), never the sink, the run or the operator's tools: lines leave it
through the `fetcher.SegmentOutput` it is handed.
"""
