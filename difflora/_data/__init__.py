"""Shipped data: ``configs/`` and the toy world's ``assets/``.

In a checkout these are links to the top-level folders; a wheel carries the files themselves, so
``difflora demo`` and the shipped configs work from an installed package (:func:`difflora.demo.data_root`).
"""
