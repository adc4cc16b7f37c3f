"""
CUDA graphs: a function of CUDA tensors replayed as one launch. train.py replays the views (fast/views.py) and the
teacher's forward this way on one GPU, where their few hundred small kernels would cost more to launch than to run.
"""
import sys

import torch


class CudaGraphs:
    """make(*tensors) replayed as a CUDA graph, one captured per shape of its CUDA inputs: its few hundred small
    kernels then cost one launch, not a few microseconds of Python each. make must not wait for the host (no .item(),
    no data-dependent shapes). A shape's first call runs make as it is, on a side stream (the warm-up capture asks
    for), its second captures the graph; the outputs of a replay are the graph's own buffers, overwritten by the next
    replay: a training step uses them before then. On the CPU, or where capture fails, make runs as it is."""

    def __init__(self, make):
        self.make, self.graphs = make, {}
        self.__name__ = make.__name__

    def __call__(self, *inputs):
        if not inputs[0].is_cuda or self.graphs is None:
            return self.make(*inputs)
        key = tuple((t.shape, t.stride(), t.dtype, t.device) for t in inputs)
        if key not in self.graphs:  # the first call: a warm-up, whose outputs are the call's
            self.graphs[key] = None
            return self.on_side_stream(inputs)
        if self.graphs[key] is None:
            try:
                self.graphs[key] = self.capture(inputs)
            except RuntimeError as error:
                print(f'warning: {self.__name__} runs without a CUDA graph: {error}', file=sys.stderr)
                self.graphs = None
                return self.make(*inputs)
        graph, static_inputs, outputs = self.graphs[key]
        for buffer, tensor in zip(static_inputs, inputs):
            buffer.copy_(tensor, non_blocking=True)
        graph.replay()
        return outputs

    def on_side_stream(self, inputs):
        side = torch.cuda.Stream(inputs[0].device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            outputs = self.make(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        return outputs

    def capture(self, inputs):
        static_inputs = [t.clone() for t in inputs]  # clone keeps the layout (channels_last stays channels_last)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = self.make(*static_inputs)
        return graph, static_inputs, outputs

