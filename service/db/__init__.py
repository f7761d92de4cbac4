"""Persistence of the service: the edit log, codebook entries and the replication event log.

`models` declares the tables, `repository` holds the queries (functions that take a session and
never commit), `session` builds engines and runs migrations. Nothing here imports torch at import
time, and nothing here knows about HTTP or the model.
"""
