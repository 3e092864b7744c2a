from qlora_pipeline.execution import resolve_optimizer


def test_auto_optimizer_keeps_8bit_states_where_they_save_memory():
    assert resolve_optimizer("auto", "cuda", 589_824) == "adamw_torch_fused"     # distilgpt2 r=8: 8-bit saves 3 MiB
    assert resolve_optimizer("auto", "cuda", 400_000_000) == "adamw_8bit"         # saves 2.2 GiB
    assert resolve_optimizer("auto", "cpu", 589_824) == "adamw_8bit"
    assert resolve_optimizer("adamw_torch", "cuda", 589_824) == "adamw_torch"
