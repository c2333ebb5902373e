"""What a run's records mean: decomposition, server metrics, CPU attribution, GPU-idle
correlation, agentic metrics, comparison, extrapolation. Reads run directories, writes
derived files through RunDir; never talks to a server and never renders."""

from cputax.analysis.analyse import analyse, failures, summarize_run

__all__ = ["analyse", "failures", "summarize_run"]
