"""The FLOPs model against values computed by hand for llava-v1.6-vicuna-7b's dimensions.

Llama-2-7B: T = 32 layers, d = 4096, m = 11008, 32 heads of e = 128, 32 kv heads, V = 32064.
CLIP ViT-L/14-336: 24 layers, width 1024, FFN 4096, 576 patches + CLS = 577 tokens per crop.
"""

from __future__ import annotations

import pytest

from pipeline.flops import (CLIP_L_SELECTOR, SIGLIP_SO400M_SELECTOR, VICUNA_7B, LlavaNextDims, LMDims, SelectorDims,
                            ideal_speedup, kv_cache_bytes, llava_next_visual_tokens, lm_prefill_flops, prefill_flops,
                            projector_flops, selector_flops, selector_parameters, selector_share,
                            selector_training_flops, training_seconds, vision_tower_flops)

LM = VICUNA_7B.lm


def flops_ratio(lm: LMDims, text_tokens: int, full_visual: int, pruned_visual: int,
                convention: str = "causal") -> float:
    """Pruned / full prefill FLOPs (the "LLM ratio" peers quote), i.e. 1 / ideal_speedup."""
    return 1.0 / ideal_speedup(lm, text_tokens, full_visual, pruned_visual, convention)


def test_fastv_ratio_at_22_percent_of_2880_tokens_is_21_4_percent():
    # Kept: round(0.222 * 2880) = round(639.36) = 639 visual tokens; 60 text tokens either way.
    # FastV per layer: 4nd^2 + 2n^2d + 2ndm = n*d*(4d + 2n + 2m).
    #   full   n = 2940: 2940 * 4096 * (16384 + 5880 + 22016) = 2940 * 4096 * 44280
    #   pruned n =  699:  699 * 4096 * (16384 + 1398 + 22016) =  699 * 4096 * 39798
    # ratio = (699 * 39798) / (2940 * 44280) = 27_818_802 / 130_183_200 = 0.21369...
    kept = round(0.222 * 2880)
    assert kept == 639
    by_hand = (699 * 39798) / (2940 * 44280)
    assert by_hand == pytest.approx(0.21369, abs=1e-5)
    assert flops_ratio(LM, 60, 2880, kept, "fastv") == pytest.approx(by_hand, rel=1e-12)
    assert round(flops_ratio(LM, 60, 2880, kept, "fastv"), 3) == 0.214
    # True FLOPs (causal) weight the n^2 term less, so the same pruning buys less: 22.8 %, not 21.4 %.
    assert flops_ratio(LM, 60, 2880, kept, "causal") == pytest.approx(0.2276, abs=1e-4)


def test_causal_prefill_of_2940_tokens_by_hand():
    n = 2940
    parts = lm_prefill_flops(LM, n, "causal")
    # q and o: 2 FLOPs * n * d * d each; k and v the same (32 kv heads of 128 = 4096).
    assert parts["projections"] == 32 * 2 * (2 * 2940 * 4096 * 4096) * 2 == 12_627_203_850_240
    # QK^T and AV over the causal half: n(n+1)/2 = 4_323_270 pairs, 2 FLOPs * 128 per head per pair, 32 heads, x2.
    assert 2940 * 2941 // 2 == 4_323_270
    assert parts["attention"] == 32 * (4 * 32 * 128 * 4_323_270) == 2_266_638_581_760
    # SwiGLU: gate, up, down, each 2 * n * d * m.
    assert parts["mlp"] == 32 * 3 * 2 * 2940 * 4096 * 11008 == 25_451_707_760_640
    # Logits for the last position only.
    assert parts["logits"] == 2 * 4096 * 32064 == 262_668_288
    assert parts["total"] == 12_627_203_850_240 + 2_266_638_581_760 + 25_451_707_760_640 + 262_668_288
    # Sanity: 2 FLOPs per non-embedding parameter per token (6.48 B params) plus attention.
    per_token_linear = (parts["projections"] + parts["mlp"]) / n
    assert per_token_linear == 2 * 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008) == 12_952_010_752


def test_conventions_side_by_side():
    n = 2940
    causal, square, fastv = (lm_prefill_flops(LM, n, c) for c in ("causal", "square", "fastv"))
    # Square differs from causal only in attention: n^2 instead of n(n+1)/2 pairs.
    assert square["attention"] - causal["attention"] == 32 * 4 * 4096 * (n * n - n * (n + 1) // 2)
    assert {k: square[k] for k in ("projections", "mlp", "logits")} == \
        {k: causal[k] for k in ("projections", "mlp", "logits")}
    # FastV counts multiply-adds with two FFN matrices and no logits:
    # square = 2 * FastV + the third SwiGLU matrix (2ndm per layer) + logits.
    assert square["total"] == 2 * fastv["total"] + 32 * 2 * n * 4096 * 11008 + 262_668_288
    # The "2.5x" between conventions that peers mix up, for the full vicuna-7b prompt.
    assert square["total"] / fastv["total"] == pytest.approx(2.497, abs=1e-3)
    # Ideal speed-ups: FastV promises the most, causal the least.
    s = {c: ideal_speedup(LM, 60, 2928, 60 + 700, c) for c in ("causal", "square", "fastv")}
    assert s["fastv"] > s["square"] > s["causal"] > 1.0
    assert ideal_speedup(LM, 60, 2928, 2928) == 1.0
    assert flops_ratio(LM, 60, 2928, 700) == pytest.approx(1 / ideal_speedup(LM, 60, 2928, 700))


def test_gqa_shrinks_only_the_kv_projections():
    mistral = LMDims(layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=32064)
    mha = LMDims(layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=32, vocab=32064)
    a, b = lm_prefill_flops(mistral, 1000), lm_prefill_flops(mha, 1000)
    qo = 32 * 2 * 1000 * 4096 * 4096 * 2
    assert b["projections"] - a["projections"] == qo - qo // 4  # k, v: 8 of 32 heads
    assert a["attention"] == b["attention"] and a["mlp"] == b["mlp"]
    assert kv_cache_bytes(mistral, 1000) * 4 == kv_cache_bytes(mha, 1000)


def test_vision_tower_of_clip_l_336_by_hand():
    v = VICUNA_7B.vision
    assert v.tokens == 577
    patch = 2 * 576 * (3 * 14 * 14) * 1024                          # 693_633_024
    layer = 2 * 577 * 4 * 1024 ** 2 + 4 * 577 ** 2 * 1024 + 4 * 577 * 1024 * 4096
    assert patch == 693_633_024 and layer == 15_884_357_632
    assert vision_tower_flops(v, 1) == patch + 24 * layer == 381_918_216_192
    assert vision_tower_flops(v, 5) == 5 * 381_918_216_192
    assert vision_tower_flops(v, 1, layers_run=23) == patch + 23 * layer


def test_selector_over_5_crops_of_576_tokens_is_under_1_percent_of_vicuna_prefill():
    # Per crop and layer: q,k,v,o 2*576*4*1024^2; attention within the crop 4*576^2*1024; FFN 4*576*1024*4096.
    layer = 2 * 576 * 4 * 1024 ** 2 + 4 * 576 ** 2 * 1024 + 4 * 576 * 1024 * 4096
    assert layer == 15_854_469_120
    per_crop = 3 * layer + 2 * 576 * 1024                           # + the linear keep-logit head
    assert selector_flops(CLIP_L_SELECTOR, 5) == 5 * per_crop == 237_822_935_040
    # Attention is within each crop: 5 crops cost 5x one crop, not (5*576)^2.
    assert selector_flops(CLIP_L_SELECTOR, 5) == 5 * selector_flops(CLIP_L_SELECTOR, 1)
    visual = llava_next_visual_tokens(24, 2, 2)
    assert visual == 576 + 48 * 49 == 2928
    share = selector_share(CLIP_L_SELECTOR, 5, LM, 60, visual)
    assert share == pytest.approx(237_822_935_040 / prefill_flops(LM, 60, 2928))
    assert 0.005 < share < 0.01
    # A narrower selector on wider features pays an input projection.
    narrow = SelectorDims(tokens=576, channels=1024, d_model=512)
    assert selector_flops(narrow, 1) - (3 * (2 * 576 * 4 * 512 ** 2 + 4 * 576 ** 2 * 512 + 4 * 576 * 512 * 2048)
                                        + 2 * 576 * 512) == 2 * 576 * 1024 * 512


def test_selector_training_step_on_clip_l_features_by_hand():
    # One crop of L = 576 tokens, d = C = 1024, FFN 4096, 3 selector + 3 reconstructor blocks.
    layer = 2 * 576 * 4 * 1024 * 1024 + 4 * 576 * 576 * 1024 + 2 * 2 * 576 * 1024 * 4096
    assert layer == 4_831_838_208 + 1_358_954_496 + 9_663_676_416 == 15_854_469_120
    # Forward: 6 blocks, the keep-logit head (d -> 1) and the reconstructor's output projection (d -> C).
    forward = 6 * layer + 2 * 576 * 1024 + 2 * 576 * 1024 * 1024
    assert forward == 96_335_953_920
    # Forward + backward = 3 x forward: 289 GFLOP per crop, 18.5 TFLOP per step of 64.
    assert selector_training_flops(CLIP_L_SELECTOR, 1) == 3 * forward == 289_007_861_760
    assert selector_training_flops(CLIP_L_SELECTOR, 64) == 64 * 289_007_861_760
    # The selector alone (inference) is the first 3 blocks and the head.
    assert selector_flops(CLIP_L_SELECTOR, 1) == 3 * layer + 2 * 576 * 1024
    # The default schedule (2000 steps x 64 = 128,000 crops) on an H100 at 40 % of 989 TFLOP/s: 93.5 s.
    assert training_seconds(CLIP_L_SELECTOR, 128_000, 0.4 * 989e12) == pytest.approx(93.51, abs=0.01)
    # The 72 GFLOP/s on one CPU thread: 4.0 s per crop, 4.3 min per step of 64.
    assert training_seconds(CLIP_L_SELECTOR, 64, 72e9) / 60 == pytest.approx(4.28, abs=0.01)
    with pytest.raises(ValueError):
        training_seconds(CLIP_L_SELECTOR, 1, 0.0)


def test_selector_parameters_at_the_real_dims():
    # Per block: 2 LNs (4d), qkv (3d^2 + 3d), o (d^2 + d), FFN (4d^2 + 4d, 4d^2 + d) = 12d^2 + 13d.
    d = 1024
    block = 12 * d * d + 13 * d
    encoder = 576 * d + 3 * block + 2 * d  # positions, 3 blocks, final LN
    head, mask_embedding, out = d + 1, d, d * d + d
    assert selector_parameters(CLIP_L_SELECTOR) == 2 * encoder + head + mask_embedding + out == 77_812_737
    assert selector_parameters(SIGLIP_SO400M_SELECTOR) == 98_656_129
    # OneVision's crop: 729 tokens of 1152 channels, 468 GFLOP per training crop.
    assert selector_training_flops(SIGLIP_SO400M_SELECTOR, 1) == pytest.approx(467.83e9, rel=1e-4)


def test_selector_parameters_match_the_model():
    import torch

    from pipeline.selector import SelectorConfig, TokenSelector

    for dims, cfg in ((CLIP_L_SELECTOR, SelectorConfig()), (SIGLIP_SO400M_SELECTOR, SelectorConfig()),
                      (SelectorDims(16, 24, d_model=32, layers=2, ffn_mult=2, reconstructor_layers=1),
                       SelectorConfig(d_model=32, n_heads=4, ffn_mult=2, selector_layers=2, reconstructor_layers=1))):
        with torch.device("meta"):
            model = TokenSelector(cfg, dims.tokens, dims.channels)
        assert sum(p.numel() for p in model.parameters()) == selector_parameters(dims)


def test_kv_cache_and_projector_by_hand():
    # K and V, 32 layers, 32 heads of 128, fp16: 2 * 32 * 4096 * 2 bytes = 0.5 MiB per token.
    assert kv_cache_bytes(LM, 1) == 524_288
    assert kv_cache_bytes(LM, 2988) == 2988 * 524_288 == 1_566_572_544
    assert kv_cache_bytes(LM, 10, bytes_per_element=4) == 2 * kv_cache_bytes(LM, 10)
    assert projector_flops(1024, 4096, 2880) == 2 * 2880 * (1024 * 4096 + 4096 * 4096)


def test_dims_from_a_transformers_config():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig

    cfg = LlavaNextConfig(
        text_config=LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32),
        vision_config=CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                       num_attention_heads=16, image_size=336, patch_size=14),
        vision_feature_layer=-2)
    dims = LlavaNextDims.from_config(cfg)
    assert dims.lm.e == 128 and dims.vision.tokens == 577
    for n in (1, 700, 2988):
        for c in ("causal", "square", "fastv"):
            assert prefill_flops(dims.lm, 60, n, c) == prefill_flops(LM, 60, n, c)
    assert vision_tower_flops(dims.vision, 5) == vision_tower_flops(VICUNA_7B.vision, 5)
    assert dims.projector_in == 1024


def test_bad_input():
    with pytest.raises(ValueError, match="unknown FLOPs convention 'flops'"):
        lm_prefill_flops(LM, 10, "flops")
    with pytest.raises(ValueError, match="tokens must be >= 0"):
        lm_prefill_flops(LM, -1)
