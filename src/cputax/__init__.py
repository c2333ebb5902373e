"""cputax: where the time of an agentic LLM request goes, CPU side vs GPU side."""

__version__ = "0.1.0"
