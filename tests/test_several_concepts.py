"""Several concepts in one prompt: each concept's rows of p come from its own customized model's p',
in the same batched call; the customized baseline is the one model holding them all, where there is one."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_concepts import WIDTH, cd_weights, vec, write_concept

from alignit_core import PromptError, Settings, generate_concept, load_concept
from alignit_core.conditioning import encode_prompt
from alignit_core.prompts import tokenize

PROMPT = "a <cat-toy> next to a <new1>"


def _ti(model, folder, token="<cat-toy>", class_word="toy", seed=40):
    return load_concept(write_concept(folder, {"e.safetensors": {token: vec(2, WIDTH, seed=seed)}}, token=token,
                                      class_word=class_word, kind="textual_inversion", weights="e.safetensors"), model)


def _cd(model, folder, seed=41):
    state = {f"{layer}.processor.to_{x}_custom_diffusion.weight": wk if x == "k" else wv
             for layer, (wk, wv) in cd_weights(model, seed=seed).items() for x in "kv"}
    return load_concept(write_concept(folder, {"cd.safetensors": state, "e.safetensors": {"<new1>": vec(1, WIDTH, seed=seed)}},
                                      token="<new1>", class_word="dog", kind="custom_diffusion", weights="e.safetensors",
                                      custom_diffusion="cd.safetensors"), model)


def _te(model, folder, token, seed):
    te = model.text_encoders[0]
    name = next(k for k in te.state_dict() if k.endswith("encoder.layers.0.mlp.fc1.weight"))
    changed = te.state_dict()[name] + 0.5 * vec(*te.state_dict()[name].shape, seed=seed)
    return load_concept(write_concept(folder, {"te.safetensors": {name: changed}}, token=token, class_word="cat",
                                      kind="text_encoder", text_encoder="te.safetensors"), model)


def _capture(model, text, concepts, settings=Settings(seed=0, steps=2), **kw):
    seen = {}

    def on_kv(layer, step, key, value):
        seen[(layer, step)] = (key.clone(), value.clone())

    return generate_concept(model, text, concepts, settings, on_kv=on_kv, **kw), seen


def test_each_concepts_rows_come_from_its_own_customized_model(tiny_sd, tmp_path):
    """Textual inversion and Custom Diffusion in one prompt: AlignIT's rows at <cat-toy>'s positions
    are the base projection of the TI model's p', at <new1>'s the Custom Diffusion weights on its p';
    every other row is the base model's projection of p."""
    ti, cd = _ti(tiny_sd, tmp_path / "ti"), _cd(tiny_sd, tmp_path / "cd")
    gen, seen = _capture(tiny_sd, PROMPT, [ti, cd])
    s = gen.record()
    assert s["p"] == "a toy next to a dog" and s["customized_prompt"] == "a <cat-toy> next to a <new1> dog"
    by_token = {c["token"]: c for c in s["concepts"]}
    assert by_token["<cat-toy>"]["p_dummy"] == "<cat-toy> * * * *" and by_token["<cat-toy>"]["positions"] == [2]
    assert by_token["<new1>"]["p_dummy"] == "* * * * <new1> dog" and by_token["<new1>"]["positions"] == [6]
    assert gen.swapped["alignit"] == (2, 6) and gen.rows == ["customized", "alignit"]
    p = tokenize(tiny_sd.tokenizer, s["p"])
    enc_p, _ = encode_prompt(tiny_sd, p, None)
    enc_ti, _ = encode_prompt(tiny_sd, tokenize(tiny_sd.tokenizer, "<cat-toy> * * * *", "<cat-toy>", 2), ti)
    enc_cd, _ = encode_prompt(tiny_sd, tokenize(tiny_sd.tokenizer, "* * * * <new1> dog", "<new1>", 1), cd)
    close = dict(rtol=1e-4, atol=1e-5)
    for (layer, _), (key, value) in seen.items():  # batch: [uncond customized, uncond alignit, cond customized, cond alignit]
        attn = tiny_sd.cross_attention_layers[layer]
        for got, base, edit in ((key, attn.to_k, cd.key_value_edits[layer][0]), (value, attn.to_v, cd.key_value_edits[layer][1])):
            torch.testing.assert_close(got[3, [0, 1, 3, 4, 5, 7]], base(enc_p)[[0, 1, 3, 4, 5, 7]], **close)
            torch.testing.assert_close(got[3, 2], base(enc_ti)[2], **close)
            torch.testing.assert_close(got[3, 6], F.linear(enc_cd, edit.weight)[6], **close)
            assert (got[3, 6] - base(enc_cd)[6]).abs().max() > 1e-2


def test_the_customized_baseline_is_one_model_holding_both_concepts(tiny_sd, tmp_path):
    """TI vectors and Custom Diffusion weights fit one model: its row reads both concepts' vectors
    and projects every position with the Custom Diffusion weights."""
    ti, cd = _ti(tiny_sd, tmp_path / "ti"), _cd(tiny_sd, tmp_path / "cd")
    gen, seen = _capture(tiny_sd, PROMPT, [ti, cd])
    customized = tokenize(tiny_sd.tokenizer, gen.record()["customized_prompt"],
                          vector_tokens=(("<cat-toy>", 2), ("<new1>", 1)))
    assert customized.vectors == {2: 0, 3: 1, 7: 2}
    assert [t.text for t in gen.tokens["customized"][1:9]] == ["a", "<cat-toy>", "<cat-toy>_1", "next", "to", "a",
                                                                "<new1>", "dog"]
    both = torch.cat([ti.vectors[0], cd.vectors[0]])
    ids = torch.tensor([list(customized.ids) + [49407] * (77 - len(customized.ids))])
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    vectors = torch.zeros(1, 77, WIDTH)
    for pos, k in customized.vectors.items():
        mask[0, pos], vectors[0, pos] = True, both[k]
    from alignit_core.encoding import encode

    hidden = encode(tiny_sd.text_encoders[0], ids, vectors, mask).hidden[0]
    for (layer, _), (key, _) in seen.items():
        torch.testing.assert_close(key[2], F.linear(hidden, cd.key_value_edits[layer][0].weight), rtol=1e-4, atol=1e-5)


def test_text_encoder_fine_tunes_and_mixed_kinds(tiny_sd, tmp_path):
    """A text-encoder fine-tune's rows come from its own encoder; two fine-tunes are no single
    model, so their customized baseline is left out, with the reason."""
    te, ti = _te(tiny_sd, tmp_path / "te", "sks", seed=42), _ti(tiny_sd, tmp_path / "ti")
    gen, seen = _capture(tiny_sd, "a photo of a sks with a <cat-toy>", [te, ti])
    assert gen.rows == ["customized", "alignit"] and gen.warnings == []
    cv = next(c for c in gen.record()["concepts"] if c["token"] == "sks")
    enc_te, _ = encode_prompt(tiny_sd, tokenize(tiny_sd.tokenizer, cv["p_dummy"]), te)
    enc_base, _ = encode_prompt(tiny_sd, tokenize(tiny_sd.tokenizer, cv["p_dummy"]), None)
    for (layer, _), (key, _) in seen.items():
        attn = tiny_sd.cross_attention_layers[layer]
        for pos in cv["positions"]:
            torch.testing.assert_close(key[3, pos], attn.to_k(enc_te)[pos], rtol=1e-4, atol=1e-5)
            assert (key[3, pos] - attn.to_k(enc_base)[pos]).abs().max() > 1e-3
    other = _te(tiny_sd, tmp_path / "te2", "ohwx", seed=43)
    gen = generate_concept(tiny_sd, "a photo of a sks with a ohwx", [te, other], Settings(steps=1), include_base=True)
    assert gen.rows == ["alignit", "base"]
    assert gen.warnings == ["sks and ohwx both change the text encoder; no single customized model holds both, "
                            "so the customized baseline is left out"]


def test_positions_with_several_concepts_must_be_theirs(tiny_sd, tmp_path):
    ti, cd = _ti(tiny_sd, tmp_path / "ti"), _cd(tiny_sd, tmp_path / "cd")
    gen = generate_concept(tiny_sd, PROMPT, [ti, cd], Settings(steps=1), positions=[6])
    assert gen.swapped["alignit"] == (6,) and [c["token"] for c in gen.record()["concepts"]] == ["<new1>"]
    with pytest.raises(PromptError, match=r"position\(s\) \[3\] belong to no concept"):
        generate_concept(tiny_sd, PROMPT, [ti, cd], Settings(steps=1), positions=[2, 3])
    with pytest.raises(PromptError, match="chosen twice"):
        generate_concept(tiny_sd, PROMPT, [ti, ti], Settings(steps=1))


def test_concept_swap_strength_zero_is_the_base_model_bit_for_bit(tiny_sd, tmp_path):
    ti = _ti(tiny_sd, tmp_path / "ti")
    gen = generate_concept(tiny_sd, "a photo of a <cat-toy>", ti, Settings(steps=3, swap_strength=0.0),
                           include_base=True)
    # the denoising is bit for bit the base model's (a CPU VAE may decode batch rows 1/255 apart)
    assert torch.equal(gen.latents["alignit"], gen.latents["base"])
    full = generate_concept(tiny_sd, "a photo of a <cat-toy>", ti, Settings(steps=3), include_base=True)
    assert not torch.equal(full.latents["alignit"], full.latents["base"])
