"""ulskip: Unified Layer Skipping inference and fine-tuning for Hugging Face decoder LLMs."""
from ulskip.schedule import layer_speedup, uls_schedule

__version__ = "0.1.0"


def __getattr__(name):
    # The engine pulls in torch and the model code; import it only when asked for.
    if name in ("Engine", "GenerationOutput"):
        from ulskip.runtime import engine
        return getattr(engine, name)
    if name == "SpeculativeConfig":
        from ulskip.runtime.speculative import SpeculativeConfig
        return SpeculativeConfig
    raise AttributeError(f"module 'ulskip' has no attribute {name!r}")


__all__ = ["uls_schedule", "layer_speedup", "Engine", "GenerationOutput", "SpeculativeConfig"]
