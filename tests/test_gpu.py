"""On a CUDA device: selector training steps, pruned bf16 generation against stock ``full``, an ``atr speed`` run.

Marked ``gpu`` and skipped without CUDA; ``.ci/gpu-check`` runs them (``python -m pytest -m gpu``).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_selector_training_steps_run_on_cuda_with_bf16_autocast():
    from pipeline.selector import SelectorConfig
    from pipeline.train import Trainer

    cfg = SelectorConfig(retention=0.25, steps=20, batch_size=16, lr=1e-3, warmup_steps=2)
    trainer = Trainer(cfg, tokens=576, channels=1024, device="cuda", autocast="bf16")
    assert next(trainer.model.parameters()).device.type == "cuda"
    rng = np.random.default_rng(0)

    def batches():
        while True:
            yield rng.standard_normal((16, 576, 1024)).astype(np.float32)

    selector = trainer.fit(batches(), log_every=5)
    assert next(selector.parameters()).device.type == "cuda"
    assert all(torch.isfinite(p).all() for p in selector.parameters())


def test_pruned_bf16_full_generates_the_stock_token_ids_on_cuda(trained_stage):
    from pipeline.prune import encode_images, generate_ids, visual_embeddings
    from pipeline.loading import load_model
    from pipeline.synthetic import generate_samples
    from pipeline.tinyworld import prompt_for

    model, processor = load_model(trained_stage.model_dir, dtype="bfloat16", device="cuda")
    samples = generate_samples("synthetic-ocr", "test", 8) + generate_samples("synthetic-scene", "test", 8)
    tok = processor.tokenizer
    tok.padding_side = "left"
    for s in samples:  # batch of one: left padding cannot differ
        prompt = prompt_for(s.question)
        feats = encode_images(model, processor, [s.image])[0]
        ours = generate_ids(model, processor, [prompt], [visual_embeddings(model, feats)], max_new_tokens=6)
        enc = processor(images=[s.image], text=[prompt], return_tensors="pt").to("cuda")
        enc["pixel_values"] = enc["pixel_values"].to(torch.bfloat16)
        stock = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id,
                               eos_token_id=tok.eos_token_id)[:, enc["input_ids"].shape[1]:]
        n = min(ours.shape[1], stock.shape[1])
        assert torch.equal(ours[:, :n].cpu(), stock[:, :n].cpu()), s.question_id


def test_a_speed_run_on_cuda(cli_env, tmp_path):
    out = subprocess.run([sys.executable, "-m", "flows.cli", "speed", "--home", str(tmp_path / "home"), "--device",
                          "cuda", "--repeats", "3", "--extract-images", "8", "--extract-repeats", "2"],
                         cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "prefill" in out.stdout
