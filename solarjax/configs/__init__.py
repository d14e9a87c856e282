"""Experiment presets shipped with the package: ``solarjax.config.load_config("NAME")`` runs
``NAME.py``'s ``get_config()``. Each calls :func:`solarjax.config.base_config` with a model shape
and sets what differs from the defaults (mesh, batch, optimizer, task sections)."""
