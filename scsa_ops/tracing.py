"""Which tracer, if any, is recording the current call, asked the same way on every supported torch."""
import torch


def exporting():
    """Whether torch.export is tracing this call. torch.compiler.is_exporting() returns the flag read
    here, but dynamo folds that call to True inside every torch.compile on some releases (2.11), which
    made a compiled training step record the inference op; dynamo reads the flag itself as the value
    it holds. torch 2.6 has neither: an export there is marked only by its usage-log flags."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    if flag is not None:
        return flag
    trace = getattr(torch.export, "_trace", None)
    return trace is not None and trace._EXPORT_FLAGS is not None


def capturing():
    """Whether a graph is being recorded (torch.compile, torch.export, TorchScript tracing): the
    registered ops must then be called, not their Python launchers."""
    return torch.compiler.is_compiling() or exporting() or torch.jit.is_tracing()
