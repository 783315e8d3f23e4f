"""A run that fails: an exception in the denoising loop reaches its caller and the GPU cache is
emptied, out of GPU memory is a clear model error on every surface, and the app shows an unexpected
failure to its visitor as a toast without its internals; the model stays as loaded.
"""
from __future__ import annotations

from functools import partial

import gradio as gr
import pytest
import torch

import app
import alignit_core.generate as generate_module
import alignit_core.models as models_module
from alignit_core import ModelError, generate_swap
from alignit_core.cli import main as cli_main
from reliability import GOOD, assert_intact, fail_at_step_1, ui_generate

pytestmark = pytest.mark.usefixtures("one_thread_per_run")


def empty_cache_calls(monkeypatch) -> list:
    """Record calls of torch.cuda.empty_cache (a no-op on a CPU-only machine)."""
    calls = []
    real = torch.cuda.empty_cache
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: (calls.append(1), real())[1])
    return calls


def test_an_exception_in_the_denoising_loop_reaches_its_caller_and_empties_the_cache(tiny_sd, reference, monkeypatch):
    emptied = empty_cache_calls(monkeypatch)
    with pytest.raises(RuntimeError, match="forced failure"):
        generate_swap(tiny_sd, *GOOD, on_kv=fail_at_step_1(RuntimeError("forced failure")))
    assert emptied == [1]
    assert_intact(tiny_sd, reference)
    assert emptied == [1]  # a run that succeeds keeps its cache


OOM = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
OOM_WORDS = "out of GPU memory; try a smaller size or fewer steps"


def test_out_of_gpu_memory_is_a_clear_model_error_on_every_surface(tiny_sd, reference, monkeypatch, capsys, tmp_path):
    emptied = empty_cache_calls(monkeypatch)
    with pytest.raises(ModelError, match=OOM_WORDS):
        generate_swap(tiny_sd, *GOOD, on_kv=fail_at_step_1(OOM))
    assert emptied == [1]
    # the CLI and the app, with the same failure forced into their runs
    real_swap = generate_module.generate_swap
    monkeypatch.setattr(generate_module, "generate_swap", partial(real_swap, on_kv=fail_at_step_1(OOM)))
    monkeypatch.setattr(app, "generate_swap", partial(real_swap, on_kv=fail_at_step_1(OOM)))
    monkeypatch.setattr(models_module, "load_model", lambda name, device=None: tiny_sd)
    capsys.readouterr()
    assert cli_main(["generate", "--model", "tiny", "--prompt", "a jumping dog", "--swap", "dog=zebra",
                     "--steps", "2", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"error: {OOM_WORDS}"
    with pytest.raises(gr.Error) as ui:
        ui_generate(tiny_sd, {})
    assert ui.value.message == OOM_WORDS and ui.value.title == "Model error"
    assert emptied == [1, 1, 1]
    monkeypatch.undo()
    assert_intact(tiny_sd, reference)


def test_the_app_reports_an_unexpected_failure_to_its_visitor_as_a_toast(tiny_sd, reference, monkeypatch):
    boom = fail_at_step_1(RuntimeError("/srv/secret/path: something broke"))
    monkeypatch.setattr(app, "generate_swap", partial(generate_swap, on_kv=boom))
    with pytest.raises(gr.Error) as ui:
        ui_generate(tiny_sd, {})
    assert ui.value.message == "the generation failed (RuntimeError); the model is unchanged, try again"
    assert "/srv/secret" not in ui.value.message  # internals stay in the server log
    monkeypatch.undo()
    assert_intact(tiny_sd, reference)
