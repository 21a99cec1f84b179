"""Steps: one analysis run on a checkpoint and stored as its results-file group.

A step module (``flatscope/steps/<analysis>.py``) holds what both the command (``flatscope
<analysis>``) and the audit (:mod:`flatscope.audit`) need, with no click:

- ``compute(run, **params)``: check the options, build the objectives, run the analysis, store the
  group (``run.save``) and return what the command prints; ``params`` are the analysis' options of
  :mod:`flatscope.options`, converted (by click for the command, by :meth:`Option.convert` for the
  audit);
- ``check(params)``: the option checks that need no data (σ grids, ranges, bounds), run before any
  work by ``compute`` and at plan time by the audit;
- the audit's view of the stored group: ``group(step)``, ``expected(step, target)`` (the stored
  options that must match for a cache hit), ``normalize(stored)``, ``complete(g)`` and
  ``metric_keys(step)``.

``run`` is the shared-option context (:class:`flatscope.cli.common.Run`, or any object with its
attributes and methods: ``objective()``, ``split_source()``, ``save()``, ``warn()``, ``note()``,
``progress()``, ``seed``, ``split``, ``out_path``, ...).
"""
