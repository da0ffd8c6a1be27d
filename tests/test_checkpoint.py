"""checkpoint.py on its own: random streams that replay exactly, stop requests, a Run's save and
resume, the interval meter's non-finite check and the per-epoch record. train.py's end-to-end
resume (bit-identical weights after a stop) is tested in test_train.py and test_faults.py."""
import argparse
import os
import signal

import pytest
import torch

import checkpoint
from model import create_model

CPU = torch.device("cpu")


def _ctx():
    return checkpoint.Context(ddp=False, rank=0, local_rank=0, world=1, device=CPU)


def _args(out_dir, **kw):
    flags = {"out_dir": str(out_dir), "model": "cdeit", "distill": "hard", "strategy": 2,
             "dataset": "synthetic", "epochs": 2, "seed": 0, "log_interval": 4, "batch_size": 8}
    return argparse.Namespace(**{**flags, **kw})


def _run(out_dir, seed=0, **kw):
    torch.manual_seed(seed)
    model_args = {"depth": 1, "embed_dim": 32, "num_heads": 2, "layout": "thesis"}
    net = create_model("cdeit", **model_args)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    student = checkpoint.Student(net, model_args, opt, torch.amp.GradScaler("cpu", enabled=False))
    streams = checkpoint.Streams(CPU, torch.Generator(), torch.Generator())
    data_args = {"root": "/data", "split": "paper", "seed": 0}
    return checkpoint.Run(_args(out_dir, **kw), _ctx(), student, streams, data_args, None)


def test_random_streams_never_share_a_seed():
    seeds = {checkpoint.stream_seed(s, e, r, n) for s in range(3) for e in range(20)
             for r in range(8) for n in ("drop-path", "augment", "corrupt")}
    assert len(seeds) == 3 * 20 * 8 * 3


def _draws(streams):
    return (torch.rand(3), torch.rand(3, generator=streams.augment),
            torch.rand(3, generator=streams.corrupt))


def test_streams_restore_replays_every_generator():
    streams = checkpoint.Streams(CPU, torch.Generator(), torch.Generator())
    streams.seed(0, epoch=1, rank=0)
    _draws(streams)
    state = streams.state()
    assert set(state) == {"cpu", "augment", "corrupt"}
    first = _draws(streams)
    streams.seed(5, epoch=3, rank=1)  # elsewhere entirely
    assert not torch.equal(_draws(streams)[1], first[1])
    streams.restore(state)
    assert all(torch.equal(a, b) for a, b in zip(_draws(streams), first))


def test_stop_requests_turn_sigterm_into_a_request():
    before = signal.getsignal(signal.SIGTERM)
    with checkpoint.stop_requests() as stop:
        assert stop is checkpoint.STOP and stop.why is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.why == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before


def test_run_save_then_resume_restores_the_state(tmp_path):
    run = _run(tmp_path)
    run.epoch, run.step, run.best_val = 1, 7, 0.25  # mid-epoch 2 with 4 steps per epoch
    run.history = [{"epoch": 0, "step": 0, "val_accuracy": 0.1}]
    run.sums = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    run.streams.seed(0, 1, 0)
    run.save(run.ckpt_path)
    want = run.streams.state()

    other = _run(tmp_path, seed=1)
    other.resume(spe=4)
    for k, v in run.student.model.state_dict().items():
        assert torch.equal(other.student.model.state_dict()[k], v), k
    assert (other.epoch, other.step, other.best_val) == (1, 7, 0.25)
    assert other.history == run.history and torch.equal(other.sums, run.sums)
    other.seed_epoch()  # mid-epoch: the saved generators, not fresh seeds
    got = other.streams.state()
    assert all(torch.equal(got[k], want[k]) for k in want)

    changed = _run(tmp_path)
    changed.data_args = {**changed.data_args, "split": "grouped"}
    with pytest.raises(checkpoint.TrainError, match="split paper -> grouped"):
        changed.resume(spe=4)


def test_meter_stops_on_a_non_finite_loss(tmp_path):
    run = _run(tmp_path)
    meter = checkpoint.Meter(run, total=8)
    meter.start_epoch()
    parts = {p: torch.tensor(1.0) for p in run.cols.values()}
    for loss in (1.0, float("nan")):
        meter.add(torch.tensor(loss), parts)
        run.step += 1
    with pytest.raises(checkpoint.TrainError, match="non-finite loss at step 2; stopped, no "
                                                    "checkpoint was written"):
        meter.flush(lr=1e-3)


def test_meter_adds_each_interval_to_the_epoch_sums(tmp_path, capsys):
    run = _run(tmp_path)
    meter = checkpoint.Meter(run, total=8)
    meter.start_epoch()
    for loss in (1.0, 3.0):
        meter.add(torch.tensor(loss), {p: torch.tensor(loss) for p in run.cols.values()})
        run.step += 1
    with checkpoint.stop_requests():  # as in the loop: no stop asked yet
        assert meter.flush(lr=1e-3) is False
    assert run.sums.tolist() == [4.0] * (1 + len(run.cols))
    assert capsys.readouterr().out.startswith("step 2/8 | epoch 1 | loss 2.0000 (cls 2.000 ")


def test_loss_columns_and_epoch_line():
    assert checkpoint.loss_columns(_args("o")) == {"cls": "cls", "cls_corr": "label",
                                                   "dist": "teacher", "type": "type"}
    assert checkpoint.loss_columns(_args("o", model="vit", distill="none")) == {"cls": "label"}
    row = {"val_accuracy": 0.5, "val_cls": 0.25, "val_type": 0.75, "val_cos_cls_dist": 0.125}
    assert checkpoint.epoch_line(row) == ("val accuracy 50.00% | heads cls 25.00% type 75.00% | "
                                          "cos(cls,dist) 0.125")
    assert set(checkpoint.SUMMARY_FIELDS) >= {f"train_{k}" for k in ("loss", "cls", "cls_corr",
                                                                     "dist", "type")}
