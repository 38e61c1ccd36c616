"""Data: reading sources, the leak-free split, ingestion into a versioned dataset,
validation with Great Expectations, versioning with DVC.

May import ``components.config``/``errors`` only (no detector, registry or cli).
``version`` is the only module in the project that imports DVC; ``validate`` the only one
that imports Great Expectations.
"""
