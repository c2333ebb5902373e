"""Micro-benchmark workloads as plain functions; bench/*.py wrap them in pyperf Runners."""
