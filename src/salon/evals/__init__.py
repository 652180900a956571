"""Evaluations run by ``salon eval``: each returns a report object and renders markdown."""
