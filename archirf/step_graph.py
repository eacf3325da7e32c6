"""cuda_graph: a training step's forward and backward (the objective's draws, the network, the loss and its
gradients) captured once as one CUDA graph and replayed every step after.

A small model's step is bound by kernel launches, not by its arithmetic: a few hundred tiny kernels, each costing
more host time to launch than GPU time to run. Replaying them as one graph removes the launches without
compiling anything (`compile` may still be on: then the graph holds inductor's kernels). The rest of the step (the
gradient clip, the optimizer and the EMAs, a handful of fused kernels) stays outside the graph, as it is.

How replay stays exact:
- The inputs are copied into the graph's own tensors before each replay; the step's outputs (its loss) come back
  in the graph's own tensors (the caller reads or copies them before the next replay).
- The gradients are the graph's tensors: the capture ran backward with every `.grad` unset, so each replay writes
  the step's gradients into them afresh (no accumulation). The optimizer reads them where they are, and the task
  never unsets them (`zero_grad` would detach them from the graph).
- Random draws (noise, times, label dropout) use the default CUDA generator, whose seed and offset each replay
  reads at launch: the loop's per-step reseed gives the same draws as the eager step.
- The capture happens at the first step, after a resume has loaded the weights in place: the graph reads the
  parameters' memory, which the optimizer updates in place.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch


class StepGraph:
    """`step_fn(*inputs)`, which runs a forward and its backward and returns tensors (one, or a tuple or dict of
    them), as one CUDA graph captured at the first call. `params`: every parameter whose `.grad` the step writes;
    `buffers`: state the step updates (BatchNorm's running statistics), put back after the warm-up passes."""

    def __init__(self, step_fn: Callable, params: list[torch.nn.Parameter], buffers: list[torch.Tensor] = (),
                 warmup: int = 2):
        if warmup < 1:      # lazily made device tensors (DDPM's schedule) must exist before the capture
            raise ValueError(f"warmup={warmup}: a capture needs at least one eager pass before it")
        self.step_fn, self.params, self.buffers, self.warmup = step_fn, params, list(buffers), warmup
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.inputs: tuple[torch.Tensor, ...] = ()
        self.outputs = None

    def __call__(self, *inputs: torch.Tensor):
        """This step's outputs (the graph's own tensors: read or copy them before the next call); the gradients
        are in the parameters' `.grad`."""
        if self.graph is None:
            self._capture(inputs)
        elif [t.shape for t in inputs] != [t.shape for t in self.inputs]:
            raise ValueError(f"cuda_graph replays the step captured for a batch of {tuple(self.inputs[0].shape)},"
                             f" and this batch is {tuple(inputs[0].shape)}: the loader must give equal batches "
                             f"(set cuda_graph=off)")
        for static, new in zip(self.inputs, inputs):
            static.copy_(new, non_blocking=True)
        self.graph.replay()
        return self.outputs

    def _capture(self, inputs: tuple[torch.Tensor, ...]) -> None:
        rng = torch.cuda.get_rng_state()    # the warm-up's and the capture's draws leave the step's own untouched
        kept = [b.clone() for b in self.buffers]
        self.inputs = tuple(t.detach().clone() for t in inputs)
        # warm-up on a side stream (CUDA's rule before a capture): cuBLAS workspaces, Triton's autotuning,
        # inductor's compilation happen here, not in the graph
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self._unset_grads()
                self.step_fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self._unset_grads()         # backward in the capture assigns each .grad: its tensors become the graph's
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA calls of other threads (a loader's pinned-memory thread, DALI's) may go on meanwhile
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            outputs = self.step_fn(*self.inputs)
        self.outputs = torch.utils._pytree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t,
                                                    outputs)
        self.graph = graph
        torch.cuda.set_rng_state(rng)
        for b, k in zip(self.buffers, kept):    # (a capture records kernels without running them)
            b.copy_(k)

    def _unset_grads(self) -> None:
        for p in self.params:
            p.grad = None
