"""Defences, grouped by when they act: before training on the data (`audit`), after
training on the model (`scan`), and at inference (`gate`).

They read datasets, runs and models; nothing upstream imports them.
"""
