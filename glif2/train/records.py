"""A run's records on disk: metrics.jsonl, glif_params.jsonl and TensorBoard scalars (rank 0 only).

- metrics.jsonl: one JSON object per line; {"kind": "train", epoch, step, loss, acc, lr, images_per_s} at every log
  point and {"kind": "epoch", epoch, step, train_loss, train_acc, test_loss, test_acc, test_top5, best_acc, lr,
  seconds} after each epoch (accuracies in percent, epoch counted from 1); with --report the epoch line also has
  test_firing_rate, test_sops, test_macs and test_energy_uj (per test sample, glif2.cost).
- glif_params.jsonl: the learned neuron parameters over training, one line per record: {"epoch": completed epochs
  (0 = at initialisation), "step": int, "layers": {layer: {quantity: {"mean", "std", "min", "q25", "median", "q75",
  "max"}}}} with quantity in alpha, beta, gamma, tau, v_th, leak, v_reset, conduct (effective values, over the
  layer's channels; conduct over all `t c` entries).
- tb/: TensorBoard scalars (train/loss, train/acc, train/images_per_s, test/loss, test/acc, test/top5, lr/<group>;
  with --report test/firing_rate, test/sops, test/macs, test/energy_uj).
"""

import json
from pathlib import Path
from typing import Any

from torch import nn

from glif2.analysis import parameter_summary


def neuron_record(model: nn.Module, epoch: int, step: int) -> dict[str, Any]:
    """One glif_params.jsonl line: per layer, per quantity, summary statistics of the effective values."""
    return {"epoch": epoch, "step": step, "layers": parameter_summary(model)}


class Logger:
    """Rank 0's outputs: the JSONL files and TensorBoard (other ranks get a logger that writes nothing).

    A fresh run (keep_until None) creates the files and never opens existing ones (the caller gives it a folder of
    its own); a resumed one keeps the records up to step `keep_until` and appends (those written after the
    checkpoint, before the interruption, are replayed by this run).
    """

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, keep_until: int | None):
        self.enabled, self.tb = enabled, None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = self._open(run_dir / "metrics.jsonl", keep_until)
        self.params = self._open(run_dir / "glif_params.jsonl", keep_until)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("tensorboard is not installed (pip install 'glif2[train]'): no TensorBoard scalars", flush=True)
            else:
                self.tb = SummaryWriter(str(run_dir / "tb"))

    @staticmethod
    def _open(path: Path, keep_until: int | None):
        if keep_until is None:
            return open(path, "x")  # "x": never truncate a file that exists (another run's records)
        kept = []
        if path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= keep_until]
        path.write_text("".join(line + "\n" for line in kept))
        return open(path, "a")

    def log(self, record: dict[str, Any], scalars: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        if self.tb is not None:
            for tag, value in scalars.items():
                self.tb.add_scalar(tag, value, step)
            self.tb.flush()

    def log_params(self, record: dict[str, Any]) -> None:
        if self.enabled:
            self.params.write(json.dumps(record) + "\n")
            self.params.flush()

    def close(self) -> None:
        if self.enabled:
            self.metrics.close()
            self.params.close()
            if self.tb is not None:
                self.tb.close()


__all__ = ["Logger", "neuron_record"]
