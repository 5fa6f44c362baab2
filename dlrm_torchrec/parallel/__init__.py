"""Running on several ranks: process groups (`distributed`), the planner and
DistributedModelParallel (`sharding`), the cluster-planning report (`planning`) and numeric
formats (`precision`)."""
