"""Typed results: each derived file of a run (summary.json, pyspy/attribution.json,
correlation.json, extrapolation.json, sweep.json, comparison) has one owner here, a msgspec
Struct with a `format_version`, built whole by analysis and read field by field by report.

`results.format` is the one way they are written and read.
"""
