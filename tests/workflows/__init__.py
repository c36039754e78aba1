"""Workflow scripts that the CLI tests run as real runner subprocesses."""
