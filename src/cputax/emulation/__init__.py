"""cputax's vLLM plugins: code that runs inside the server, loaded by vLLM, never imported by
the measuring side. Each plugin is inert unless cputax asks for it by an environment variable."""
