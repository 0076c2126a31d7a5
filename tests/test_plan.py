"""twlib.infra.plan: formula parameter counts match the meta-device models, memory terms scale as they should
(sharded terms halve with twice the GPUs, activations linear in T, dense masks quadratic), the paper's
8B SFT fits on 8 x 80 GB only when sharded, LoRA counts match peft, and the CLI (help, dry run of every
configs/qwen3-*.yaml, bad configs, JSON) behaves."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from twlib.infra import plan, planner
from twlib.models import QWEN3_CONFIGS, build_model, count_parameters, meta_model
from twlib.infra.plan import GIB, PlanConfig, make_plan, model_shape

ROOT = Path(__file__).resolve().parent.parent
QWEN3_YAMLS = sorted((ROOT / "configs").glob("qwen3-*.yaml"))


# ----------------------------------------------------------------------------------------------------
# Parameter counts


@pytest.mark.parametrize("name", [*QWEN3_CONFIGS, "tiny"])
def test_formula_parameter_count_equals_meta_model(name):
    shape = model_shape(name)
    model = meta_model(name)
    assert plan.param_count(shape) == count_parameters(model)
    units = planner.sharding_units(model)
    assert len(units) == shape.layers + 1
    assert units[0][1] == plan.layer_params(shape)
    assert units[-1][1] == plan.root_params(shape)


def test_kv_bytes_per_token_from_the_config():
    c = QWEN3_CONFIGS["Qwen3-8B"]
    expected = 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * c["head_dim"] * 2
    assert plan.kv_bytes_per_token(model_shape("Qwen3-8B")) == expected


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
@pytest.mark.parametrize("rank, targets", [(8, plan.LORA_TARGETS), (4, ("q_proj", "v_proj")), (16, ("down_proj",))])
def test_lora_trainable_count_equals_peft(rank, targets):
    from peft import LoraConfig, get_peft_model

    model = build_model("tiny")
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets),
                                                  bias="none", task_type="CAUSAL_LM"))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert plan.lora_params(model_shape("tiny"), rank, targets) == trainable


def test_unknown_lora_target_is_an_error():
    with pytest.raises(ValueError, match="qkv_proj"):
        plan.lora_params(model_shape("Qwen3-0.6B"), 8, ("qkv_proj",))


# ----------------------------------------------------------------------------------------------------
# Memory scaling


def sft(**fields):
    return make_plan(dataclasses.replace(PlanConfig(), **fields)).memory("SFT")


def test_sharded_terms_halve_with_twice_the_gpus():
    four, eight = sft(gpus=4, offload_optimizer=False), sft(gpus=8, offload_optimizer=False)
    for name in ("weights", "gradients", "fp32 master weights", "AdamW m, v"):
        assert eight.term(name) > 0
        assert eight.term(name) == pytest.approx(four.term(name) / 2)
    # the gathered working set (largest unit with its gradient + the next unit) does not shrink with N,
    # and there is none without sharding
    shape = model_shape("Qwen3-8B")
    gathered = plan.root_params(shape) * (2 + 2) + plan.layer_params(shape) * 2  # bf16 weights and grads
    assert eight.term("gathered units") == four.term("gathered units") == gathered
    assert sft(sharding="none").term("gathered units") == 0
    # activations are per GPU: sharding leaves them alone
    for name in ("activation checkpoints", "one layer's recompute", "LM head"):
        assert eight.term(name) == four.term(name) > 0


def test_offload_moves_optimizer_states_to_the_host():
    on, off = sft(offload_optimizer=True), sft(offload_optimizer=False)
    assert on.total("gpu") < off.total("gpu")
    assert on.total("cpu") > 0 and off.total("cpu") == 0
    # host memory per node holds all 8 shards: 12 bytes per parameter of the whole model
    assert on.total("cpu") == pytest.approx(12 * plan.param_count(model_shape("Qwen3-8B")))


@pytest.mark.parametrize("checkpointing", [True, False])
def test_activations_are_linear_in_tokens(checkpointing):
    names = ("activation checkpoints", "one layer's recompute") if checkpointing else (
        "activations (all layers)", "backward gradients in flight")
    short, long = sft(tokens=8192, checkpointing=checkpointing), sft(tokens=16384, checkpointing=checkpointing)
    for name in names:
        assert long.term(name) == pytest.approx(2 * short.term(name))
    # without checkpointing all layers are kept: far more than checkpoints + one layer
    assert sft(checkpointing=False).total() > sft(checkpointing=True).total()


@pytest.mark.parametrize("precision", ["bf16", "fp32", "fp32-autocast"])
def test_layer_activation_bytes_match_what_autograd_saves(precision):
    """Bytes of the tensors autograd saves in one decoder layer's forward (parameters and the layer input,
    which is the activation checkpoint, excluded) against the formula; the formula also counts the o_proj
    input copy, a view on CPU, so it may be a few percent above."""
    import contextlib

    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=1000, hidden_size=256, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=64, intermediate_size=768, tie_word_embeddings=True)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = Qwen3ForCausalLM(config).to(dtype)
    model.config._attn_implementation = "sdpa"
    tokens = 128
    x = torch.randn(1, tokens, 256, dtype=dtype, requires_grad=True)
    positions = torch.arange(tokens)[None]
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()} | {x.untyped_storage().data_ptr()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    autocast = plan.PRECISIONS[precision].autocast
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), context:
        model.model.layers[0](x, attention_mask=None, position_ids=positions,
                              position_embeddings=model.model.rotary_emb(x, positions))
    shape = plan.ModelShape.from_config(config)
    estimate = plan.layer_activation_bytes(shape, tokens, plan.PRECISIONS[precision])
    if autocast:  # the layer's bf16 weight casts (the LM head's are not in this forward)
        estimate += plan.autocast_weight_bytes(shape, 1) - 2 * config.vocab_size * config.hidden_size
    assert 0.95 < estimate / sum(saved.values()) < 1.10


def test_dense_mask_is_quadratic_and_the_block_mask_small():
    for t in (4096, 40960):
        assert plan.dense_mask_bytes(2 * t) == 4 * plan.dense_mask_bytes(t)
        assert plan.dense_mask_bytes(t, 4) == 4 * plan.dense_mask_bytes(t)
        assert plan.block_mask_bytes(t) < plan.dense_mask_bytes(t) / 500
    # the reference's float32 mask at 40,960 tokens: 6.7 GB (spec section 4)
    assert plan.dense_mask_bytes(40960, 4) / 1e9 == pytest.approx(6.7, abs=0.05)


def test_chunked_logits_do_not_grow_with_tokens_but_full_logits_do():
    s = model_shape("Qwen3-8B")
    assert plan.logits_bytes(s, 65536, "chunked", 4096) == plan.logits_bytes(s, 16384, "chunked", 4096)
    assert plan.logits_bytes(s, 65536, "full", 4096) == 4 * plan.logits_bytes(s, 16384, "full", 4096)
    assert plan.logits_bytes(s, 40960, "chunked", 4096) < plan.logits_bytes(s, 40960, "kept", 4096) \
        < plan.logits_bytes(s, 40960, "full", 4096)
    assert plan.logits_bytes(s, 40960, "twlib", 4096) == plan.logits_bytes(s, 40960, "kept", 4096)  # former name
    with pytest.raises(ValueError, match="logits mode"):
        plan.logits_bytes(s, 40960, "fused", 4096)


def test_the_8b_dry_run_needs_no_lm_head_warning(capsys):
    """twlib.trie.logprobs recomputes each LM-head chunk, so the launch section's `logits: chunked` is what runs:
    no note that the planned LM head differs from the code's (it said 27.0 GiB instead of 6.1 before)."""
    assert planner.main(["--dry-run", str(Path(__file__).resolve().parent.parent / "configs" / "qwen3-8b-sft.yaml")]) == 0
    out = capsys.readouterr().out
    assert "LM head / logits (chunked)" in out and "logits 'chunked' needs" not in out
    assert "recomputes each chunk by default" not in out  # the note printed for `logits: kept` plans


def test_paper_8b_sft_fits_on_8_h100_only_when_sharded():
    sharded = sft()  # the paper preset: 8 x H100 80 GB, ZeRO-3 + CPU offload, checkpointing
    assert sharded.fits
    replicated = sft(sharding="none", offload_optimizer=False)
    assert not replicated.fits
    # unsharded: 16 bytes per parameter on every GPU, more than the GPU holds before any activation
    states = sum(replicated.term(n) for n in ("weights", "gradients", "fp32 master weights", "AdamW m, v"))
    assert states == 16 * plan.param_count(model_shape("Qwen3-8B"))
    assert states / GIB > plan.GPUS["h100-80gb"].memory_gib


def test_small_gpu_track():
    small, _ = plan.HARDWARE["small-gpu"]
    assert make_plan(small).memory("SFT").fits  # Qwen3-0.6B, full fine-tuning, fp32 master weights
    full = make_plan(dataclasses.replace(small, model="Qwen3-1.7B")).memory("SFT")
    assert not full.fits  # 16 B/param of 1.7B is more than 24 GB
    lora = make_plan(dataclasses.replace(small, model="Qwen3-1.7B", lora=True, precision="bf16"))
    assert lora.memory("SFT").fits and lora.trainable < lora.params / 50


def test_rollout_kv_cache_scales_with_sequences_and_context():
    base = dataclasses.replace(PlanConfig(), concurrent=4, context=8192)
    kv = lambda c: make_plan(c).memory("RL rollouts").term("vLLM KV cache")  # noqa: E731
    assert kv(dataclasses.replace(base, concurrent=8)) == 2 * kv(base)
    assert kv(dataclasses.replace(base, context=16384)) == 2 * kv(base)
    assert kv(base) == 4 * 8192 * plan.kv_bytes_per_token(model_shape("Qwen3-8B"))


def test_rl_training_rows_hold_a_whole_rollout():
    small, _ = plan.HARDWARE["small-gpu"]  # SFT rows of 2,048 tokens, rollouts of up to 8,252
    p = make_plan(small)
    assert p.memory("RL training").tokens == max(small.tokens, small.context) > p.memory("SFT").tokens
    assert p.memory("RL training").gpu_gib > p.memory("SFT").gpu_gib


def test_time_and_cost():
    p = make_plan()
    cheap = make_plan(price_per_hour=p.price_per_hour / 2)
    assert cheap.totals["cost"] == pytest.approx(p.totals["cost"] / 2)
    assert p.totals["gpu_hours"] == pytest.approx(8 * p.totals["hours"])
    # a higher MFU makes the FLOP-bound SFT stages faster, in proportion when there is no offload
    off = dataclasses.replace(PlanConfig(), offload_optimizer=False)
    slow, fast = make_plan(off), make_plan(off, plan.Throughput(mfu=0.7))
    assert fast.time[0]["hours"] == pytest.approx(slow.time[0]["hours"] / 2, rel=0.01)
    # 6 x P x tokens is a lower bound of the FLOPs (attention adds to it)
    s = model_shape("Qwen3-8B")
    assert plan.flops_per_token(s, 15000, lora=False) > 6 * plan.matmul_params(s)


def test_table_and_str():
    p = make_plan()
    rows = p.table()
    assert all(set(r) == {"section", "item", "value", "unit", "note"} for r in rows)
    total = next(r for r in rows if r["section"].startswith("memory per GPU: SFT") and r["item"] == "TOTAL per GPU")
    assert total["value"] == pytest.approx(p.memory("SFT").gpu_gib, abs=1e-3)
    text = str(p)
    assert "memory per GPU: SFT" in text and "GPU-h" in text


# ----------------------------------------------------------------------------------------------------
# Command line and dry run


def test_help_runs():
    done = subprocess.run([sys.executable, "-m", "twlib.infra.planner", "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "--dry-run" in done.stdout and "--price" in done.stdout


def test_there_are_the_qwen3_configs():
    assert [p.name for p in QWEN3_YAMLS] == ["qwen3-0.6b-pgrpo.yaml", "qwen3-0.6b-sft.yaml", "qwen3-1.7b-sft.yaml",
                                             "qwen3-8b-pgrpo.yaml", "qwen3-8b-sft.yaml", "qwen3-tiny-pgrpo.yaml",
                                             "qwen3-tiny-sft.yaml"]


@pytest.mark.parametrize("path", QWEN3_YAMLS, ids=lambda p: p.name)
def test_dry_run_of_every_qwen3_config(path, capsys):
    assert planner.main(["--dry-run", str(path)]) == 0
    out = capsys.readouterr().out
    assert "sharding plan" in out and "(equal)" in out and "fits" in out and "DOES NOT FIT" not in out


def test_dry_run_8b_shards_over_8_gpus():
    report, p = planner.dry_run_plan(ROOT / "configs" / "qwen3-8b-sft.yaml")
    assert p.config.gpus == 8 and p.config.sharding == "zero3" and p.config.tokens == 40960
    assert p.params == count_parameters("Qwen3-8B")
    assert "model.layers.0..35" in report and f"{-(-plan.layer_params(p.shape) // 8):,}" in report


def test_pgrpo_dry_run_counts_the_kl_reference():
    report, p = planner.dry_run_plan(ROOT / "configs" / "qwen3-8b-pgrpo.yaml")
    assert "reference model" not in report                       # kl_coef 0, as the paper
    report, p = planner.dry_run_plan(ROOT / "configs" / "qwen3-8b-pgrpo.yaml", ["kl_coef=0.1"])
    shards = p.params * 4 / 8 / plan.GIB                         # fp32 shards of bf16-mixed, over 8 GPUs
    assert f"reference model adds its shards, {shards:.2f} GiB per GPU" in report


def write_broken(tmp_path, old, new) -> Path:
    text = (ROOT / "configs" / "qwen3-8b-sft.yaml").read_text()
    assert old in text
    path = tmp_path / "broken.yaml"
    path.write_text(text.replace(old, new, 1))
    return path


@pytest.mark.parametrize("old, new, field", [
    ("lr: 1.0e-5", "lr: -1", "'lr'"),
    ("betas: [0.9, 0.95]", "betas: [0.9]", "'betas'"),
    ("epochs: 8", "epohcs: 8", "'epohcs'"),
    ("  sharding: zero3", "  sharding: zero9", "'sharding'"),
    ("  gpus: 8", "  gpus: eight", "'gpus'"),
    ("  gpu: h100-80gb", "  gpu_type: h100-80gb", "'gpu_type'"),
    ("  gpu: h100-80gb", "  gpu: h900-80gb", "'gpu'"),
    ("model: models/Qwen3-8B", "model: models/Llama-8B", "'model'"),
])
def test_broken_config_exits_2_and_names_the_field(tmp_path, capsys, old, new, field):
    path = write_broken(tmp_path, old, new)
    assert planner.main(["--dry-run", str(path)]) == 2
    err = capsys.readouterr().err
    assert field in err and "error" in err


def test_missing_config_exits_2(tmp_path, capsys):
    assert planner.main(["--dry-run", str(tmp_path / "nope.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_cli_json_parses(capsys):
    argv = ["--model", "Qwen3-8B", "--gpus", "8", "--gpu", "h100-80gb", "--tokens", "40960", "--price", "2.5",
            "--json"]
    assert planner.main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["config"]["gpus"] == 8 and data["price_per_hour"] == 2.5
    assert data["fits"]["SFT"] is True
    assert data["totals"]["cost"] == pytest.approx(2.5 * data["totals"]["gpu_hours"])
    sft_rows = [r for r in data["rows"] if r["section"].startswith("memory per GPU: SFT") and r["unit"] == "GiB"
                and r["item"] != "TOTAL per GPU"]
    assert sum(r["value"] for r in sft_rows) == pytest.approx(data["gpu_gib"]["SFT"], abs=0.01)


def test_cli_bad_value_exits_2(capsys):
    assert planner.main(["--gpu", "h200-141gb"]) == 2
    assert "gpu" in capsys.readouterr().err


TRAINERS = {"sft": "twlib.train.sft", "pgrpo": "twlib.train.pgrpo",
            "distributed_pgrpo": "twlib.train.pgrpo_fsdp"}


@pytest.mark.parametrize("name", TRAINERS)
def test_every_trainer_has_help_and_a_dry_run(name, capsys):
    """`--help` and `--dry-run` (validate, meta-device model, sharding plan, memory; exit) on every trainer
    entry point, with a config of its kind; a bad override exits 2 naming the field."""
    import importlib

    module = importlib.import_module(TRAINERS[name])
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    assert e.value.code == 0 and "--dry-run" in capsys.readouterr().out
    config = ROOT / "configs" / ("qwen3-0.6b-pgrpo.yaml" if "pgrpo" in name else "qwen3-0.6b-sft.yaml")
    assert module.main(["--config", str(config), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"dry run: {config}") and "sharding plan" in out and "(equal)" in out
    assert module.main(["--config", str(config), "--dry-run", "--set", "lr=-1"]) == 2
    assert "field 'lr'" in capsys.readouterr().err
