"""The pieces every run shares: the run's parts, loaders, resume, training, evaluation, pretraining, pictures."""
