"""Reports: markdown tables from analysis results."""
