"""Stage 1 and 2: per-filter statistics from training images, and the scores ranking them.

``activations``/``stats``/``documents`` collect the CDP statistics, ``scoring`` turns them
into TF-IDF scores, and ``criteria`` is the registry of every ranking criterion (CDP and
the data-free or gradient baselines).
"""
