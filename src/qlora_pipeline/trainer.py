"""The trainer room: trl's SFTTrainer as the train stage runs it, the collator that counts tokens, and the
run log (step log, loss sum, token counts, held-out losses) that checkpoints carry across a resume."""

from __future__ import annotations

import collections
import contextlib
import json
import resource
import shutil
import tempfile
import sys
import time
from pathlib import Path
from typing import Any

from qlora_pipeline import checkpoints, distributed
from qlora_pipeline.execution import summed_over_processes, world
from qlora_pipeline.packing import BOUNDARY_KEYS, runs_by_length

# The key under which a batch holds the passes that execute it.
PASSES = "passes"


class TokenCountingCollator:
    """An optimizer step's rows (in each process), collated as the passes that execute them, counting the real
    (non-padding), trained and computed tokens of each step.

    Passes: as many rows a pass as fit `max_tokens_per_pass` and `max_rows_per_pass` (packing.split_into_passes),
    each packed into one sequence (packing.pack) or padded (trl's collator). The batch holds them under
    PASSES, beside `labels` of the whole step, from which the Trainer counts the step's trained tokens (the
    loss normalization). Without `split`, a batch is one plain pass, as trl's own loss expects it.

    The data loader collates ahead of training, so a batch's counts wait in `pending` until the trainer
    takes the batch (`count_next`): the totals are those of the batches trained on, which a checkpoint
    can then record exactly. Trained tokens are the targets of the shifted loss (`labels[:, 1:]`)."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 1, packing: bool = False, split: bool = True,
                 max_tokens_per_pass: float = float("inf"), max_rows_per_pass: int = 2**31, segments: int | None = None,
                 by_length: bool = False):
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.packing = packing
        self.split = split
        self.max_tokens_per_pass = max_tokens_per_pass
        self.max_rows_per_pass = max_rows_per_pass
        self.segments = segments
        self.by_length = by_length   # padded passes: rows shortest first, a one-pass step as two (packing.runs_by_length)
        self.padded = DataCollatorForLanguageModeling(
            pad_token_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of if pad_to_multiple_of > 1 else None
        )
        self.pending: collections.deque[tuple[int, int, int, int]] = collections.deque()   # real, trained, computed tokens, passes
        self.real_tokens = 0
        self.trained_tokens = 0
        self.padded_tokens = 0
        self.passes = 0               # passes trained, in this process since the run (re)started

    def one_pass(self, examples) -> dict:
        from qlora_pipeline.packing import pack

        if self.packing:
            return pack(examples, self.pad_token_id, self.pad_to_multiple_of, self.segments)
        return self.padded(examples)

    def __call__(self, examples):
        import torch

        from qlora_pipeline.packing import sorted_passes, split_into_passes

        if not self.split:
            passes = [self.one_pass(examples)]
            batch = passes[0]
        else:
            lengths = [len(e["input_ids"]) for e in examples]
            if self.by_length:
                order, sizes = sorted_passes(lengths, self.max_tokens_per_pass, self.max_rows_per_pass)
                examples = [examples[i] for i in order]
            else:
                sizes = split_into_passes(lengths, self.max_tokens_per_pass, self.max_rows_per_pass, self.packing)
            starts = [sum(sizes[:i]) for i in range(len(sizes))]
            passes = [self.one_pass(examples[start:start + size]) for start, size in zip(starts, sizes)]
            # Each pass's labels, one row each: the Trainer counts labels[..., 1:] of every row, i.e. the targets.
            labels = [row for p in passes for row in p["labels"]]
            width = max(len(row) for row in labels)
            batch = {"labels": torch.stack([torch.nn.functional.pad(row, (0, width - len(row)), value=-100)
                                            for row in labels]), PASSES: passes}
        self.pending.append((
            sum(len(e["input_ids"]) for e in examples), sum(int((p["labels"][:, 1:] != -100).sum()) for p in passes),
            sum(p["input_ids"].numel() for p in passes), len(passes),
        ))
        return batch

    def count_next(self) -> None:
        real, trained, padded, passes = self.pending.popleft()
        self.passes += passes
        self.real_tokens += real
        self.trained_tokens += trained
        self.padded_tokens += padded


class RunLog:
    """What the pipeline itself keeps of a run: the step log, the loss sum, the token counts and the time
    spent. It is saved in every checkpoint, so a resumed run reports the whole run, not its last part."""

    def __init__(self, collator: TokenCountingCollator):
        self.collator = collator
        self.rows: list[dict] = []
        self.eval_rows: list[dict] = []   # held-out loss at the evaluation steps
        self.loss_sum = 0.0           # sum over optimizer steps of each step's loss
        self.last_logged_step = 0
        self.seconds_before = 0.0     # training time spent before the latest resume
        self.resumed_from_step = 0

    COUNTS = ("real_tokens", "trained_tokens", "padded_tokens")

    def token_counts(self) -> dict[str, int]:
        """Tokens trained on so far, by all processes (a collective call in a distributed run)."""
        return dict(zip(self.COUNTS, summed_over_processes([getattr(self.collator, n) for n in self.COUNTS])))

    def state(self, seconds: float) -> dict[str, Any]:
        return {"rows": self.rows, "eval_rows": self.eval_rows, "loss_sum": self.loss_sum,
                "last_logged_step": self.last_logged_step, "seconds": seconds, "token_counts": self.token_counts()}

    def restore(self, state: dict[str, Any], step: int) -> None:
        self.rows = state["rows"]
        self.eval_rows = state["eval_rows"]
        self.loss_sum = state["loss_sum"]
        self.last_logged_step = state["last_logged_step"]
        self.seconds_before = state["seconds"]
        self.resumed_from_step = step
        # The saved counts are totals over all processes: one process carries them on, the others add theirs.
        if world()[1] == 0:
            for name, count in state["token_counts"].items():
                setattr(self.collator, name, count)


class AllStepsDone(Exception):
    """Raised before a step when the run has none left (see RunLogCallback.on_step_begin)."""


def _run_log_callback(run_log: RunLog):
    from transformers import TrainerCallback

    class RunLogCallback(TrainerCallback):
        """Keeps one row per logged step (loss, learning rate, gradient norm, tokens seen, wall time) and
        saves the run log into each checkpoint."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            # Resumed from the checkpoint of the run's last step (cut off before its outputs were written): the
            # Trainer (transformers 5.24) would take one step more, past max_steps, before checking.
            if state.global_step >= state.max_steps:
                raise AllStepsDone

        def elapsed(self) -> float:
            return run_log.seconds_before + time.perf_counter() - self.start

        def on_step_end(self, args, state, control, **kwargs):
            # Log at every checkpoint and at the end, so the loss of every step reaches the run log
            # (the Trainer forgets the loss of steps it has not logged when it resumes).
            if control.should_save or state.global_step >= state.max_steps:
                control.should_log = True
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                run_log.loss_sum += logs["loss"] * (state.global_step - run_log.last_logged_step)
                run_log.last_logged_step = state.global_step
                run_log.rows.append({
                    "step": state.global_step,
                    "epoch": round(state.epoch or 0.0, 4),
                    "loss": round(logs["loss"], 6),
                    "learning_rate": logs.get("learning_rate"),
                    "grad_norm": round(float(logs["grad_norm"]), 6) if logs.get("grad_norm") is not None else None,
                    "tokens": run_log.token_counts()["real_tokens"],
                    "seconds": round(self.elapsed(), 3),
                })

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if metrics and "eval_loss" in metrics:
                run_log.eval_rows.append({"step": state.global_step, "loss": round(metrics["eval_loss"], 6)})

        def on_save(self, args, state, control, **kwargs):
            # Every process takes part (the token counts are summed over processes), so every process has
            # finished writing its part of the checkpoint before the main one marks it complete.
            run_state = run_log.state(self.elapsed())
            checkpoint = Path(args.output_dir) / f"{checkpoints.PREFIX}{state.global_step}"
            distributed.gather_to_first_machine(checkpoint)   # the other machines' random-number states
            if state.is_world_process_zero:
                checkpoints.save_state(checkpoint, run_state)

    return RunLogCallback()


def sft_trainer_class(collator: TokenCountingCollator, token_metrics: bool):
    """trl's SFTTrainer, telling `collator` of each batch it trains on. Without token_metrics, its loss is
    trl's own fused-head loss without the per-step entropy and token-accuracy metrics, whose `.item()`
    calls make every step wait for the GPU. With `graphed` set (a cuda_graphs.GraphedTrainingPass), each
    training pass replays a CUDA graph instead of running forward and backward eagerly."""
    from trl import SFTTrainer

    class SFTTrainerCountingTokens(SFTTrainer):
        graphed = None

        def training_step(self, model, inputs, num_items_in_batch=None):
            collator.count_next()
            if PASSES not in inputs:
                return super().training_step(model, inputs, num_items_in_batch)
            passes = inputs[PASSES]
            if num_items_in_batch is None:
                num_items_in_batch = sum((p["labels"][:, 1:] != -100).sum() for p in passes)
            # The loss of each pass is normalized by the step's trained tokens, so the passes' gradients add up
            # to the step's gradient; in a distributed run only the last pass all-reduces them.
            loss = 0
            for index, pass_inputs in enumerate(passes):
                if self.graphed is not None:   # one process (execution.graph_blockers)
                    model.train()
                    pass_inputs = self._prepare_inputs(pass_inputs)
                    boundaries = {key: pass_inputs[key] for key in BOUNDARY_KEYS if key in pass_inputs}
                    loss = loss + self.graphed(pass_inputs["input_ids"], pass_inputs["labels"], num_items_in_batch,
                                               boundaries)
                    continue
                last = index == len(passes) - 1
                with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                    loss = loss + super().training_step(model, pass_inputs, num_items_in_batch)
            return loss

        def evaluate(self, *args, **kwargs):
            # Held-out batches go through the same collator: their counts are not training's.
            waiting = len(collator.pending)
            try:
                return super().evaluate(*args, **kwargs)
            finally:
                while len(collator.pending) > waiting:
                    collator.pending.pop()

    if token_metrics:
        return SFTTrainerCountingTokens

    class SFTTrainerWithoutTokenMetrics(SFTTrainerCountingTokens):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            import torch

            if PASSES in inputs:   # a held-out batch: the mean over its trained tokens, pass by pass
                log_probs, tokens = 0, 0
                for pass_inputs in inputs[PASSES]:
                    if self.graphed is not None:
                        boundaries = {key: pass_inputs[key] for key in BOUNDARY_KEYS if key in pass_inputs}
                        negated = self.graphed.held_out(pass_inputs["input_ids"], pass_inputs["labels"], boundaries)
                        log_probs = log_probs - negated
                        tokens = tokens + (pass_inputs["labels"][:, 1:] != -100).sum()
                        continue
                    outputs = model(**pass_inputs, fused_lm_head=True)
                    log_probs, tokens = log_probs + outputs.log_probs.sum(), tokens + outputs.label_mask.sum()
                loss = -log_probs / torch.as_tensor(tokens).clamp(min=1)
                return (loss, None) if return_outputs else loss
            outputs = model(**inputs, fused_lm_head=True)
            num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
            loss = -outputs.log_probs.sum() / torch.as_tensor(num_tokens).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            return (loss, outputs) if return_outputs else loss

    return SFTTrainerWithoutTokenMetrics


def save_adapter(model, tokenizer, adapter_dir: Path, state_dict: dict | None = None) -> None:
    """The adapter and tokenizer, byte for byte the same for the same weights: peft keeps
    target_modules as a set and writes it in hash order, which differs from one process to the next.
    state_dict: the model's weights gathered from its shards (FSDP), else the model's own."""
    model.save_pretrained(adapter_dir, **({"state_dict": state_dict} if state_dict is not None else {}))
    tokenizer.save_pretrained(adapter_dir)
    config_file = Path(adapter_dir) / "adapter_config.json"
    config = json.loads(config_file.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def peak_reserved_mb(device: str) -> float | None:
    """Peak GPU memory the caching allocator held (None on the CPU): allocated memory plus its cached blocks."""
    import torch

    return round(torch.cuda.max_memory_reserved() / 2**20, 1) if device == "cuda" else None


def peak_memory_mb(device: str) -> float:
    import torch

    if device == "cuda":
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    # Peak resident set of this process (KiB on Linux).
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)




def fit(model, tokenizer, train_set, eval_set, params, run, optimizer: str, compute_dtype, device: str,
        num_processes: int, seed: int, checkpoint_dir: Path | None, resume_from: Path | None):
    """Train `model` (peft-wrapped) with the execution `run`; return (trainer state, run log, graphed pass, the
    model's weights gathered on the first process with FSDP, else None). An out-of-memory error leaves with the
    step it happened at (`qlora_step`), for the caller's fallback."""
    import torch
    from trl import SFTConfig

    # The trainer wants a directory of its own even when it saves no checkpoints.
    work_dir = Path(tempfile.mkdtemp(prefix="qlora-trainer-"))
    collator = TokenCountingCollator(
        tokenizer.pad_token_id, run.pad_to_multiple_of, run.packing, split=not params.token_metrics,
        # With FSDP every process must run as many passes as the others (each pass gathers the weights
        # together): passes bounded by rows only, held-out batches too (memory_plan.plan_step planned for that).
        max_tokens_per_pass=run.tokens_per_pass if run.sharding == "none" else float("inf"),
        max_rows_per_pass=run.rows_per_pass,
        segments=run.rows_per_step + 1 if run.packing else None,
        by_length=runs_by_length(run.cuda_graphs, run.packing),
    )
    run_log = RunLog(collator)
    if resume_from is not None:
        run_log.restore(checkpoints.load_state(resume_from), int(resume_from.name.removeprefix(checkpoints.PREFIX)))
    config = SFTConfig(
        output_dir=str(checkpoint_dir if params.checkpoint_every_steps else work_dir),
        num_train_epochs=params.epochs,
        max_steps=params.max_steps,
        # The Trainer takes a step's rows at once; the collator splits them into the passes that execute them.
        per_device_train_batch_size=run.rows_per_step,
        gradient_accumulation_steps=1,
        learning_rate=params.learning_rate,
        lr_scheduler_type=params.lr_scheduler,
        warmup_steps=params.warmup_ratio,  # a float < 1 is a fraction of the total steps
        optim=optimizer,
        weight_decay=params.weight_decay,
        max_grad_norm=params.max_grad_norm,
        gradient_checkpointing=False,      # the execution checkpoints the layers it planned (speedups.checkpoint_layers)
        bf16=compute_dtype == torch.bfloat16,
        fp16=compute_dtype == torch.float16,
        use_cpu=device == "cpu",
        ddp_backend=("gloo" if device == "cpu" else "nccl") if num_processes > 1 else None,
        ddp_find_unused_parameters=False,  # every LoRA weight gets a gradient every step
        logging_steps=params.log_every_steps,
        # The filter checks every pass's loss for NaN on the host, making each step wait for the GPU; a
        # non-finite loss is then reported as it is (and warned about) instead of replaced by an average.
        logging_nan_inf_filter=False,
        eval_strategy="steps" if params.eval_every_steps else "no",
        eval_steps=params.eval_every_steps or None,
        per_device_eval_batch_size=run.rows_per_step,
        prediction_loss_only=True,
        save_strategy="steps" if params.checkpoint_every_steps else "no",
        save_steps=params.checkpoint_every_steps or None,
        report_to="none",
        seed=seed,
        data_seed=seed,
        dataset_kwargs={"skip_prepare_dataset": True},
        remove_unused_columns=False,
        disable_tqdm=False,
        # Batches are copied to the GPU from pinned memory without waiting: a blocking copy would make the
        # CPU wait for every queued kernel first, so it could never prepare the next step during this one.
        dataloader_pin_memory=device == "cuda",
        accelerator_config={"non_blocking": device == "cuda"},
        **_fsdp_options(run),
    )
    sft_trainer = sft_trainer_class(collator, params.token_metrics)(
        model=model,
        args=config,
        train_dataset=train_set,
        eval_dataset=eval_set if params.eval_every_steps else None,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[_run_log_callback(run_log)],
    )
    # trl casts the LoRA weights of a quantized model to bfloat16, whatever the device and compute dtype.
    # Keep them float32 (peft's default): the optimizer then updates full-precision master weights, and
    # on a GPU autocast still runs the matmuls in the compute dtype. On the CPU, bfloat16 matmuls are slow.
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    if run.cuda_graphs:   # after the cast: the graphs' gradient buffers take the weights' dtype
        from qlora_pipeline.cuda_graphs import GraphedTrainingPass

        sft_trainer.graphed = GraphedTrainingPass(model, compute_dtype)
    if run.sharding == "fsdp":
        sft_trainer.accelerator.state.fsdp_plugin.mixed_precision_policy = fsdp_mixed_precision()
        gather_head_for_fused_loss(model)
        shard_decoder_layers(model)
    if resume_from is not None:
        print(f"train: resuming from {resume_from}", file=sys.stderr)
    try:
        sft_trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except AllStepsDone:   # the checkpoint's weights and state are loaded: they are the run's result
        pass
    except torch.OutOfMemoryError as exc:
        exc.qlora_step = sft_trainer.state.global_step - run_log.resumed_from_step
        raise
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    # Every process takes part in gathering the shards; the first gets the whole weights.
    gathered = sft_trainer.accelerator.get_state_dict(sft_trainer.model) if run.sharding == "fsdp" else None
    return sft_trainer.state, run_log, sft_trainer.graphed, gathered


def gather_head_for_fused_loss(model) -> None:
    """With FSDP, gather the LM head's weights for trl's fused head once the backbone has run, as the head's own
    forward would. Call on the peft model before the Trainer shards it (fully_shard keeps the module objects).

    Why: accelerate's fsdp2_prepare_model makes the output embeddings an FSDP unit of their own (its "tail"; on a
    peft model it finds no final norm to join them), and FSDP gathers a unit only in that unit's forward. trl's fused
    head reads lm_head.weight without calling lm_head, so the unit is never gathered; in a pass without gradient
    sync (accelerator.no_sync: every pass of a step but its last) the post-backward that the root runs for every
    unit then reads the gathered copy of each of the unit's parameters, which was never made: "AttributeError:
    'FSDPParam' object has no attribute '_unsharded_param'" (FSDPParam.to_accumulated_grad_if_needed, torch 2.11 and
    2.13, with the float32 reduce_dtype fit sets; the pass that reduces skips parameters never gathered). Gathered
    through FSDP's own unshard, the head is resharded by FSDP after the backward; it is held from the end of the
    backbone's forward to then, as the copy trl would otherwise gather itself. A forward without gradients (held-out
    passes) has no backward, so there it is resharded right after the forward."""
    import torch
    from torch.distributed.fsdp import FSDPModule

    causal_lm = model.get_base_model()
    head = causal_lm.get_output_embeddings()

    def gather(*_):
        if isinstance(head, FSDPModule):   # sharded once the Trainer has prepared the model
            head.unshard()

    def release(*_):
        if isinstance(head, FSDPModule) and not torch.is_grad_enabled():
            head.reshard()

    # trl's fused forward runs `base_model` (the backbone), then reads the head's weight.
    causal_lm.base_model.register_forward_hook(gather)
    model.register_forward_hook(release)


def fsdp_mixed_precision():
    """FSDP casts no parameter (the packed 4-bit weights stay as stored; autocast computes in the compute dtype, as
    without FSDP) and reduces gradients in float32, as DDP does."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(reduce_dtype=torch.float32)


# A layer's gathered weights are freed after its forward and gathered again for its backward: one layer's whole
# weights at a time instead of every layer's.
RESHARD_AFTER_FORWARD = True


def shard_decoder_layers(model) -> int:
    """Shard the decoder layers (the FSDP units _fsdp_options names) one after the other, each freeing its whole
    weights as it goes; the Trainer's accelerate then shards the rest (embeddings, head, root) and leaves these as
    they are. Returns how many layers were sharded. A model loaded on the CPU (memory_plan: loads_on_cpu) has each
    layer moved to this process's GPU by fully_shard itself as it shards it (bitsandbytes' Params4bit.to moves the
    quantization state with the packed weight): the GPU holds the shards so far and one whole layer.

    Why not leave them to accelerate: its fsdp2_prepare_model holds the model's whole state dict while it shards
    (for a low-memory loading it skips for 4-bit weights), so every process held the whole model and all its shards
    at once: 7.4 GiB at peak on the 8 B shape, whose sharded step was planned at 5.6 GiB
    (bench/results/sharded_scaling-2026-11-29T0104-2xNVIDIA_H200.json)."""
    from torch.distributed.fsdp import fully_shard

    from qlora_pipeline.speedups import decoder_layers

    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, reshard_after_forward=RESHARD_AFTER_FORWARD, mp_policy=fsdp_mixed_precision())
    return len(layers)


def _fsdp_options(run) -> dict[str, Any]:
    """The Trainer's FSDP settings for a sharded run (accelerate's FSDP2 plugin): each decoder layer a unit,
    resharded after its forward; checkpoints hold the whole adapter and optimizer state, written by the first
    process (FULL_STATE_DICT: no shared filesystem needed between machines). Not FSDP's activation
    checkpointing: accelerate wraps the layers without restoring the random state in the recompute, so LoRA
    dropout would draw other masks there; the layers the plan checkpoints keep the pipeline's checkpointing
    (speedups.checkpoint_layers), which restores it."""
    if run.sharding != "fsdp":
        return {}
    # NO_WRAP: the decoder layers are units already (shard_decoder_layers); accelerate would look their class
    # up by name, which fully_shard has changed.
    return {"fsdp": True, "fsdp_config": {
        "version": 2, "auto_wrap_policy": "NO_WRAP", "reshard_after_forward": RESHARD_AFTER_FORWARD,
        "state_dict_type": "FULL_STATE_DICT", "activation_checkpointing": False,
        "cpu_ram_efficient_loading": False,
    }}
