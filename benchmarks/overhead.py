"""Training-step time with recording versus without, measured side by side in one process.

Three parts, each a ratio of median step times (recording / plain) measured in the same process,
with the configurations alternating in blocks of steps (Lightning: whole short fits) so that the
machine's load falls on both. A recorded step's time includes the background writer's work on it:
at the end of each block (fit) the benchmark waits until the writer has taken in every step and
spreads that wait over the block's steps. Shard files are written every 256 steps and at the end
of a run, outside the timed steps, so the writer's CPU time on them, per step, is added to the
recorded step: on a machine whose cores training uses, training shares that cost.

- loop: a hand-written training loop (GradientRecorder, projection 1024, shards written) on
  an MLP 784-512-512-10 (batch 64), an MLP 1024-2048-2048-100 (batch 64) and a 4-layer GPT-2
  (width 256, 4 heads, sequence 64, vocabulary 2048, batch 16, random weights from a config).
  When dattri is installed, a third column runs dattri's DVEmbAttributor capture
  (`cache_gradients`, Kronecker factorization, the same proj_dim) at every step of the same loop.
  Targets: <= 1.25 (small MLP), <= 1.10 (wide MLP, GPT-2).
- lightning: the same Lightning training alternately with and without InfluenceCallback
  (projection 1024) on an MLP 784-1024-1024-10 (batch 128), a small CNN (batch 64) and a 2-layer
  GPT-2 (width 128, batch 16). Target: <= 1.15.
- scaling: the hand-written loop on MLPs 784-W-W-10 over width W x batch x projection k, with the
  added milliseconds per step, to show how the cost grows.

    python benchmarks/overhead.py                          # everything (about 5 minutes on 2 cores)
    python benchmarks/overhead.py --parts loop --models small,wide
    python benchmarks/overhead.py --quick                  # fewer steps, for a smoke run
    python benchmarks/overhead.py --out benchmarks/results/overhead.md
"""

from __future__ import annotations

import argparse
import copy
import io
import os
import statistics
import sys
import tempfile
import time
import warnings
from contextlib import redirect_stdout
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from influence_hooks import GradientRecorder

warnings.filterwarnings("ignore")

LOOP_TARGETS = {"small": 1.25, "wide": 1.10, "gpt2": 1.10}
LIGHTNING_TARGET = 1.15
PROJECTION = 1024
LEGEND = ("recorded ms = median step time with recording, measured side by side with plain in this process,\n"
          "the writer thread's work on the steps included (waited for at the end of each block and spread over\n"
          "its steps); shards ms = the writer's CPU ms per step on shard files over the whole run (one every 256\n"
          "steps and one at the end; not in the timed steps); ratio = (recorded + shards) / plain: on a machine\n"
          "whose cores training uses, training shares the writer's time; rounds = the lowest and the highest\n"
          "ratio of a single round (one block of each configuration, back to back), which shows how far the\n"
          "machine's speed moved during the measurement.")


# ---------------------------------------------------------------------------- models
@dataclass
class Task:
    """A model, its data and its loss: everything one training configuration needs."""

    name: str
    make_model: Callable[[], nn.Module]
    inputs: torch.Tensor
    targets: torch.Tensor
    batch: int
    loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
    describe: str


def mlp(widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def classify(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


def mlp_task(name: str, widths: list[int], batch: int, n: int = 4096) -> Task:
    torch.manual_seed(0)
    net = mlp(widths)
    x, y = torch.randn(n, widths[0]), torch.randint(0, widths[-1], (n,))
    return Task(name, lambda: copy.deepcopy(net), x, y, batch, classify,
                f"MLP {'-'.join(map(str, widths))}, batch {batch}")


def gpt2_config(width: int, layers: int, heads: int):
    from transformers import GPT2Config
    return GPT2Config(vocab_size=2048, n_positions=64, n_embd=width, n_layer=layers, n_head=heads,
                      attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)


def gpt2_task(n: int = 4096) -> Task:
    from transformers import GPT2LMHeadModel
    torch.manual_seed(0)
    net = GPT2LMHeadModel(gpt2_config(256, 4, 4))
    tokens = torch.randint(0, 2048, (n, 64))
    return Task("gpt2", lambda: copy.deepcopy(net), tokens, tokens, 16,
                lambda m, x, y: m(input_ids=x, labels=y).loss,
                "GPT-2 4 layers, width 256, sequence 64, batch 16")


OPTIMIZER = "sgd"  # the hand-written loop's (--optimizer)

LOOP_TASKS = {
    "small": lambda: mlp_task("small", [784, 512, 512, 10], 64),
    "wide": lambda: mlp_task("wide", [1024, 2048, 2048, 100], 64),
    "gpt2": gpt2_task,
}


# ---------------------------------------------------------------------------- hand-written loop
class Trainer:
    """One configuration of the hand-written loop: its own copy of the model and optimizer, and
    a recorder or dattri's capture (or nothing). `run(batches)` returns each step's wall time."""

    def __init__(self, task: Task, kind: str, run_dir: str, k: int = PROJECTION):
        self.task, self.kind = task, kind
        self.model = task.make_model()
        self.opt = (torch.optim.AdamW(self.model.parameters(), lr=1e-3) if OPTIMIZER == "adamw"
                    else torch.optim.SGD(self.model.parameters(), lr=0.01))
        self.rec = None
        self.dattri = None
        if kind == "record":
            self.rec = GradientRecorder(run_dir, self.model, projection=k, overwrite=True, verbose=False)
        elif kind == "dattri":
            self.dattri = dattri_capture(self.model, task, k)

    def run(self, batches: list[torch.Tensor]) -> list[float]:
        t, times = self.task, []
        for ids in batches:
            x, y = t.inputs[ids], t.targets[ids]
            t0 = time.perf_counter()
            if self.dattri is not None:  # its own forward and backward at w_t, before the step's
                self.dattri.cache_gradients(0, (x, y), ids, 0.01)
                self.opt.zero_grad()
            if self.rec is not None:
                self.rec.begin_micro_batch(ids)
            t.loss(self.model, x, y).backward()
            if self.rec is not None:
                self.rec.end_step(self.opt)
            self.opt.step()
            self.opt.zero_grad()
            times.append(time.perf_counter() - t0)
        if self.rec is not None and self.rec.writer is not None:
            # the writer thread's share: what it has not done by the end of the block is waited
            # for here and spread over the block's steps, so that no writing is left for the next
            # configuration's block to absorb
            t0 = time.perf_counter()
            self.rec.writer.drain()
            wait = time.perf_counter() - t0
            times = [t + wait / len(times) for t in times]
        return times

    def close(self) -> None:
        if self.rec is not None:
            self.rec.finish()


def dattri_capture(model: nn.Module, task: Task, k: int):
    """dattri's DVEmbAttributor set up to capture projected per-sample gradients of every
    nn.Linear with its Kronecker factorization and proj_dim k (None when it cannot)."""
    from dattri.algorithm.dvemb import DVEmbAttributor
    from dattri.task import AttributionTask

    if not any(isinstance(m, nn.Linear) for m in model.modules()):
        return None

    def loss(m, data, device):
        x, y = data
        return task.loss(m, x.to(device), y.to(device))

    att = DVEmbAttributor(AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict()),
                          proj_dim=k, factorization_type="kronecker")
    return att


def has_dattri() -> bool:
    try:
        import dattri.algorithm.dvemb  # noqa: F401
    except ImportError:
        return False
    return True


def alternate(trainers: dict[str, Trainer], task: Task, steps: int, rounds: int, warmup: int = 3,
              seed: int = 0) -> dict[str, list[float]]:
    """Per-step times of each trainer over `rounds` blocks of `steps` steps, the trainers taking
    turns block by block (the first `warmup` steps of each trainer are dropped). Every trainer sees
    the same batches."""
    g = torch.Generator().manual_seed(seed)
    n = len(task.inputs)
    batches = [torch.randperm(n, generator=g)[:task.batch] for _ in range(warmup + steps * rounds)]  # no repeats in a batch
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for name, tr in trainers.items():
        tr.run(batches[:warmup])
    for r in range(rounds):
        block = batches[warmup + r * steps:warmup + (r + 1) * steps]
        order = list(trainers) if r % 2 == 0 else list(reversed(trainers))
        for name in order:
            times[name] += trainers[name].run(block)
    return times


def ms(ts: list[float]) -> float:
    return 1000 * statistics.median(ts)


def round_range(plain: list[float], recorded: list[float], steps: int, extra_ms: float = 0.0) -> str:
    """'lo-hi': the lowest and highest ratio (recorded + extra_ms) / plain of a single round, the
    lists holding `steps` step times of each round in turn."""
    ratios = [(ms(recorded[i:i + steps]) + extra_ms) / ms(plain[i:i + steps]) for i in range(0, len(plain), steps)]
    return f"{min(ratios):.2f}-{max(ratios):.2f}"


def shard_ms(rec: GradientRecorder) -> float:
    """CPU milliseconds per step the recorder's background writer spent on shard files over its whole
    (closed) run. The timed steps do not include it (a shard is written every 256 steps, and at the
    end of a run), and on a machine whose cores training uses, training shares that cost: the
    ratios add it to the recorded step."""
    return 1000 * rec.writer.shard_cpu_seconds / max(rec.stats.steps, 1)


def loop_part(models: list[str], steps: int, rounds: int, with_dattri: bool, tmp: str) -> list[str]:
    lines = [f"Hand-written loop: GradientRecorder(projection={PROJECTION}), shards written, optimizer "
             f"{'AdamW (the recorder also stores Adam' + chr(39) + 's step sizes)' if OPTIMIZER == 'adamw' else 'SGD'}; "
             f"{steps} steps x {rounds} rounds per configuration, alternating",
             ("dattri: DVEmbAttributor.cache_gradients (factorization 'kronecker', proj_dim "
              f"{PROJECTION}) before each step" if with_dattri else "dattri: not run (not installed, or --no-dattri)"), "",
             f"{'model':<6} {'plain ms':>9} {'recorded ms':>12} {'shards ms':>10} {'ratio':>6} {'rounds':>9} {'target':>7}"
             f" {'met':>4}" + (f" {'dattri ms':>10} {'ratio':>6}" if with_dattri else "") + "  description"]
    for name in models:
        task = LOOP_TASKS[name]()
        trainers = {"plain": Trainer(task, "plain", ""),
                    "record": Trainer(task, "record", f"{tmp}/loop-{name}")}
        if with_dattri:
            d = Trainer(task, "dattri", "")
            if d.dattri is not None and name != "gpt2":  # GPT-2's layers are Conv1D, not nn.Linear
                trainers["dattri"] = d
        times = alternate(trainers, task, steps, rounds)
        for tr in trainers.values():
            tr.close()
        a, b, sh = ms(times["plain"]), ms(times["record"]), shard_ms(trainers["record"].rec)
        target, ratio = LOOP_TARGETS[name], (b + sh) / a
        spread = round_range(times["plain"], times["record"], steps, sh)
        line = (f"{name:<6} {a:>9.2f} {b:>12.2f} {sh:>10.2f} {ratio:>6.3f} {spread:>9} {target:>7.2f}"
                f" {'yes' if ratio <= target else 'NO':>4}")
        if with_dattri:
            if "dattri" in times:
                c = ms(times["dattri"])
                line += f" {c:>10.2f} {c / a:>6.3f}"
            else:
                line += f" {'n/a':>10} {'':>6}"
        lines.append(line + f"  {task.describe}")
        print(lines[-1], flush=True)
    if with_dattri and "gpt2" in models:
        lines.append("dattri n/a for GPT-2: its Kronecker capture hooks nn.Linear only, and GPT-2's "
                     "layers are transformers' Conv1D.")
    return lines


# ---------------------------------------------------------------------------- Lightning
def lightning_part(models: list[str], steps: int, rounds: int, tmp: str) -> list[str]:
    import logging

    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from influence_hooks import InfluenceCallback

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no banner at each of the many fits

    class StepTimer(L.Callback):
        """Wall time of each training batch: forward, backward, hooks, optimizer step."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self.drain = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self._t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.times.append(time.perf_counter() - self._t0)
            if trainer.global_step >= trainer.max_steps:  # the last step: wait for the writer
                rec = next((c.recorder for c in trainer.callbacks if isinstance(c, InfluenceCallback)), None)
                if rec is not None and rec.writer is not None:
                    t0 = time.perf_counter()
                    rec.writer.drain()
                    self.drain = time.perf_counter() - t0

    class Classifier(L.LightningModule):
        def __init__(self, net: nn.Module):
            super().__init__()
            self.net = net

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    class LanguageModel(L.LightningModule):
        def __init__(self, config):
            super().__init__()
            from transformers import GPT2LMHeadModel
            self.net = GPT2LMHeadModel(config)

        def training_step(self, batch, batch_idx):
            (tokens,) = batch
            return self.net(input_ids=tokens, labels=tokens).loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    def setup(name: str, n: int = 4096):
        torch.manual_seed(0)
        if name == "mlp":
            net = nn.Sequential(nn.Flatten(), mlp([784, 1024, 1024, 10]))
            data = TensorDataset(torch.randn(n, 1, 28, 28), torch.randint(0, 10, (n,)))
            return (lambda: Classifier(copy.deepcopy(net))), data, 128, "MLP 784-1024-1024-10, batch 128"
        if name == "cnn":
            net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                nn.Flatten(), nn.Linear(64 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, 10))
            data = TensorDataset(torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,)))
            return (lambda: Classifier(copy.deepcopy(net))), data, 64, "CNN 3x32x32, 2 convs + 2 linear, batch 64"
        cfg = gpt2_config(128, 2, 4)
        data = TensorDataset(torch.randint(0, 2048, (n, 64)))
        return (lambda: LanguageModel(cfg)), data, 16, "GPT-2 2 layers, width 128, sequence 64, batch 16"

    def time_training(make_module, data, batch_size: int, record: bool, run_dir: str) -> list[float]:
        torch.manual_seed(0)
        timer = StepTimer()
        callbacks: list = [timer]
        if record:
            callbacks.append(InfluenceCallback(run_dir, projection=PROJECTION, overwrite=True, verbose=False))
        trainer = L.Trainer(max_steps=steps + 3, callbacks=callbacks, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                            num_sanity_val_steps=0)
        with redirect_stdout(io.StringIO()):
            trainer.fit(make_module(), DataLoader(data, batch_size=batch_size, shuffle=True))
        # the writer thread's work on this run's steps, waited for after the last one, is spread
        # over the timed steps; the shard written when training ends is added per step as its CPU time
        times = timer.times[3:]  # the first steps warm up allocators and caches
        if record:
            shards.append(shard_ms(next(c for c in callbacks if isinstance(c, InfluenceCallback)).recorder))
        return [t + timer.drain / len(times) for t in times]

    lines = [f"Lightning: InfluenceCallback(projection={PROJECTION}) versus none; {steps} steps x {rounds} "
             "rounds per configuration, alternating", "",
             f"{'model':<6} {'plain ms':>9} {'recorded ms':>12} {'shards ms':>10} {'ratio':>6} {'rounds':>9} {'target':>7}"
             f" {'met':>4}  description"]
    for name in models:
        make_module, data, bs, describe = setup(name)
        without, with_cb, shards = [], [], []
        for r in range(rounds):
            for record in ((False, True) if r % 2 == 0 else (True, False)):
                ts = time_training(make_module, data, bs, record, f"{tmp}/lightning-{name}")
                (with_cb if record else without).extend(ts)
        a, b, sh = ms(without), ms(with_cb), statistics.median(shards)
        ratio = (b + sh) / a
        met = "yes" if ratio <= LIGHTNING_TARGET else "NO"
        spread = round_range(without, with_cb, steps, sh)  # a round: one fit of each
        lines.append(f"{name:<6} {a:>9.2f} {b:>12.2f} {sh:>10.2f} {ratio:>6.3f} {spread:>9} {LIGHTNING_TARGET:>7.2f}"
                     f" {met:>4}  {describe}")
        print(lines[-1], flush=True)
    return lines


# ---------------------------------------------------------------------------- scaling
def scaling_part(widths: list[int], batches: list[int], ks: list[int], steps: int, rounds: int,
                 tmp: str) -> list[str]:
    lines = ["Scaling (hand-written loop, MLP 784-W-W-10): added = recorded (shard files included) - plain, per step", "",
             f"{'width':>6} {'batch':>6} {'k':>6} {'plain ms':>9} {'recorded ms':>12} {'added ms':>9} {'ratio':>6}"]
    for w in widths:
        for b in batches:
            task = mlp_task(f"mlp{w}", [784, w, w, 10], b)
            for k in ks:
                trainers = {"plain": Trainer(task, "plain", ""),
                            "record": Trainer(task, "record", f"{tmp}/scale-{w}-{b}-{k}", k=k)}
                times = alternate(trainers, task, steps, rounds)
                trainers["record"].close()
                a, r = ms(times["plain"]), ms(times["record"]) + shard_ms(trainers["record"].rec)
                lines.append(f"{w:>6} {b:>6} {k:>6} {a:>9.2f} {r:>12.2f} {r - a:>9.2f} {r / a:>6.3f}")
                print(lines[-1], flush=True)
    return lines


# ---------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="loop,lightning,scaling", help="comma list of loop, lightning, scaling")
    ap.add_argument("--models", default=None,
                    help="loop: small,wide,gpt2; lightning: mlp,cnn,gpt2 (default: all of the part's)")
    ap.add_argument("--quick", action="store_true", help="fewer steps and rounds, for a smoke run")
    ap.add_argument("--steps", type=int, default=None, help="steps per block")
    ap.add_argument("--rounds", type=int, default=None, help="blocks per configuration")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--no-dattri", action="store_true", help="leave out dattri's column")
    ap.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd",
                    help="the hand-written loop's optimizer (adamw: the recorder also stores Adam's step sizes)")
    ap.add_argument("--out", default=None, help="also write the tables to this markdown file")
    args = ap.parse_args()
    global OPTIMIZER
    OPTIMIZER = args.optimizer
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = args.parts.split(",")
    steps = args.steps or (6 if args.quick else 20)
    rounds = args.rounds or (2 if args.quick else 8)
    load = os.getloadavg()
    head = (f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
            f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at the start")
    print(head, flush=True)
    sections = []
    with tempfile.TemporaryDirectory() as tmp:
        if "loop" in parts:
            models = args.models.split(",") if args.models else list(LOOP_TASKS)
            sections.append(loop_part([m for m in models if m in LOOP_TASKS], steps, rounds,
                                      has_dattri() and not args.no_dattri, tmp))
        if "lightning" in parts:
            models = args.models.split(",") if args.models else ["mlp", "cnn", "gpt2"]
            sections.append(lightning_part([m for m in models if m in ("mlp", "cnn", "gpt2")],
                                           2 * steps, rounds, tmp))
        if "scaling" in parts:
            quick = args.quick
            sections.append(scaling_part([256, 1024] if quick else [256, 1024, 2048],
                                         [16, 256] if quick else [16, 64, 256],
                                         [256, 4096] if quick else [256, 1024, 4096],
                                         max(4, steps // 2), max(2, rounds // 2), tmp))
    load = os.getloadavg()
    tail = f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at the end"
    print(tail)
    print("\n" + LEGEND)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"# benchmarks/overhead.py ({time.strftime('%Y-%m-%d')})\n\n")
            f.write(f"`python benchmarks/overhead.py {' '.join(sys.argv[1:])}`\n\n```\n{head}\n")
            for s in sections:
                f.write("\n" + "\n".join(s) + "\n")
            f.write(f"\n{tail}\n{LEGEND}\n```\n")


if __name__ == "__main__":
    main()
