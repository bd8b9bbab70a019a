"""A toy experiment that reports to runnerd: `python experiment.py MODE`, MODE one of
ok, crash, slow (runs until stopped) and hang (like slow, but misses heartbeats quickly
once it is stopped with SIGSTOP). Two lines of it are about runnerd."""

import sys
import time

import runnerd_client as rd

mode = sys.argv[1] if len(sys.argv) > 1 else "ok"
lr = {"ok": 0.01, "crash": 10.0}.get(mode, 0.001)
liveness = {"heartbeat_interval": 0.5, "heartbeat_timeout": 2.0} if mode == "hang" else {}

with rd.run("toy-regression", variation=f"lr={lr}", params={"lr": lr}, **liveness) as run:
    print(f"{mode}: run {run.run_id} started", flush=True)
    loss = 1.0
    for step in range(1, 6 if mode in ("ok", "crash") else 10**9):
        loss = loss * (1 - lr) if lr < 1 else loss * lr
        run.checkpoint({"step": step, "loss": loss})
        if loss > 100:
            raise FloatingPointError(f"loss diverged to {loss:.1f} at step {step}")
        time.sleep(0.05)
    (run.run_dir / "result.txt").write_text(f"final loss {loss}\n")
    run.artifact(run.run_dir / "result.txt")
    print(f"{mode}: run {run.run_id} finished with loss {loss:.4f}", flush=True)
