"""LightningDataModule over a tokenized stream: seeded split, step-addressed training order."""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader, Subset

from altup_cli.data.tokens import PackedSequences, StepBatchSampler, TokenStream, split_indices
from altup_cli.errors import UserError


class PackedTextDataModule(L.LightningDataModule):
    def __init__(
        self,
        stream: TokenStream,
        seq_len: int,
        batch_size: int,
        val_fraction: float,
        seed: int,
        max_steps: int,
        accumulate_grad_batches: int = 1,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.dataset = PackedSequences(stream, seq_len)
        if len(self.dataset) < 2:
            raise UserError(
                f"data: {stream.n_tokens} tokens make fewer than 2 sequences of length {seq_len}"
            )
        self.train_indices, self.val_indices = split_indices(len(self.dataset), val_fraction, seed)
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self.accumulate = accumulate_grad_batches
        self.total_batches = max_steps * accumulate_grad_batches

    def train_dataloader(self) -> DataLoader:
        # Lightning restores the loop state before asking for the loader, so on resume
        # global_step is the checkpoint's and the order continues where it stopped.
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        start = trainer.global_step * self.accumulate if trainer else 0
        sampler = StepBatchSampler(
            self.train_indices, self.batch_size, self.total_batches, self.seed, rank, world, start
        )
        return DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        # Each rank evaluates a strided shard; `sync_dist` averages the losses.
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        subset = Subset(self.dataset, self.val_indices[rank::world])
        return DataLoader(subset, batch_size=self.batch_size, num_workers=self.num_workers)
