"""Defences: tools a model provider runs before and after fine-tuning.

They read datasets, runs and models; nothing upstream imports them.
"""
