"""LaSNN distillation trainer: ANN teacher -> small SNN student (attention maps + logit KD).

Programmatic API (the command line ``lasnn train-teacher`` / ``train-snn`` / ``distill`` calls the same)::

    from lasnn.distill import train_teacher, train_snn, distill, load_run
    t = train_teacher(out="runs/teacher", dataset="mnist1d", epochs=30)           # -> final metrics dict
    d = train_snn(out="runs/direct", dataset="mnist1d", T=4, epochs=30)           # the baseline: no teacher
    s = distill(out="runs/student", dataset="mnist1d", teacher="runs/teacher", T=4,
                schedule="layerwise", epochs=30)                                   # -> final metrics dict
    run = load_run("runs/student")        # Run(model=SNN in eval mode, config, dataset, kind, metrics, ...)

Every run folder holds ``config.json`` (the full ``TeacherConfig``/``SNNConfig``/``DistillConfig``), ``metrics.jsonl``
(one JSON line per epoch: stage, lr, train loss and its parts ce/kd/attn, train/test accuracy, test
loss, student firing rate, seconds), ``last.pt`` (everything an exact resume needs), ``best.pt`` (weights
of the epoch with the best test accuracy) and ``curves.png``. Checkpoints are written atomically and
read with ``torch.load(weights_only=True)``.

Loss (``train_snn``): ``CE(mean_t logits)``, surrogate-gradient BPTT through the T steps.
Loss (``distill``): ``CE(mean_t logits) + kd_weight * KD_tau(teacher) + beta * sum_pairs attention_loss``.
Schedules: ``layerwise`` trains, for each layer pair k in turn, the student up to block k on pair k's
attention loss (earlier blocks frozen, or at ``earlier_lr_scale`` x lr with ``earlier="lr"``), then the
whole student on all terms; ``joint`` uses all terms from the start. Optimiser: SGD (momentum 0.9, weight
decay 5e-4) with a per-step cosine schedule restarting at each stage; bf16 autocast on CUDA.

Under ``torchrun`` the same calls train with DistributedDataParallel (gloo on CPU, nccl on GPU): each
process reads its shard of every batch order, metrics are summed over processes, only rank 0 writes.
"""

from lasnn.distill.checkpoint import CheckpointError, load_checkpoint
from lasnn.distill.config import DistillConfig, SNNConfig, TeacherConfig
from lasnn.distill.trainer import Run, RunError, distill, load_run, plan_stages, train_snn, train_teacher

__all__ = [
    "CheckpointError",
    "DistillConfig",
    "Run",
    "RunError",
    "SNNConfig",
    "TeacherConfig",
    "distill",
    "load_checkpoint",
    "load_run",
    "plan_stages",
    "train_snn",
    "train_teacher",
]
