"""Host glue shared by every method's nodes, one concern a module.

``architectures``: where text enters each model family · ``weights``: read any weight as float,
patched clones, fingerprints · ``encoding``: tokenize, encode, align · ``run``: device, progress, Cancel.
"""
