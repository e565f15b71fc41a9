"""Holds `sitecustomize.py` for the children of a quiet run (pipeline/quiet.py); a package so that it ships."""
