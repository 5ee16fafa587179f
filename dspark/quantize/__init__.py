"""Quantized drafts: backends behind one interface (torchao, optimum-quanto, bitsandbytes,
gptqmodel), a loader that reads every format they write, and the acceptance guard.

Public API:
- quantize_draft(out, QuantizeOptions(method=...), draft=... | candidate=...) -> QuantizeResult
- load_draft(name_or_path, device, dtype) -> dspark.models.LoadedModel (quanto / GPTQ aware)
- choose_backend(method, device, backend=None), BACKENDS, METHODS, register_backend
- guard: position_acceptance, teacher_forced_acceptance, guard_verdict
Importing this package imports neither torch nor a quantization library.
"""

from dspark.quantize.backends import (BACKENDS, METHODS, PREFERENCES, QuantBackend, QuantRequest, checkpoint_backend,
                                      choose_backend, quantization_of, register_backend, unregister_backend)

__all__ = ["BACKENDS", "METHODS", "PREFERENCES", "QuantBackend", "QuantRequest", "checkpoint_backend",
           "choose_backend", "load_draft", "quantization_of", "quantize_draft", "register_backend",
           "unregister_backend", "QuantizeOptions"]


def __getattr__(name):
    # torch-importing pieces load on first use, so `import dspark.quantize` stays cheap
    if name == "load_draft":
        from dspark.quantize.loading import load_draft

        return load_draft
    if name in ("quantize_draft", "QuantizeOptions"):
        from dspark.quantize import run

        return getattr(run, name)
    raise AttributeError(name)
