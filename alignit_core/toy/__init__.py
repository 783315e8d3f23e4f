"""The toy world the embedded model was trained on, and how its pictures are judged.

`shapes` renders coloured shapes on coloured backgrounds, captions them and classifies a picture's
pixels; `instances` names the novel instances its concepts were trained from; `sampling` loads the
exported model's parts and samples them directly; `evaluate` measures the model, its swaps and its
concepts over many seeds with that classifier. Only the scripts and the tests use this package; the
engine and the demo do not.
"""
