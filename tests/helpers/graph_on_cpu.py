"""A CPU stand-in for the CUDA graph of training.step=cuda_graph, so its logic (when it captures,
recaptures and replays, what goes into the graph's buffers and comes out) runs where there is
no GPU: in the trainer (tests/integration/test_one_rank_step.py) and in the GPU benchmark's
smoke run (tests/integration/test_bench.py), which runs a script under it with

    python -m tests.helpers.graph_on_cpu [--capture-fails] SCRIPT ARGS...

(--capture-fails: every capture fails, as CaptureFails's.)
"""

import runpy
import sys
from types import SimpleNamespace

import torch


class GraphOnCpu:
    """one_rank_step.CudaGraphs on the CPU, with a CUDA graph's semantics as the step relies
    on them. A capture records the step without running it: the stand-in runs it for its
    output tensors, then puts back every weight and optimizer state it changed. A replay runs
    the recorded step again: on the same input and output buffers, with the rates the capture
    saw (a graph keeps the launch arguments it recorded), into fresh gradients (the captured
    backward allocates them in the graph's pool). The CPU has one stream."""

    def __init__(self, device):
        pass

    def synchronize(self):
        pass

    def on_side_stream(self, step):
        return step()

    def capture(self, step):
        one_rank = step.__self__  # the OneRankStep whose _graph_step this is
        tbe, dense = one_rank.tbe, one_rank.dense_optimizer
        # the kernel's weights and optimizer state (Adagrad's sums, iteration counter)
        changed = [t for t in [*tbe.parameters(), *tbe.buffers()] if t.numel()]
        changed += list(dense.params.values())
        changed += [t for state in dense.state.values() for t in state.values()
                    if isinstance(t, torch.Tensor)]
        before = [t.detach().clone() for t in changed]
        captured_rates = _rates(one_rank)
        outputs = step()
        with torch.no_grad():
            for t, old in zip(changed, before):
                t.copy_(old)

        def replay():
            host_rates = _rates(one_rank)
            _set_rates(one_rank, captured_rates)
            dense.zero_grad(set_to_none=True)
            for out, got in zip(outputs, step()):
                out.copy_(got)  # detached tensors
            _set_rates(one_rank, host_rates)

        return SimpleNamespace(replay=replay), outputs


def _rates(one_rank):
    """(the table kernel's rate, the dense param groups' rates) of a OneRankStep."""
    return one_rank.tbe.get_learning_rate(), [g["lr"] for g in one_rank.dense_optimizer.param_groups]


def _set_rates(one_rank, rates):
    table_rate, dense_rates = rates
    one_rank.tbe.set_learning_rate(table_rate)
    for group, rate in zip(one_rank.dense_optimizer.param_groups, dense_rates):
        group["lr"] = rate


class CaptureFails(GraphOnCpu):
    """A capture that fails as CUDA's does when the step waits for the GPU (nothing of the
    step ran)."""

    def capture(self, step):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\n"
                           "(the stand-in's failed capture)")


def install_graph_on_cpu(stand_in=GraphOnCpu) -> None:
    """From now on in this process, the cuda_graph step uses `stand_in`, and its config
    check passes the device as CUDA (every other condition is checked as it is)."""
    from dlrm_torchrec.train import one_rank_step, trainer

    one_rank_step.CudaGraphs = stand_in
    resolve = one_rank_step.resolve_step_kind
    trainer.resolve_step_kind = lambda cfg, world, device: resolve(cfg, world, "cuda")


if __name__ == "__main__":
    fails = sys.argv[1] == "--capture-fails"
    install_graph_on_cpu(CaptureFails if fails else GraphOnCpu)
    script, sys.argv = sys.argv[1 + fails], sys.argv[1 + fails:]
    runpy.run_path(script, run_name="__main__")
