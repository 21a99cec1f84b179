"""Thin adapters of :class:`flatscope.monitor.CurvatureMonitor` to training frameworks (optional extras).

- :mod:`flatscope.integrations.hf_trainer`: a Hugging Face ``transformers`` ``TrainerCallback``;
- :mod:`flatscope.integrations.lightning`: a PyTorch Lightning ``Callback``.

Each imports its framework only when it is itself imported, and says which package to install when
the framework is missing.
"""
