"""Training: the job (`job`), the trainer and its loop (`trainer`), the step kinds
(`one_rank_step`), checkpoints and their save policy (`checkpoint`), preemption, metrics,
observability and optimizers.

`python -m dlrm_torchrec.train` runs the training command (`cli.train`)."""
