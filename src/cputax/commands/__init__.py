"""One entry function per subcommand; `cli` parses the arguments and calls one of these.

Everything below this package is a plain library with no upward import.
"""
