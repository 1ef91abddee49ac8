"""The typed records of a run's files and what reads and writes them.

`record` (the base: a record's `to_dict()` is its JSON), `metrics` (metrics.jsonl's
lines), `summary` (summary.json), `report_options` (a sweep's report section),
`checkpoint_files` (where a checkpoint lives), `run_folder` (the folder's files, written
and read). None imports torch: the report and the CLI read runs without it.
"""
