"""Memory checks before allocation (a model that cannot fit is refused in one line, before a byte is
allocated), eval's generate batches cut by tokens on CUDA (planned with stand-in free-memory figures:
no GPU here), and the torch thread count's sources."""

from __future__ import annotations

import pytest
import torch

from pipeline.memory import (GiB, NotEnoughMemory, check_fits, checkpoint_params, memory_need, parse_bytes,
                             ram_available, token_batches, token_budget, token_bytes)

MISTRAL_7B = 7_566_747_648  # bench-mistral-7b's parameters (tests/test_sized_presets.py)


def test_sizes_parse_in_binary_and_decimal_units_and_a_bad_one_is_one_line():
    assert parse_bytes("8GiB") == parse_bytes("8 G") == 8 * GiB
    assert parse_bytes("512MiB") == 2 ** 29 and parse_bytes("1.5GiB") == 3 * 2 ** 29
    assert parse_bytes("20GB") == 20 * 10 ** 9 and parse_bytes("4096") == 4096
    with pytest.raises(Exception, match=r"ATR_MEMORY_LIMIT='lots': give a size such as 8GiB"):
        parse_bytes("lots")


def test_the_need_is_the_parameter_bytes_plus_20_percent_plus_1_gib_and_a_refusal_says_what_to_change():
    need = memory_need(MISTRAL_7B * 4)
    assert need == -(-MISTRAL_7B * 4 * 12 // 10) + GiB  # 34.8 GiB for 28.2 GiB of fp32 weights
    with pytest.raises(NotEnoughMemory) as exc:
        check_fits("bench-mistral-7b", MISTRAL_7B, MISTRAL_7B * 4, "float32", "cpu", free=int(22.1 * GiB))
    assert str(exc.value) == ("bench-mistral-7b needs 34.8 GiB (7.57 B params in float32 + 20 % + 1 GiB) but "
                              "22.1 GiB of RAM is free: use --dtype bf16, a CUDA device, or a smaller model")
    # bf16 halves the weights: 17.9 GiB fits where 22.1 GiB is free
    assert check_fits("bench-mistral-7b", MISTRAL_7B, MISTRAL_7B * 2, "bfloat16", "cpu", free=int(22.1 * GiB)) \
        == memory_need(MISTRAL_7B * 2)
    with pytest.raises(NotEnoughMemory, match=r"17.9 GiB \(7.57 B params in bfloat16 \+ 20 % \+ 1 GiB\) but 16.0 GiB "
                                              r"of memory on cuda:0 is free: use a GPU with more free memory, or a "
                                              r"smaller model"):
        check_fits("bench-mistral-7b", MISTRAL_7B, MISTRAL_7B * 2, "bfloat16", "cuda:0", free=16 * GiB)


def test_free_ram_is_read_and_the_limit_variable_replaces_it(monkeypatch):
    from pipeline.memory import free_memory

    total = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal:"))
    assert 0 < ram_available() <= total
    monkeypatch.delenv("ATR_MEMORY_LIMIT", raising=False)
    assert free_memory("cpu")[1] == "RAM"
    monkeypatch.setenv("ATR_MEMORY_LIMIT", "8GiB")
    assert free_memory("cpu") == (8 * GiB, "RAM (ATR_MEMORY_LIMIT=8GiB)")


def test_a_checkpoint_is_counted_from_its_safetensors_headers_and_refused_under_a_small_limit(tiny_stage,
                                                                                            monkeypatch):
    from pipeline.loading import load_model

    monkeypatch.delenv("ATR_MEMORY_LIMIT", raising=False)
    model, _ = load_model(tiny_stage.model_dir)
    params = sum(p.numel() for p in model.parameters())
    assert checkpoint_params(tiny_stage.model_dir, "float32") == (params, params * 4)
    assert checkpoint_params(tiny_stage.model_dir, "bfloat16") == (params, params * 2)
    monkeypatch.setenv("ATR_MEMORY_LIMIT", "64MiB")  # the tiny model needs 1 GiB and a little
    with pytest.raises(NotEnoughMemory) as exc:
        load_model(tiny_stage.model_dir)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(f"the model in {tiny_stage.model_dir} needs 1.0 GiB (")
    assert f"({params / 1e9:.2f} B params in float32 + 20 % + 1 GiB) but 64 MiB of RAM (ATR_MEMORY_LIMIT=64MiB) " \
           f"is free: use --dtype bf16, a CUDA device, or a smaller model" in msg


def test_a_real_size_preset_on_the_cpu_is_refused_before_allocating_through_the_cli(cli_env):
    """`atr speed --model bench-mistral-7b --allow-cpu` with less memory than the model: one line, not
    `DefaultCPUAllocator: can't allocate memory` and the "bug in atr" hint."""
    from conftest import atr_in_process

    need = {"float32": "34.8 GiB (7.57 B params in float32", "bfloat16": "17.9 GiB (7.57 B params in bfloat16"}
    for dtype, extra in (("float32", []), ("bfloat16", ["--dtype", "bf16"])):
        proc = atr_in_process(["speed", "--model", "bench-mistral-7b", "--allow-cpu", "--device", "cpu", *extra],
                              {**cli_env, "ATR_MEMORY_LIMIT": "8GiB"})
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        advice = "use --dtype bf16, a CUDA device, or a smaller model" if dtype == "float32" else \
            "use a CUDA device, or a smaller model"
        assert lines[-1] == (f"error: bench-mistral-7b needs {need[dtype]} + 20 % + 1 GiB) but 8.0 GiB of RAM "
                             f"(ATR_MEMORY_LIMIT=8GiB) is free: {advice}"), proc.stderr


# ---------------------------------------------------------------- eval's generate batches by tokens

def _qwen2_7b():
    """llava-onevision-qwen2-7b-ov's LLM dimensions (Qwen2-7B), as a real config."""
    from transformers import Qwen2Config

    return Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064)


def test_a_token_costs_its_kv_cache_in_every_layer_plus_one_layers_activations():
    # Qwen2-7B in bf16: KV 2 x 28 layers x 4 heads x 128 = 28,672 elements; activations 6 x 3584 + 3 x 18944
    assert token_bytes(_qwen2_7b(), 2) == (28_672 + 78_336) * 2 == 214_016
    assert token_budget(81 * GiB, 1000) == int((80 * GiB) / 1.2 // 1000)
    assert token_budget(GiB // 2, 1000) == 1  # never zero: one item still runs (and may run out of memory)


def test_batches_are_cut_by_padded_tokens_not_by_count():
    # longest first, as eval sorts them; padded size = items x the batch's longest
    assert token_batches([100, 90, 50, 50, 10], budget=200) == [(0, 2), (2, 5)]
    assert token_batches([300, 20, 20], budget=200) == [(0, 1), (1, 3)]  # too long for the budget: alone
    assert token_batches([10] * 10, budget=1000, max_items=4) == [(0, 4), (4, 8), (8, 10)]
    assert token_batches([], budget=10) == []


def test_onevision_full_docvqa_pages_never_start_with_a_batch_that_cannot_fit():
    """16 DocVQA pages at OneVision `full` (21,141 visual tokens each, interpolation off) on an 80 GB GPU
    holding the 16 GB model: the fixed default of 16 would need ~68 GiB of KV and activations alone."""
    per_token = token_bytes(_qwen2_7b(), 2)
    free = 64 * GiB
    lengths = [21_141 + 60 + 16] * 16  # visual + prompt + new tokens
    assert 16 * lengths[0] * per_token > free - GiB
    budget = token_budget(free, per_token)
    batches = token_batches(lengths, budget)
    assert [b - a for a, b in batches] == [12, 4]
    assert all((b - a) * lengths[a] * per_token * 1.2 + GiB <= free for a, b in batches)


def test_auto_batches_by_tokens_on_cuda_keep_every_item_in_order_and_halve_after_running_out():
    from pipeline.evaluate import AUTO_BATCH_CPU, BatchSizer, default_batch_size

    lengths = [4000] * 4 + [1000] * 12 + [200] * 40  # sorted longest first
    calls = []

    def call(start, stop):  # a stand-in for generate on a GPU that holds 8000 padded tokens
        calls.append((start, stop))
        if (stop - start) * lengths[start] > 8000:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return list(range(start, stop))

    sizer = BatchSizer("auto", "cuda:0", budget=16_000)  # the estimate was twice too generous
    out = sizer.run(len(lengths), call, lengths)
    assert [i for part in out for i in part] == list(range(len(lengths)))
    assert calls[0] == (0, 4) and sizer.budget == 8000  # 4 x 4000 ran out: half of its 16,000 tokens
    assert sizer.batches == [2, 2, 8, 8, 36]  # 4 x 1000 + 4 x 200 pad to 8 x 1000; then 36 x 200
    assert BatchSizer("auto", "cpu", budget=16_000).budget is None  # a CPU: fixed 16, as before
    assert BatchSizer(4, "cuda:0", budget=16_000).budget is None    # a given size is the user's
    assert default_batch_size("cpu") == default_batch_size("auto") == AUTO_BATCH_CPU  # no CUDA here


# ---------------------------------------------------------------- torch threads

def test_threads_come_from_atr_torch_threads_then_omp_num_threads_then_the_cores(monkeypatch):
    import os

    from pipeline.config import ConfigError
    from pipeline.device import thread_count

    monkeypatch.delenv("ATR_TORCH_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert thread_count() == (os.cpu_count() or 1)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert thread_count() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "5,2")  # nested levels: the first is this process's
    assert thread_count() == 5
    monkeypatch.setenv("OMP_NUM_THREADS", "many")  # OpenMP ignores a bad value; so do we
    assert thread_count() == (os.cpu_count() or 1)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setenv("ATR_TORCH_THREADS", "7")
    assert thread_count() == 7 and thread_count(2) == 2
    monkeypatch.setenv("ATR_TORCH_THREADS", "0")  # 0: unset
    assert thread_count() == 3
    monkeypatch.setenv("ATR_TORCH_THREADS", "two")
    with pytest.raises(ConfigError, match="ATR_TORCH_THREADS='two': give a positive number of torch threads"):
        thread_count()
