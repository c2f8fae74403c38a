"""One check shared by the tests that a model part compiles to one graph in inference."""
import torch


def compiled_in_inference(fn, *args):
    """``(eager, compiled, compiled again, frames)``: ``fn(*args)`` under inference mode,
    eagerly and twice through ``torch.compile(fullgraph=True)`` (a graph break raises),
    with the number of frames dynamo compiled (1: one graph, no recompilation on the second
    call). Dynamo is reset first: its recompilation limit counts per code object, across
    the tests of one process."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    with torch.inference_mode():
        return fn(*args), compiled(*args), compiled(*args), counter.frame_count
