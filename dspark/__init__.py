"""dspark: distil, select and serve draft models for speculative decoding."""

__version__ = "0.1.0"


def _pin_deepspeed_accelerator() -> None:
    """With deepspeed installed (the `train` extra), every `save_pretrained` imports it (through
    accelerate), and on a machine without a GPU its accelerator auto-detection logs a warning to
    STDOUT, which corrupts `--json` output. Without a GPU driver, name the accelerator that detection
    falls back to anyway (a DS_ACCELERATOR the user set wins)."""
    import os
    import sys

    if "DS_ACCELERATOR" in os.environ or not sys.platform.startswith("linux"):
        return
    if any(os.path.exists(p) for p in ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/kfd")):
        return
    os.environ["DS_ACCELERATOR"] = "cpu"


_pin_deepspeed_accelerator()
