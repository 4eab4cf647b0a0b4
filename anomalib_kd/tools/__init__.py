"""Command-line tools of anomalib-kd (e.g. ``python -m anomalib_kd.tools.distill_pdn``)."""
