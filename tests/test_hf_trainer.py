"""Hugging Face Trainer with roundpipe's AdamW (issue 14, item 3).

A tiny GPT-2 built from a config (nothing downloaded) is fine-tuned on synthetic tokens for a few
steps, with roundpipe.optim.AdamW handed to transformers.Trainer both ways it accepts an optimizer:
a built one (`optimizers=(opt, None)`) and a class (`optimizer_cls_and_kwargs`). Each run must equal,
bit for bit, the same run with torch.optim.AdamW(fused=True) handed over the same way: every logged
record, every step's exact loss, and the final weights. Trainer's own linear schedule, its decay and
no-decay param groups and its grad clipping all run in between.

Needs the `hf` extra (transformers, accelerate); skipped without it.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from conftest import assert_bits_equal

import roundpipe.optim

STEPS = 6
SEQ = 16
VOCAB = 96
OPT_KWARGS = {"lr": 5e-3, "betas": (0.9, 0.98), "eps": 1e-8, "weight_decay": 0.05}
# Trainer's records that measure time, not training.
TIMING_KEYS = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "epoch_time"}


class Tokens(torch.utils.data.Dataset):
    """Synthetic language-model samples: random tokens with a repeated pattern worth learning."""

    def __init__(self, n: int) -> None:
        gen = torch.Generator().manual_seed(1234)
        base = torch.randint(0, VOCAB, (n, SEQ // 2), generator=gen)
        self.ids = torch.cat([base, base], dim=1)  # the second half repeats the first

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class RecordingTrainer(transformers.Trainer):
    """Keeps each training step's exact loss (Trainer's logs round it to 4 digits)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.step_losses: list[torch.Tensor] = []

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        self.step_losses.append(loss.detach().clone())
        return loss


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=SEQ,
                                     resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    return transformers.GPT2LMHeadModel(config)


def fine_tune(tmp_path, optimizer_cls: type, kwargs: dict, way: str) -> RecordingTrainer:
    """Fine-tune a fresh tiny GPT-2 for STEPS steps, the optimizer passed `way`."""
    model = tiny_gpt2()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / way), use_cpu=True, report_to="none", save_strategy="no",
        per_device_train_batch_size=4, max_steps=STEPS, logging_steps=1, seed=0, data_seed=0,
        learning_rate=kwargs["lr"], weight_decay=kwargs["weight_decay"], warmup_steps=0,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    if way == "optimizers":
        opt = optimizer_cls(model.parameters(), **kwargs)
        trainer = RecordingTrainer(model=model, args=args, train_dataset=Tokens(32), optimizers=(opt, None))
    else:
        trainer = RecordingTrainer(model=model, args=args, train_dataset=Tokens(32),
                                   optimizer_cls_and_kwargs=(optimizer_cls, kwargs))
    trainer.train()
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    assert type(inner) is optimizer_cls, type(inner)
    return trainer


def training_logs(trainer: RecordingTrainer) -> list[dict]:
    return [{k: v for k, v in rec.items() if k not in TIMING_KEYS} for rec in trainer.state.log_history]


@pytest.mark.parametrize("way", ["optimizers", "optimizer_cls_and_kwargs"])
def test_trainer_matches_torch_fused_adamw(tmp_path, way):
    ours = fine_tune(tmp_path / "roundpipe", roundpipe.optim.AdamW, OPT_KWARGS, way)
    ref = fine_tune(tmp_path / "torch", torch.optim.AdamW, {**OPT_KWARGS, "fused": True}, way)

    assert len(ours.step_losses) == len(ref.step_losses) == STEPS
    for i, (a, b) in enumerate(zip(ours.step_losses, ref.step_losses, strict=True)):
        assert_bits_equal(a, b, f"loss of step {i}")
    logs = training_logs(ours)
    assert logs == training_logs(ref)
    assert sum("loss" in rec for rec in logs) == STEPS, logs

    start = tiny_gpt2().state_dict()
    final, ref_final = ours.model.state_dict(), ref.model.state_dict()
    assert final.keys() == ref_final.keys()
    moved = 0
    for name in final:
        assert_bits_equal(final[name], ref_final[name], name)
        moved += not torch.equal(final[name], start[name])
    assert moved > len(final) // 2, "training barely changed the weights: the comparison would be vacuous"
