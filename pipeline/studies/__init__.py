"""Instruments that train or measure many runs: the sweep (method x lambda x seed) and the approximation study.

    python -m pipeline sweep --config configs/sweep_demo.yaml
    python -m pipeline approx-study --config configs/sweep_demo.yaml
"""
