"""``mixtape demo``: a tiny GPT-2 trained on CPU from a scheduled, packed, resumable mixture of
embedded sources (:mod:`mixtape.demo.data`), with a report of speed, mixture and per-source loss.
"""
