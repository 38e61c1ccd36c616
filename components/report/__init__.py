"""Inspection reports: static HTML pages people look at (``inspection``), built from plain
data (``page``) by ``html``, with matplotlib figures (``figures``).

Numpy, Pillow and matplotlib; may import the detector's overlay pictures and config/errors;
never the registry, pipeline or cli.
"""
