"""Orchestration: the spec, the run as a DAG on Ray, its stages, the search, reports and the CLI."""
