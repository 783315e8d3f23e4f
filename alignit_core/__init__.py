"""AlignIT engine: K/V swaps and attention maps on diffusers Stable Diffusion pipelines.

No gradio here; `app.py` and the CLI (`python -m alignit_core`) are built on this API.
"""
__version__ = "0.1.0"

import os

# Idle OpenMP threads sleep instead of spinning: on a CPU shared with anything else, spinning
# threads made a generation about 20x slower (1.0 s vs 23.8 s, embedded model, 2 busy cores).
# OpenMP reads this when torch loads, so it holds when alignit_core is imported before torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .concepts import Concept, find_concepts, load_concept  # noqa: E402
from .errors import AlignITError, ConceptError, ModelError, PromptError, SettingsError  # noqa: E402
from .concept_prompts import ConceptWords, concept_plan  # noqa: E402
from .generate import generate_concept, generate_swap  # noqa: E402
from .models import Model, load_model  # noqa: E402
from .record import Generation  # noqa: E402
from .settings import LONG_MODES, Settings, scheduler_names  # noqa: E402
from .prompts import (Prompt, SwapPlan, Token, parse_swap, positions_plan,  # noqa: E402
                      read_prompt, tokenize, word_swap_plan)
from .segments import split_sentences  # noqa: E402

__all__ = ["LONG_MODES", "AlignITError", "Concept", "ConceptError", "ConceptWords", "Generation", "Model", "ModelError", "Prompt", "PromptError",
           "Settings", "SettingsError", "SwapPlan", "Token", "concept_plan", "find_concepts", "generate_concept",
           "generate_swap", "load_concept", "load_model", "parse_swap", "positions_plan", "read_prompt",
           "scheduler_names", "split_sentences", "tokenize", "word_swap_plan"]
