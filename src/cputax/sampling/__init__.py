"""Sampling the server's processes with py-spy, and the rules that say where each sample's time went.

`servers` holds what cputax knows about each server type (process titles, thread roles,
frame -> category rules) as data; `rules` applies such a table to a stack; `pyspy` runs
one py-spy per process; `stacks` reads and writes py-spy's formats; `monitor` is what
`cputax run --pyspy` and `cputax profile` drive.
"""
