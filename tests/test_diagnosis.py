"""The diagnosis table: categories from realistic records, rule order, and table hygiene."""

from __future__ import annotations

from typing import Any

import pytest

from runnerd.diagnosis import Diagnosis, diagnose, match_rule
from runnerd.diagnosis_rules import CATEGORIES, RULES, Rule
from runnerd_client.protocol import FailReason


def rec(
    failure_class: str | None, message: str | None = "", reason: str | None = "crash", **extra: Any
) -> dict[str, Any]:
    return {
        "failure_class": failure_class,
        "message": message,
        "reason": reason,
        "traceback": None,
        "exit_code": None,
        "signal": None,
        **extra,
    }


# (record, category_hint, category, retryable)
CASES: list[tuple[dict[str, Any], str | None, str, bool]] = [
    # oom
    (
        rec(
            "RuntimeError",
            "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 15.78 GiB "
            "total capacity; 13.2 GiB already allocated)",
        ),
        None,
        "oom",
        False,
    ),
    (rec("torch.cuda.OutOfMemoryError", "CUDA out of memory."), None, "oom", False),
    (rec("MemoryError", ""), None, "oom", False),
    (rec("OSError", "[Errno 12] Cannot allocate memory"), None, "oom", False),
    (rec("RuntimeError", "std::bad_alloc"), None, "oom", False),
    (
        rec("Signal:SIGKILL", "process 4242 killed", signal="SIGKILL", exit_code=137),
        "oom",
        "oom",
        False,
    ),
    (rec("ProcessExited", "process 4242 exited"), "OOM", "oom", False),
    # what Dask's scheduler witnessed (labels)
    (rec("ProcessExited", "process 4242 exited"), "walltime", "walltime", True),
    (rec("ProcessExited", "process 4242 exited"), "retired", "retired", True),
    (rec("ProcessExited", "process 4242 exited"), "killed_worker", "killed_worker", False),
    # interrupted by a crash of runnerd or the machine
    (
        rec("Interrupted", "process 4242 was running when runnerd went down", FailReason.ABANDONED),
        None,
        "interrupted",
        True,
    ),
    # timeout
    (
        rec("Timeout", "run exceeded its deadline of 3600 s", FailReason.TIMEOUT),
        None,
        "timeout",
        True,
    ),
    (rec("TimeoutError", ""), None, "timeout", True),
    (
        rec("subprocess.TimeoutExpired", "Command '['make']' timed out after 5 seconds"),
        None,
        "timeout",
        True,
    ),
    (rec("RuntimeError", "Timed out waiting for the NCCL rendezvous"), None, "timeout", True),
    # network
    (rec("ConnectionResetError", "[Errno 104] Connection reset by peer"), None, "network", True),
    (rec("ConnectionRefusedError", "[Errno 111] Connection refused"), None, "network", True),
    (rec("BrokenPipeError", "[Errno 32] Broken pipe"), None, "network", True),
    (rec("OSError", "[Errno 104] Connection reset by peer"), None, "network", True),
    (
        rec("socket.gaierror", "[Errno -3] Temporary failure in name resolution"),
        None,
        "network",
        True,
    ),
    (
        rec("URLError", "<urlopen error [Errno -2] Name or service not known>"),
        None,
        "network",
        True,
    ),
    (
        rec(
            "urllib3.exceptions.MaxRetryError",
            "HTTPSConnectionPool(host='hub', port=443): Max retries exceeded with url: /x",
        ),
        None,
        "network",
        True,
    ),
    (
        rec(
            "requests.exceptions.ReadTimeout",
            "HTTPSConnectionPool(host='hub', port=443): Read timed out. (read timeout=10)",
        ),
        None,
        "network",
        True,
    ),
    (
        rec("HTTPError", "503 Server Error: Service Unavailable for url: https://hub/x"),
        None,
        "network",
        True,
    ),
    (rec("RuntimeError", "upstream answered HTTP 502"), None, "network", True),
    # dependency
    (rec("ModuleNotFoundError", "No module named 'flash_attn'"), None, "dependency", False),
    (
        rec("ImportError", "cannot import name 'Foo' from 'bar' (/x/bar.py)"),
        None,
        "dependency",
        False,
    ),
    (
        rec(
            "OSError",
            "libcudart.so.11.0: cannot open shared object file: No such file or directory",
        ),
        None,
        "dependency",
        False,
    ),
    (rec("RuntimeError", "/x/_C.so: undefined symbol: _ZN3c104cuda"), None, "dependency", False),
    # numerical
    (rec("RuntimeError", "loss is nan at step 1200"), None, "numerical", False),
    (
        rec("ValueError", "Input contains NaN, infinity or a value too large for dtype."),
        None,
        "numerical",
        False,
    ),
    (rec("AssertionError", "grad norm is inf"), None, "numerical", False),
    (rec("FloatingPointError", "overflow encountered in exp"), None, "numerical", False),
    (rec("ZeroDivisionError", "division by zero"), None, "numerical", False),
    (rec("OverflowError", "math range error"), None, "numerical", False),
    # validation
    (rec("ValueError", "batch_size must be positive"), None, "validation", False),
    (rec("KeyError", "'learning_rate'"), None, "validation", False),
    (
        rec("TypeError", "train() got an unexpected keyword argument 'lr'"),
        None,
        "validation",
        False,
    ),
    (
        rec("FileNotFoundError", "[Errno 2] No such file or directory: 'data/train.csv'"),
        None,
        "validation",
        False,
    ),
    (rec("RuntimeError", "CUDA error: invalid device ordinal"), None, "validation", False),
    (rec("RuntimeError", "shape mismatch: expected (3, 4), got (4, 3)"), None, "validation", False),
    (
        rec(
            "sklearn.utils._param_validation.InvalidParameterError",
            "The 'gamma' parameter of "
            "SVC must be a float in the range [0.0, inf) or a str among {'auto', 'scale'}. Got -1 "
            "instead.",
        ),
        None,
        "validation",
        False,
    ),
    (
        rec(
            "RuntimeError",
            "Error(s) in loading state_dict for ResNet:\n\tMissing key(s) in "
            'state_dict: "fc.weight".',
        ),
        None,
        "validation",
        False,
    ),
    # interrupted
    (rec("KeyboardInterrupt", "interrupted", "abandoned"), None, "interrupted", True),
    (rec("Terminated", "terminated by SIGTERM", "abandoned"), None, "interrupted", True),
    (rec("Cancelled", "cancelled by the user", FailReason.ABANDONED), None, "interrupted", True),
    (rec("RuntimeError", "node preempted", "abandoned"), None, "interrupted", True),
    (rec("ExitCode", "exited", exit_code=130), None, "interrupted", True),
    # lost
    (rec("HeartbeatLost", "no heartbeat for 600 s", "lost"), None, "lost", True),
    (
        rec("Stalled", "no CPU time, output, file writes or heartbeats for 600 s", "lost"),
        None,
        "lost",
        True,
    ),
    # signal
    (
        rec(
            "Signal:SIGSEGV",
            "process 4242 Fatal Python error: Segmentation fault",
            signal="SIGSEGV",
        ),
        None,
        "signal",
        False,
    ),
    (rec("Signal:SIGABRT", "free(): invalid pointer"), None, "signal", False),
    (rec("Signal:SIGBUS", "process 4242 Fatal Python error: Bus error"), None, "signal", False),
    (rec("ExitCode", "exited", exit_code=139), None, "signal", False),
    (rec("Signal:SIGKILL", "process 4242 killed", exit_code=137), None, "signal", True),
    (rec("Signal:SIGTERM", "process 4242 terminated"), None, "signal", True),
    (rec("Signal:SIGHUP", "process 4242 hung up"), None, "signal", True),
    (rec("ExitCode", "exited", exit_code=137), None, "signal", True),
    (rec("ExitCode", "exited", signal="KILL"), None, "signal", True),
    (
        rec("Signal:UNKNOWN", "Fatal Python error: Cannot recover from stack overflow."),
        None,
        "signal",
        False,
    ),
    (rec("Signal:SIGUSR1", "command killed by SIGUSR1", signal="SIGUSR1"), None, "signal", False),
    (rec("ProcessExited", "process 4242 exited without a terminal call"), None, "signal", True),
    # what a command's stderr shows besides its last exception (record["traceback"])
    (
        rec(
            "BrokenProcessPool",
            "A process in the process pool was terminated abruptly while "
            "the future was running or pending.",
            traceback="Fatal Python error: Segmentation "
            'fault\n\nCurrent thread 0x7f (most recent call first):\n  File "w.py", line 3 in '
            "work\n",
        ),
        None,
        "signal",
        False,
    ),
    (
        rec(
            "BrokenProcessPool",
            "A process in the process pool was terminated abruptly while "
            "the future was running or pending.",
        ),
        None,
        "oom",
        False,
    ),
    (
        rec(
            "TerminatedWorkerError",
            "A worker process managed by the executor was unexpectedly "
            "terminated. This could be caused by a segmentation fault while calling the function "
            "or by an excessive memory usage causing the Operating System to kill the worker.",
            traceback="TerminatedWorkerError: A worker process managed by the executor was "
            "unexpectedly terminated.\n\nThe exit codes of the workers are {SIGKILL(-9)}\n",
        ),
        None,
        "oom",
        False,
    ),
    (
        rec(
            "TerminatedWorkerError",
            "A worker process managed by the executor was unexpectedly "
            "terminated. The exit codes of the workers are {SIGTERM(-15)}",
        ),
        None,
        "signal",
        True,
    ),
    (
        rec("ExitCode", "exit code 137: Killed", exit_code=137, traceback="Epoch 3/10\nKilled\n"),
        None,
        "oom",
        False,
    ),
    (
        rec(
            "Signal:SIGTERM",
            "command killed by SIGTERM",
            signal="SIGTERM",
            exit_code=-15,
            traceback="slurmstepd: error: *** JOB 42 ON n1 CANCELLED AT 2024-01-01T00:00:00 DUE TO "
            "TIME LIMIT ***\n",
        ),
        None,
        "walltime",
        True,
    ),
    (
        rec(
            "ExitCode",
            "exit code 1: srun: error: n1: task 0: Terminated",
            exit_code=1,
            traceback="slurmstepd: error: *** STEP 42.0 ON n1 CANCELLED AT 2024-01-01T00:00:00 "
            "DUE TO PREEMPTION ***\nsrun: error: n1: task 0: Terminated\n",
        ),
        None,
        "interrupted",
        True,
    ),
    (
        rec(
            "Signal:SIGTERM",
            "command killed by SIGTERM",
            signal="SIGTERM",
            exit_code=-15,
            traceback="slurmstepd: error: *** JOB 42 ON n1 CANCELLED AT 2024-01-01T00:00:00 ***\n",
        ),
        None,
        "interrupted",
        True,
    ),
    (
        rec(
            "ExitCode",
            "exit code 1: srun: error: n1: task 3: Bus error",
            exit_code=1,
            traceback="srun: error: n1: task 3: Bus error\nslurmstepd: error: *** STEP 42.0 ON n1 "
            "CANCELLED AT 2024-01-01T00:00:00 ***\n",
        ),
        None,
        "signal",
        False,
    ),
    (
        rec(
            "Signal:SIGABRT",
            "command killed by SIGABRT",
            signal="SIGABRT",
            exit_code=-6,
            traceback="[rank1]:[E626 06:24:44.903 ProcessGroupNCCL.cpp:616] [Rank 1] Watchdog "
            "caught collective operation timeout: WorkNCCL(SeqNum=808, OpType=ALLREDUCE) ran for "
            "600020 milliseconds before timing out.\n",
        ),
        None,
        "timeout",
        True,
    ),
    (
        rec(
            "RuntimeError",
            "NCCL error in: ProcessGroupNCCL.cpp:1269, unhandled system error, NCCL version 2.14.3",
        ),
        None,
        "network",
        True,
    ),
    (
        rec(
            "ExitCode",
            "exit code 1: ERROR: Unexpected bus error encountered in worker. This "
            "might be caused by insufficient shared memory (shm).",
            exit_code=1,
        ),
        None,
        "resource",
        False,
    ),
    (rec("RuntimeError", "OOM: scenario 7 exceeded memory limit"), None, "oom", False),
    (
        rec(
            "numpy.core._exceptions._ArrayMemoryError",
            "Unable to allocate 58.0 GiB for an array "
            "with shape (176351, 176460) and data type uint16",
        ),
        None,
        "oom",
        False,
    ),
    (
        rec(
            "ExitCode",
            "exit code 1: distributed.nanny - WARNING - Restarting worker",
            exit_code=1,
            traceback="distributed.nanny - WARNING - Worker exceeded 95% memory "
            "budget. Restarting\ndistributed.nanny - WARNING - Restarting worker\n",
        ),
        None,
        "oom",
        False,
    ),
    # Dask's KilledWorker: retryable or not from what killed its workers
    (
        rec(
            "distributed.scheduler.KilledWorker",
            "Attempted to run task 'x' on 3 different "
            "workers, but all those workers died while running it.",
        ),
        None,
        "killed_worker",
        False,
    ),
    (
        rec(
            "distributed.scheduler.KilledWorker",
            "Attempted to run task 'x' on 3 different "
            "workers, but all those workers died while running it.",
            traceback="distributed.nanny.memory - WARNING - Worker tcp://10.0.0.1:1 (pid=42) "
            "exceeded 95% memory budget. Restarting...\n",
        ),
        None,
        "killed_worker",
        False,
    ),
    (
        rec(
            "Signal:SIGTERM",
            "process 4242 terminated by SIGTERM (KilledWorker: Dask gave up on "
            "the task after its workers died)",
            signal="SIGTERM",
        ),
        "killed_worker",
        "killed_worker",
        True,
    ),
    (
        rec(
            "ProcessExited",
            "process 4242 exited (the worker was retired on purpose (scale "
            "down, retire_workers)) (KilledWorker: Dask gave up on the task after its workers "
            "died)",
        ),
        "killed_worker",
        "killed_worker",
        True,
    ),
    # disk, permission, resource
    (rec("OSError", "[Errno 28] No space left on device"), None, "disk", False),
    (
        rec(
            "RuntimeError",
            "[enforce fail at inline_container.cc:445] . PytorchStreamWriter "
            "failed writing file data/176: file write failed",
        ),
        None,
        "disk",
        False,
    ),
    (rec("OSError", "[Errno 122] Disk quota exceeded: 'out/model.pt'"), None, "disk", False),
    (rec("PermissionError", "[Errno 13] Permission denied: '/data/x'"), None, "permission", False),
    (rec("OSError", "[Errno 30] Read-only file system: '/models'"), None, "permission", False),
    (rec("OSError", "[Errno 24] Too many open files"), None, "resource", False),
    (rec("RuntimeError", "can't start new thread"), None, "resource", False),
    (rec("sqlite3.OperationalError", "database is locked"), None, "resource", True),
    (
        rec("RuntimeError", "CUDA error: all CUDA-capable devices are busy or unavailable"),
        None,
        "resource",
        True,
    ),
    # network: a certificate problem is not transient
    (
        rec(
            "ssl.SSLCertVerificationError",
            "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify "
            "failed: unable to get local issuer certificate (_ssl.c:1006)",
        ),
        None,
        "network",
        False,
    ),
    (
        rec(
            "requests.exceptions.HTTPError",
            "429 Client Error: Too Many Requests for url: https://hub/x",
        ),
        None,
        "network",
        True,
    ),
    # GPU drivers and builds
    (
        rec("RuntimeError", "The NVIDIA driver on your system is too old (found version 11040)."),
        None,
        "dependency",
        False,
    ),
    (
        rec(
            "AssertionError", "\nThe NVIDIA driver on your system is too old (found version 9000)."
        ),
        None,
        "dependency",
        False,
    ),
    (
        rec("RuntimeError", "CUDA error: no kernel image is available for execution on the device"),
        None,
        "dependency",
        False,
    ),
    # bugs in the program
    (rec("AttributeError", "'NoneType' object has no attribute 'shape'"), None, "bug", False),
    (rec("AssertionError", ""), None, "bug", False),
    (rec("IndexError", "list index out of range"), None, "bug", False),
    (rec("RecursionError", "maximum recursion depth exceeded"), None, "bug", False),
    (rec("TypeError", "'NoneType' object is not subscriptable"), None, "bug", False),
    (
        rec("RuntimeError", "mat1 and mat2 shapes cannot be multiplied (1x2 and 6x64)"),
        None,
        "bug",
        False,
    ),
    (rec("RuntimeError", "CUDA error: device-side assert triggered"), None, "bug", False),
    # more kinds, in other libraries' and schedulers' words
    (
        rec(
            "torch.multiprocessing.spawn.ProcessExitedException",
            "process 0 terminated with signal SIGKILL",
        ),
        None,
        "oom",
        False,
    ),
    (
        rec(
            "torch.multiprocessing.spawn.ProcessExitedException",
            "process 1 terminated with signal SIGSEGV",
        ),
        None,
        "signal",
        False,
    ),
    (
        rec(
            "xgboost.core.XGBoostError",
            "[10:02:11] ../src/common/host_device_vector.cu: Memory allocation error on worker 0",
        ),
        None,
        "oom",
        False,
    ),
    (
        rec(
            "ExitCode",
            "exit code 1: TERM_RUNLIMIT: job killed after reaching LSF run time limit.",
            exit_code=1,
        ),
        None,
        "walltime",
        True,
    ),
    (
        rec("torch.distributed.elastic.rendezvous.api.RendezvousTimeoutError", ""),
        None,
        "timeout",
        True,
    ),
    (
        rec(
            "ExitCode",
            "exit code 1: ERROR: No matching distribution found for torch==9.9",
            exit_code=1,
        ),
        None,
        "dependency",
        False,
    ),
    (rec("RuntimeError", "Error building extension 'fused_adam'"), None, "dependency", False),
    (
        rec(
            "AttributeError",
            "_ARRAY_API not found",
            traceback="A module that was compiled "
            "using NumPy 1.x cannot be run in NumPy 2.0.0 as it may crash.\nTraceback (most "
            'recent call last):\n  File "t.py", line 1, in <module>\nAttributeError: _ARRAY_API '
            "not found\n",
        ),
        None,
        "dependency",
        False,
    ),
    (
        rec(
            "RuntimeError",
            "The server socket has failed to listen on any local network address. "
            "(errno: 98 - Address already in use)",
        ),
        None,
        "resource",
        True,
    ),
    (rec("RuntimeError", "No CUDA GPUs are available"), None, "resource", False),
    (
        rec(
            "huggingface_hub.errors.GatedRepoError",
            "401 Client Error. Cannot access gated repo for url https://hub/x",
        ),
        None,
        "permission",
        False,
    ),
    (
        rec("OSError", "We couldn't connect to 'https://huggingface.co' to load this file"),
        None,
        "network",
        True,
    ),
    (rec("RuntimeError", "NCCL communicator was aborted on rank 1."), None, "network", True),
    (
        rec("ValueError", "Expected input batch_size (32) to match target batch_size (16)."),
        None,
        "bug",
        False,
    ),
    (rec("RuntimeError", "expected scalar type Float but found Half"), None, "bug", False),
    (rec("EOFError", "Ran out of input"), None, "validation", False),
    (
        rec(
            "subprocess.CalledProcessError",
            "Command '['python', 'train.py']' returned non-zero exit status 3221225477.",
        ),
        None,
        "signal",
        False,
    ),
    (
        rec(
            "subprocess.CalledProcessError",
            "Command '['python', 'train.py']' died with <Signals.SIGKILL: 9>.",
        ),
        None,
        "oom",
        False,
    ),
    (rec("RuntimeError", "Socket Timeout"), None, "timeout", True),
    (
        rec("OSError", "Not enough disk space. Needed: 1.2 GiB (download: 1 GiB)"),
        None,
        "disk",
        False,
    ),
    # unknown
    (rec("RuntimeError", "something odd happened"), None, "unknown", False),
    (rec("SystemExit", "1", exit_code=1), None, "unknown", False),
    (rec("ExitCode", "exited", exit_code=1), "bogus", "unknown", False),
]


def case_id(case: tuple[dict[str, Any], str | None, str, bool]) -> str:
    record, hint, category, _ = case
    suffix = f"+hint={hint}" if hint else ""
    return f"{category}:{record['failure_class']}:{str(record['message'])[:24]}{suffix}"


@pytest.mark.parametrize(
    ("record", "hint", "category", "retryable"), CASES, ids=[case_id(c) for c in CASES]
)
def test_realistic_records_get_their_category(
    record: dict[str, Any], hint: str | None, category: str, retryable: bool
) -> None:
    result = diagnose(record, category_hint=hint)
    assert (result.category, result.retryable) == (category, retryable)


@pytest.mark.parametrize(
    ("record", "hint", "category", "beats"),
    [
        (
            rec("RuntimeError", "CUDA out of memory. Tried to allocate 2.00 GiB"),
            None,
            "oom",
            "unknown",
        ),
        (rec("ValueError", "loss is nan"), None, "numerical", "validation"),
        (rec("requests.exceptions.ReadTimeout", "Read timed out."), None, "network", "timeout"),
        (
            rec("OSError", "libfoo.so: cannot open shared object file: No such file or directory"),
            None,
            "dependency",
            "validation",
        ),
        (rec("Signal:SIGABRT", "free(): invalid pointer"), None, "signal", "validation"),
        (rec("Signal:SIGKILL", "killed", exit_code=137), "oom", "oom", "signal"),
        (
            rec("Cancelled", "invalid config, cancelling", "abandoned"),
            None,
            "interrupted",
            "validation",
        ),
        (rec("Timeout", "run exceeded its deadline", "timeout"), None, "timeout", "unknown"),
    ],
    ids=[
        "cuda-oom>unknown",
        "nan>validation",
        "readtimeout>timeout",
        "so-missing>validation",
        "sigabrt>validation",
        "oom-hint>sigkill",
        "cancel>validation",
        "deadline>unknown",
    ],
)
def test_specific_rules_come_first(
    record: dict[str, Any], hint: str | None, category: str, beats: str
) -> None:
    assert diagnose(record, category_hint=hint).category == category
    assert category != beats


def test_sigkill_alone_is_not_oom() -> None:
    record = rec("Signal:SIGKILL", "process 4242 killed", signal="SIGKILL", exit_code=137)
    result = diagnose(record)
    assert (result.category, result.retryable) == ("signal", True)
    assert "dmesg" in result.suggestion


@pytest.mark.parametrize(
    "record",
    [
        {},
        {
            "failure_class": None,
            "message": None,
            "traceback": None,
            "reason": None,
            "exit_code": None,
            "signal": None,
        },
        {"failure_class": "", "message": "", "reason": "", "signal": ""},
        {"message": 42, "exit_code": "137"},
        {"failure_class": "ExitCode", "exit_code": True},
    ],
    ids=["empty", "all-none", "all-empty", "wrong-types", "bool-exit-code"],
)
def test_missing_or_odd_fields_fall_back_to_unknown(record: dict[str, Any]) -> None:
    assert diagnose(record) == Diagnosis("unknown", False, RULES[-1].pattern, RULES[-1].suggestion)


def test_a_memory_error_is_named_for_itself_even_with_a_hint() -> None:
    assert match_rule(rec("MemoryError", ""), "oom").pattern == "out of memory (host or GPU)"


def test_the_root_cause_wins_over_its_echo() -> None:
    """A chained traceback: the DataLoader worker was killed (the cause), then the main
    process raised 'exited unexpectedly': the finding names the kill, not the echo."""
    traceback = (
        'Traceback (most recent call last):\n  File "x.py", line 1, in f\n'
        "RuntimeError: DataLoader worker (pid 1817) is killed by signal: Killed.\n\n"
        "The above exception was the direct cause of the following exception:\n\n"
        'Traceback (most recent call last):\n  File "x.py", line 2, in g\n'
        "ValueError: batch could not be read\n"
    )
    record = rec("ValueError", "batch could not be read", traceback=traceback)
    assert match_rule(record).pattern.startswith("a child process was SIGKILLed")


def test_diagnosis_carries_the_matching_rule() -> None:
    record = rec("ModuleNotFoundError", "No module named 'x'")
    rule = match_rule(record)
    assert diagnose(record) == Diagnosis(
        rule.category, rule.retryable, rule.pattern, rule.suggestion
    )


@pytest.mark.parametrize("rule", RULES, ids=[r.pattern for r in RULES])
def test_every_rule_is_reached_by_a_case(rule: Rule) -> None:
    reached = [c for c in CASES if match_rule(c[0], category_hint=c[1]) is rule]
    assert reached, f"no test record reaches rule {rule.pattern!r}"
    assert {c[2] for c in reached} == {rule.category}


def test_every_category_is_used_and_covered() -> None:
    assert {r.category for r in RULES} == set(CATEGORIES)
    assert {c[2] for c in CASES} == set(CATEGORIES)


@pytest.mark.parametrize("rule", RULES, ids=[r.pattern for r in RULES])
def test_every_suggestion_is_one_non_empty_line(rule: Rule) -> None:
    assert rule.suggestion.strip()
    assert "\n" not in rule.suggestion and "\r" not in rule.suggestion
    assert rule.pattern.strip()


def test_the_table_ends_with_the_only_fallback() -> None:
    assert RULES[-1].category == "unknown" and RULES[-1].fallback
    assert not any(r.fallback for r in RULES[:-1])
    assert len({r.pattern for r in RULES}) == len(RULES)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"category": "bogus", "classes": ("OSError",)}, "unknown category"),
        ({"category": "network"}, "no criteria"),
        ({"category": "network", "classes": ("X",), "suggestion": "a\nb"}, "one-line"),
        ({"category": "network", "classes": ("X",), "suggestion": " "}, "one-line"),
    ],
    ids=["bad-category", "no-criteria", "two-lines", "blank"],
)
def test_malformed_rules_are_rejected(kwargs: dict[str, Any], error: str) -> None:
    fields: dict[str, Any] = {"retryable": True, "pattern": "p", "suggestion": "s", **kwargs}
    with pytest.raises(ValueError, match=error):
        Rule(**fields)
