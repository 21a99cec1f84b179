"""Analyses: plain functions that take an :class:`flatscope.objective.Objective` (or several) and
options, and return a result object with ``to_tree()`` (for HDF5), ``summary()`` (headline
numbers) and ``to_json()``. The CLI only parses, calls, stores and plots."""
