"""Each command's body, one module per subcommand (`commands/<name>.py`) with one entry
function; `cli` parses the arguments and calls one of these.

The load commands (run, replay, sweep, whatif) drive the target through the driver they
share, `cputax.session`; sweep and whatif run `commands.run.run_profile` per configuration
or point. Everything below this package is a plain library with no upward import.
"""
