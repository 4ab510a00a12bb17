"""The jobs users run from a checkout: `python -m experiments.<job>` (installed, also `lcjax-<job>`)."""
