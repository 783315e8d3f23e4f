"""AlignIT engine: K/V swaps and attention maps on diffusers Stable Diffusion pipelines.

No gradio here; `app.py` and the CLI (`python -m alignit_core`) are built on this API.
"""
__version__ = "0.1.0"

from .concepts import Concept, find_concepts, load_concept  # noqa: E402
from .errors import AlignITError, ConceptError, ModelError, PromptError, SettingsError  # noqa: E402
from .generate import Generation, Settings, generate_concept, generate_swap, scheduler_names  # noqa: E402
from .models import Model, load_model  # noqa: E402
from .prompts import Prompt, SwapPlan, Token, concept_plan, parse_swap, positions_plan, tokenize, word_swap_plan  # noqa: E402

__all__ = ["AlignITError", "Concept", "ConceptError", "Generation", "Model", "ModelError", "Prompt", "PromptError",
           "Settings", "SettingsError", "SwapPlan", "Token", "concept_plan", "find_concepts", "generate_concept",
           "generate_swap", "load_concept", "load_model", "parse_swap", "positions_plan", "scheduler_names",
           "tokenize", "word_swap_plan"]
