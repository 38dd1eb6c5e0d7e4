"""The application layer: the run's inputs, the stages composed into a run, the run
directory and its files, finding a run's model, reports, ``compare`` and the demo."""
