"""The sink: segment files into PostgreSQL, exactly once.

It owns the segment folders and their state machine (`segments`: seal, claim, retire,
reject, one rename each), loading one segment in one transaction with its ledger row and
bisecting lines COPY refuses (`loader`), the loop a loader process runs, riding out
database outages (`pool`), and the database itself: connections, the embedded server, the
schema, the error outcome table (`db`). It may import the shared contracts at the top of
the package, never the source, the run or the operator's tools.
"""
