"""Unit tests: a module or function held to an independent computation (hand-computed
values, a plain definition), called directly in the pytest process. They run no command
(neither as a process nor through its main()), start no ranks and run no training; the
only other processes are workers the code under test starts itself (the loader's)."""
