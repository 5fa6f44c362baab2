"""Integration tests: whole paths through the system, with rank processes, the trainer, or a
command run end to end (through its main(), as a subprocess, under torchx or Slurm). A file
whose tests are of both kinds is here whole."""
