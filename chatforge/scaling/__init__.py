"""Scaling laws: sweep model size x tokens (sweep.py), fit L(N, D) (fit.py), draw it (plots.py), and
plan a compute budget with a fit (plan.py). `chatforge scaling sweep|fit|plan`."""
