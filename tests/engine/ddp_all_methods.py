"""Run under `torchrun --nproc-per-node=2` by tests/engine/test_ddp.py: every method, one launch (a launch costs
seconds; a method's two iterations cost less). Each rank draws different batches, so the ranks' students
agree after training only if DDP averaged the gradients (and the data-free sources their own).

    torchrun --standalone --nproc-per-node=2 tests/engine/ddp_all_methods.py WORKDIR TEACHER_CKPT AUX_DIR
Rank 0 writes WORKDIR/ddp_methods.json: {method: {"max_rank_difference": float, "loss": float, ...}}.
"""
import dataclasses
import gc
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as tdist  # noqa: E402

from engine.config import Config  # noqa: E402
from engine.dist import cleanup, init_distributed  # noqa: E402
from engine.methods import METHODS  # noqa: E402
from engine.trainer import Trainer  # noqa: E402


def config(work, method, teacher, aux):
    cfg = Config()
    cfg.model = dataclasses.replace(cfg.model, teacher="pspnet_tiny", student="pspnet_tiny", teacher_ckpt=teacher)
    cfg.data = dataclasses.replace(cfg.data, crop=(32, 32), batch_size=2, workers=0, val_size=2, loader="torch")
    cfg.method = dataclasses.replace(cfg.method, method=method, gen_size=(32, 32), gen_batch=2, gen_every=1,
                                     aux_data=aux, ads_batch=4)
    cfg.optim = dataclasses.replace(cfg.optim, iters=2)
    cfg.run = dataclasses.replace(cfg.run, out=str(Path(work) / method), eval_interval=0, log_interval=1,
                                  resume="none", device="cpu")
    return cfg


def main(work, teacher, aux):
    env = init_distributed("cpu")
    methods = [m for m in METHODS if m != "none"] + ["none", "cad+kd", "dfss+cad"]
    report, done = {}, []
    try:
        for method in methods:
            # Trainers (and their DDP reducers) are kept until every rank has finished every method and are then
            # freed together between barriers: a reducer collected by the GC at a different moment on each rank
            # is the suspect of the intermittent "terminate called without an active exception" seen here
            trainer = Trainer(config(work, method, teacher, aux), env, echo=lambda *a, **k: None)
            done.append(trainer)
            trainer.pictures = lambda *a, **k: None  # plotting is tested elsewhere; it costs seconds here
            first = next(trainer.batches(0))["image"].sum().reshape(1)  # this rank's first batch
            firsts = [torch.empty_like(first) for _ in range(env.world_size)]
            tdist.all_gather(firsts, first)
            before = torch.cat([p.detach().reshape(-1) for p in trainer.student.parameters()]).clone()
            result = trainer.fit()
            after = torch.cat([p.detach().reshape(-1) for p in trainer.student.parameters()])
            flat = torch.cat([p.detach().reshape(-1) for p in trainer.distiller.parameters()])
            gathered = [torch.empty_like(flat) for _ in range(env.world_size)]
            tdist.all_gather(gathered, flat)
            extra = {}
            source = trainer.source
            if source is not None and hasattr(source, "generator"):  # dfad: the generator is trained on every rank
                g = torch.cat([p.detach().reshape(-1) for p in source.generator.parameters()])
                gs = [torch.empty_like(g) for _ in range(env.world_size)]
                tdist.all_gather(gs, g)
                extra["generator_rank_difference"] = max(float((x - gs[0]).abs().max()) for x in gs)
            log = [json.loads(line) for line in (Path(work) / method / "log.jsonl").read_text().splitlines()]
            report[method] = {
                "max_rank_difference": max(float((x - gathered[0]).abs().max()) for x in gathered),
                "student_change": float((after - before).abs().max()),
                "ranks_see_other_batches": bool((firsts[1] != firsts[0]).item()),
                "loss": [r["loss"] for r in log if r["kind"] == "train"][-1],
                "miou": result["miou"],
                "static_graph": bool(getattr(trainer.step.model, "static_graph", False)),
                **extra,
            }
        if env.is_main:
            (Path(work) / "ddp_methods.json").write_text(json.dumps(report, indent=2))
        tdist.barrier()
        del trainer
        done.clear()
        gc.collect()
        tdist.barrier()
    finally:
        cleanup()


if __name__ == "__main__":
    main(*sys.argv[1:4])
