"""The training step of a one-rank run without TorchRec's pipeline (`training.step`).

With one rank there is nothing to distribute. TorchRec's input distribution (splits, the
KJT all-to-all, awaitables) and TrainPipelineSparseDist's streams, events and
record_stream calls are then host work on every step and do nothing else. On an H200
(docs/performance.md) the pipelined trainer took 5.0 ms per step at batch 8192 for 1.8 ms of
GPU work; direct took 3.2 ms, and the graph 1.84 ms, as long as its GPU work.

- `direct`: the step calls the sharded collection's own FBGEMM kernel
  (SplitTableBatchedEmbeddingBagsCodegen: the same weights, and the same fused SGD/Adagrad
  update in its backward) on the batch's ids and offsets. The model's dense modules run
  around it (`DLRM.dense_arch`, `DLRM.top`), then the loss, backward and the optimizers'
  step, in the pipeline's order. The arithmetic is the pipeline's (`tests/integration/test_one_rank_step.py`
  compares every step's loss and the final metrics).
- `cuda_graph`: as direct for the first steps (warm-up, on the capture stream). Then the
  whole step (lookup, MLPs, loss, backward with the table update, dense step) is captured
  once into a CUDA graph. Each later step copies its batch into the graph's input buffers
  and replays it, which is a few host calls instead of hundreds.
  - Replay needs the captured shapes. Every batch has the full per-rank size (tails are
    padded), so within a run only the number of ids can change: never with one-hot data
    or fixed multi-hot bags. A batch with another count runs direct.
  - It also needs the captured learning rates. FBGEMM takes the table rate from a host
    tensor and torch's SGD and Adagrad take a float, all at launch, so a replay keeps the
    rates of its capture. Steps whose rates change from step to step (warm-up, decay)
    therefore run direct.
  - The optimizers' state on the device (Adagrad's sums, FBGEMM's iteration counter)
    advances with each replay; host counters do not (torch Adagrad's step, used only for
    an lr_decay the project leaves at 0). Adam is refused: its bias correction reads the
    step count at launch.
  - So the capture waits until two steps in a row have the same rates and input shapes,
    and is redone when those settle at new values: the constant phase and the end after
    the decay replay, and so does a caller that changes the batch size for good (the
    benchmark, which times several sizes on one trainer).
  - If the capture fails (an operation that waits for the GPU, in some release), the
    run goes on direct after one warning line.

Both kinds take the next batch from the loader while the GPU runs the current step and copy
it to the device on a side stream (`BatchCopies`), as TorchRec's pipeline does: the copy
and the loader's host work overlap the step instead of preceding it. Both evaluate the same
way (the model in eval mode): the forward pass on the kernel, batch after batch, never
graphed.
"""

import logging
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from dlrm_torchrec.config import Config, ConfigError
from dlrm_torchrec.config.embedding_layout import is_compressed

log = logging.getLogger(__name__)

GRAPH_WARMUP_STEPS = 3  # direct steps before the capture: lazy initialisation stays out of it
# optimizers (dense and fused sparse) whose update a replay can repeat: nothing in it depends
# on the step count, which a graph would freeze at its capture (FBGEMM's Adam takes it as a
# host integer; torch's Adagrad counts on the host, for an lr_decay the project leaves at 0)
GRAPH_OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad")


def resolve_step_kind(cfg: Config, world_size: int, device_type: str) -> str:
    """The step kind this run uses: training.step, checked (check_one_rank_step), or for
    `auto` the first of cuda_graph (CUDA only), direct and pipeline whose conditions the run
    meets. On the H200 (README) the one-rank kinds beat the pipeline at every batch size,
    the graph by 1.5-4x; on one CPU process direct is a little faster. A compiled dense part
    (training.compile) runs direct: its graphs are torch.compile's to make. Whether the
    sharding plan gives one fused kernel is known only after sharding: the trainer falls
    back to the pipeline then (StepUnsupported)."""
    kind = cfg.training.step
    if kind != "auto":
        check_one_rank_step(cfg, world_size, device_type, kind)
        return kind
    graph = device_type == "cuda" and cfg.training.compile == "none"
    for candidate in (("cuda_graph", "direct") if graph else ("direct",)):
        try:
            check_one_rank_step(cfg, world_size, device_type, candidate)
        except ConfigError:
            continue
        return candidate
    return "pipeline"


def check_one_rank_step(cfg: Config, world_size: int, device_type: str,
                        kind: Optional[str] = None) -> None:
    """What the step kind (default training.step) needs, as a ConfigError naming the key;
    auto and pipeline need nothing."""
    kind = kind or cfg.training.step
    if kind in ("auto", "pipeline"):
        return
    key = f"training.step={kind}"
    if world_size != 1:
        raise ConfigError(f"{key} runs one rank (nothing to distribute); this run has "
                          f"{world_size}: use training.step=pipeline")
    if is_compressed(cfg.embeddings):
        raise ConfigError(f"{key} takes plain tables; QR/MD embeddings "
                          "(embeddings.qr_threshold, embeddings.md_alpha) need "
                          "training.step=pipeline")
    kernels = {"sharding.compute_kernel": [cfg.sharding.compute_kernel]}
    kernels.update({f"sharding.tables.{name}.compute_kernels": t.compute_kernels
                    for name, t in cfg.sharding.tables.items() if t.compute_kernels})
    # fused only: UVM caching would need the prefetch TorchRec's pipeline does
    bad = [f"{k}={v}" for k, v in kernels.items() if any(x != "fused" for x in v)]
    if bad:
        raise ConfigError(f"{key} calls the fused FBGEMM kernel with tables in GPU memory; "
                          f"{', '.join(bad)} needs training.step=pipeline")
    if cfg.sharding.sharding_type == "data_parallel" or any(
            "data_parallel" in t.sharding_types for t in cfg.sharding.tables.values()):
        raise ConfigError(f"{key} calls the sharded tables' kernel; data_parallel tables "
                          "(sharding.sharding_type, sharding.tables.*.sharding_types) need "
                          "training.step=pipeline")
    if kind == "cuda_graph":
        if device_type != "cuda":
            raise ConfigError(f"{key} needs a CUDA device (sharding.device={device_type}); "
                              "training.step=direct runs the same step without the graph")
        bad = [f"optimizer.{k}={v}" for k, v in (("dense", cfg.optimizer.dense),
                                                 ("sparse", cfg.optimizer.sparse))
               if v not in GRAPH_OPTIMIZERS]
        if bad:
            raise ConfigError(f"{key} captures optimizers whose update takes no step count "
                              f"from the host ({', '.join(GRAPH_OPTIMIZERS)}; Adam's bias "
                              f"correction does); {', '.join(bad)}: use training.step=direct")
        if cfg.training.compile in ("reduce-overhead", "max-autotune"):
            raise ConfigError(f"{key} and training.compile={cfg.training.compile} both make "
                              "CUDA graphs: use training.compile=default (or none)")


class StepUnsupported(ConfigError):
    """The sharding plan does not give the one-rank step one fused kernel to call."""


def single_fused_kernel(sharded_ebc: nn.Module, feature_names: List[str]):
    """(FBGEMM kernel, index dtype, offset dtype) of a one-rank sharded collection whose tables
    all sit in one fused kernel, in feature order, with whole columns. Otherwise
    StepUnsupported, which says what the plan did instead."""
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    lookups = list(getattr(sharded_ebc, "_lookups", []))
    kernels = [m for lookup in lookups for m in getattr(lookup, "_emb_modules", [])]
    if len(kernels) != 1:
        raise StepUnsupported(
            f"training.step needs every table in one fused kernel group; the plan made "
            f"{len(kernels)} (tables on several kernels or memory kinds, e.g. UVM caching): "
            "use training.step=pipeline")
    kernel = kernels[0]
    tbe = getattr(kernel, "emb_module", None)
    if not isinstance(tbe, SplitTableBatchedEmbeddingBagsCodegen):
        raise StepUnsupported(f"training.step needs FBGEMM's fused training kernel; the plan "
                              f"chose {type(tbe).__name__}: use training.step=pipeline")
    tables = kernel.config.embedding_tables
    order = [f for t in tables for f in t.feature_names]
    if order != list(feature_names):
        raise StepUnsupported(f"training.step: the fused kernel holds features {order}, "
                              f"not the model's {list(feature_names)}: use training.step=pipeline")
    split = [t.name for t in tables if t.local_cols != t.embedding_dim]
    if split:
        raise StepUnsupported(f"training.step: tables {split} are split by columns: use "
                              "training.step=pipeline")
    return (tbe, getattr(kernel, "_embedding_table_index_type", torch.int64),
            getattr(kernel, "_embedding_table_offset_type", torch.int64))


class OneRankStep:
    """`progress(batches)` as TrainPipelineSparseDist's: takes the next batch (StopIteration
    when there is none), trains on it (evaluates it, when the model is in eval mode),
    returns (loss, logits, labels, weights), detached.

    dmp: the one-rank DistributedModelParallel of a DLRMTrain. optimizer: the trainer's
    CombinedOptimizer (fused tables + dense), used as the pipeline uses it: its zero_grad
    also hands the tables their scheduled rate (TorchRec's fused optimizer sets the FBGEMM
    kernel's rate there), so step k's table update uses lr(k), as the dense one does.
    capture: the cuda_graph kind."""

    def __init__(self, dmp: nn.Module, optimizer, dense_optimizer, feature_names: List[str],
                 device: torch.device, capture: bool = False):
        self.train_module = dmp.module  # DLRMTrain
        self.model = self.train_module.model
        self.optimizer = optimizer
        self.dense_optimizer = dense_optimizer
        self.device = device
        self.tbe, self.index_dtype, self.offset_dtype = single_fused_kernel(
            self.model.sparse_arch, feature_names)
        self.graphs = CudaGraphs(device) if capture else None  # None: the direct kind
        self.graph = None  # the captured step (CUDAGraph): replay() runs it
        self.capture_failed = False
        self.capture_error = ""  # why it failed: the error's first line
        self.direct_steps = 0
        self.replays = 0
        self.copies = BatchCopies(device)
        # the next batch, taken and on its way to the device during the step before, with
        # the iterator it came from (None: that iterator is exhausted)
        self._prefetched: Optional[Tuple[Iterator, object]] = None
        self._inputs: Dict[str, torch.Tensor] = {}  # the graph's input buffers
        self._outputs: Tuple[torch.Tensor, ...] = ()  # the buffers a replay writes
        self._captured_key: Tuple = ()  # _key() of the captured step
        self._previous_key: Tuple = ()  # _key() of the step before this one

    # ---------------------------------------------------------------- the step itself
    @staticmethod
    def _step_inputs(batch) -> Dict[str, torch.Tensor]:
        """The step's inputs as the loader made them (on the device): dense B x D, the KJT's
        ids N and bag lengths F*B, labels and weights B. Offsets and the kernel's index
        dtype are made in the step, so that the graph's buffers hold only what the loader
        made (one copy each per replay)."""
        kjt = batch.sparse_features
        return {"dense": batch.dense_features, "indices": kjt.values(),
                "lengths": kjt.lengths(), "labels": batch.labels, "weights": batch.weights}

    def _loss(self, dense: torch.Tensor, indices: torch.Tensor, lengths: torch.Tensor,
              labels: torch.Tensor, weights: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """dense B x D, indices N, lengths F*B (feature-major, as the KJT's), labels and
        weights B -> (loss, logits B)."""
        x = self.model.dense_arch(dense)
        offsets = torch.ops.fbgemm.asynchronous_complete_cumsum(lengths).to(self.offset_dtype)
        pooled = self.tbe(indices=indices.to(self.index_dtype),
                          offsets=offsets)  # B x F*d, the features in order
        logits = self.model.top(x, pooled)
        return self.train_module.loss_fn(logits, labels, weights), logits

    def _direct(self, batch) -> Tuple[torch.Tensor, ...]:
        """batch: on the device."""
        self.optimizer.zero_grad()  # also sets the tables' rate for this step's update
        loss, logits = self._loss(**self._step_inputs(batch))
        loss.backward()  # the table update, fused into the kernel's backward
        self.optimizer.step()
        self.direct_steps += 1
        return loss.detach(), logits.detach(), batch.labels, batch.weights

    def progress(self, batches: Iterator) -> Tuple[torch.Tensor, ...]:
        batch = self._take(batches)
        # in eval mode (the trainer's evaluations, under no_grad): the forward pass alone,
        # never graphed (evaluation batches may have other shapes)
        out = self._train(batch) if self.train_module.training else self._evaluate(batch)
        self._prefetch(batches)  # the loader and the copy run while the GPU works on this step
        return out

    def _prefetch(self, batches: Iterator) -> None:
        """Take the next batch of `batches` and start its copy to the device."""
        try:
            self._prefetched = (batches, self.copies.start(next(batches)))
        except StopIteration:
            self._prefetched = (batches, None)

    def _take(self, batches: Iterator):
        """This step's batch, on the device: the one taken from `batches` during the step
        before, or, at an iterator's first step, its next one. StopIteration when
        `batches` has no more. A batch taken from another iterator is dropped: its caller
        stopped early (a stop request ends the run; the checkpoint's data position holds
        that batch for the resumed run)."""
        if self._prefetched is None or self._prefetched[0] is not batches:
            self._prefetch(batches)
        (_, started), self._prefetched = self._prefetched, None
        if started is None:
            raise StopIteration
        return self.copies.ready(started)

    def _evaluate(self, batch) -> Tuple[torch.Tensor, ...]:
        """The forward pass on `batch` (on the device) -> (loss, logits, labels, weights)."""
        loss, logits = self._loss(**self._step_inputs(batch))
        return loss.detach(), logits.detach(), batch.labels, batch.weights

    def _train(self, batch) -> Tuple[torch.Tensor, ...]:
        """One step on `batch` (on the device) -> (loss, logits, labels, weights)."""
        if self.graphs is None or self.capture_failed:
            return self._direct(batch)
        inputs = self._step_inputs(batch)
        key = self._key(inputs)
        settled, self._previous_key = key == self._previous_key, key
        if self.graph is not None and settled and key != self._captured_key:
            self._release()  # rates or shapes settled at new values: capture again
        if self.graph is None and settled and self.direct_steps >= GRAPH_WARMUP_STEPS:
            self._try_capture(batch, key)
        if self.graph is not None and key == self._captured_key:
            for name, src in inputs.items():
                self._inputs[name].copy_(src)  # on the device already
            self.graph.replay()
            self.replays += 1
            return self._outputs
        # warm-up, rates or shapes the graph was not captured with: direct, on the capture
        # stream while there is no graph (its lazy initialisation belongs there)
        if self.graph is None:
            return self.graphs.on_side_stream(lambda: self._direct(batch))
        return self._direct(batch)

    # ---------------------------------------------------------------- the CUDA graph
    def _key(self, inputs: Dict[str, torch.Tensor]) -> Tuple:
        """What a replay keeps from its capture: this step's scheduled rates (tables' and
        dense: what zero_grad would hand the kernel) and the shapes and dtypes of its
        inputs (_step_inputs)."""
        return (tuple(g["lr"] for g in self.optimizer.param_groups),
                tuple((t.shape, t.dtype) for t in inputs.values()))

    def _release(self) -> None:
        """Drop the graph and its buffers (its memory pool goes with the last of them; the
        gradients it allocated go at the next zero_grad)."""
        self.graph, self._inputs, self._outputs, self._captured_key = None, {}, (), ()

    def _try_capture(self, batch, key: Tuple) -> None:
        """key: _key of the batch's inputs."""
        on_device = self._step_inputs(batch)
        # own buffers: a batch already on the device (the benchmark's) must not be aliased
        self._inputs = {name: t.clone() for name, t in on_device.items()}
        self.graphs.synchronize()
        # no gradients: the captured backward allocates them in the graph's pool and each
        # replay writes them afresh (zeroed ones would be accumulated into, replay on
        # replay); zero_grad also sets the tables' rate the capture records
        self.optimizer.zero_grad(set_to_none=True)
        try:
            graph, outputs = self.graphs.capture(self._graph_step)
        except RuntimeError as e:
            self.capture_failed = True
            self.capture_error = (str(e).splitlines() or [type(e).__name__])[0][:300]
            self._release()
            self.optimizer.zero_grad(set_to_none=True)
            self.graphs.synchronize()
            log.warning("training.step=cuda_graph: the step could not be captured (%s); "
                        "training goes on with direct steps", self.capture_error)
            return
        self.graph, self._outputs, self._captured_key = graph, outputs, key

    def _graph_step(self) -> Tuple[torch.Tensor, ...]:
        """The captured step, on the input buffers: lookup, MLPs, loss, backward (with the
        tables' fused update) and the dense optimizer's step -> (loss, logits, labels,
        weights), the buffers a replay writes."""
        loss, logits = self._loss(**self._inputs)
        loss.backward()
        self.dense_optimizer.step()
        return loss.detach(), logits.detach(), self._inputs["labels"], self._inputs["weights"]


class CudaGraphs:
    """Every CUDA call of the cuda_graph step: a side stream for the capture and the direct
    steps before it, the capture itself, and the synchronisation around it. (The tests put
    a CPU stand-in with a graph's semantics here to run the step's logic without a GPU.)"""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def on_side_stream(self, step: Callable[[], Tuple[torch.Tensor, ...]]):
        """step() on the capture stream, ordered after and before the current stream's
        work: the warm-up's lazy initialisation (workspaces, autograd's streams) happens
        where the capture will run."""
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            out = step()
        current.wait_stream(self.stream)
        for t in out:
            t.record_stream(current)
        return out

    def capture(self, step: Callable[[], Tuple[torch.Tensor, ...]]):
        """step() recorded, not run, into a CUDA graph -> (graph, what step returned: the
        tensors each graph.replay() writes). RuntimeError when it cannot be captured."""
        graph = torch.cuda.CUDAGraph()
        # thread_local: the loader's pin-memory thread may pin the next batches meanwhile
        # (with "global", any such call in another thread would break the capture)
        with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
            outputs = step()
        return graph, outputs


class BatchCopies:
    """Host-to-device copies of batches on a side stream (CUDA), so that the next batch's
    copy overlaps the current step: `start(batch)` when the batch is taken, `ready(...)`
    when its step begins. A batch already on the device (the benchmark's) and every batch
    of a CPU run are used as they are."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def start(self, batch):
        """-> (batch on the device, whether it was copied on the side stream)."""
        if self.stream is None or batch.dense_features.is_cuda:
            return batch, False  # already where the step runs: CPU runs, device batches
        # the loader pins CUDA runs' batches: the copy is asynchronous
        with torch.cuda.stream(self.stream):
            return batch.to(self.device, non_blocking=True), True

    def ready(self, started):
        """The batch of start(), usable on the current stream: that stream waits for the
        copy, and the batch's memory stays allocated until that stream is done with it
        (it was allocated on the side stream)."""
        batch, copied = started
        if copied:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.stream)
            batch.record_stream(current)
        return batch
