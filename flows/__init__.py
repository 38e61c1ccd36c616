"""Prefect wiring only: the training and retraining flows and the console script that adds
``run`` and ``schedule`` to the components' commands. May import anything in
``components``; the only package that imports Prefect.
"""
