"""runnerd_client.tracebacks: which exception a command's output shows, read as a person
would (the corpus in tests/data/failures/ checks it on real outputs; these pin the rules)."""

from __future__ import annotations

import random
import textwrap

import pytest

from runnerd_client.tracebacks import command_ending, explain


def out(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


CHAINED = out("""
    Traceback (most recent call last):
      File "a.py", line 1, in f
    socket.gaierror: [Errno -3] Temporary failure in name resolution

    The above exception was the direct cause of the following exception:

    Traceback (most recent call last):
      File "a.py", line 2, in g
    urllib3.exceptions.MaxRetryError: HTTPSConnectionPool(host='hub', port=443)

    epoch 3 done
""")


def test_the_last_exception_is_the_failure_and_its_causes_are_kept() -> None:
    found = explain(CHAINED)
    assert str(found.exception) == (
        "urllib3.exceptions.MaxRetryError: HTTPSConnectionPool(host='hub', port=443)"
    )
    assert [r.failure_class for r in found.raised] == [
        "socket.gaierror",
        "urllib3.exceptions.MaxRetryError",
    ]


def test_a_launchers_summary_gives_way_to_the_childs_exception() -> None:
    text = out("""
        [rank0]: Traceback (most recent call last):
        [rank0]:   File "train.py", line 9, in <module>
        [rank0]: ValueError: no config named 'base'
        Traceback (most recent call last):
          File "torchrun", line 8, in <module>
        torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
        ============================================================
        train.py FAILED
    """)
    ending = command_ending(text, 1)
    assert (ending.failure_class, ending.message) == ("ValueError", "no config named 'base'")


@pytest.mark.parametrize(
    "prefix",
    [
        "[rank3]:",
        "2024-11-20 14:37:16",
        "(Actor pid=42)",
        "[1,0]<stderr>:",
        "web-1  |",
        "SUBPROCESS:",
        "3:",
    ],
)
def test_tool_prefixes_are_read_through(prefix: str) -> None:
    text = "\n".join(
        f"{prefix} {line}"
        for line in (
            "Traceback (most recent call last):",
            '  File "t.py", line 1, in f',
            "torch.OutOfMemoryError: CUDA out of memory.",
        )
    )
    assert command_ending(text, 1).failure_class == "torch.OutOfMemoryError"


def test_a_message_runs_over_its_lines_until_a_blank_line() -> None:
    text = out("""
        AssertionError:
        The NVIDIA driver on your system is too old (found version 9000).
        Please update your GPU driver

        Command exiting with ret '1'
    """)
    ending = command_ending(text, 1)
    assert ending.failure_class == "AssertionError"
    assert ending.message.splitlines() == [
        "The NVIDIA driver on your system is too old (found version 9000).",
        "Please update your GPU driver",
    ]


def test_a_cpp_exception_names_a_native_crash() -> None:
    text = out("""
        terminate called after throwing an instance of 'c10::DistBackendError'
          what():  [PG 0 Rank 1] Watchdog caught collective operation timeout
    """)
    ending = command_ending(text, -6)
    assert ending.failure_class == "c10::DistBackendError"
    assert ending.message.startswith("command killed by SIGABRT: c10::DistBackendError: [PG 0")
    assert ending.signal == "SIGABRT"


def test_a_signal_stays_the_class_of_a_python_death_by_signal() -> None:
    ending = command_ending("Traceback (most recent call last):\nKeyboardInterrupt\n", -2)
    assert (ending.failure_class, ending.signal) == ("Signal:SIGINT", "SIGINT")
    assert ending.message == "command killed by SIGINT: KeyboardInterrupt"


@pytest.mark.parametrize(
    ("text", "detail"),
    [
        ("Epoch 3/10\nKilled\n", "exit code 137: Killed"),
        (
            "step 1\nslurmstepd: error: *** JOB 4 ON n1 CANCELLED AT 2024-01-01T00:00:00 DUE TO "
            "TIME LIMIT ***\nstep 2\n",
            "exit code 137: slurmstepd: error: *** JOB 4 ON n1 CANCELLED"
            " AT 2024-01-01T00:00:00 DUE TO TIME LIMIT ***",
        ),
        (
            "step 9\n\nLoss is nan, stopping training\nsaving\n",
            "exit code 137: Loss is nan, stopping training",
        ),
        ("", "exit code 137"),
    ],
    ids=["killed", "slurm", "last-paragraph", "nothing"],
)
def test_without_an_exception_the_telling_line_is_the_message(text: str, detail: str) -> None:
    ending = command_ending(text, 137)
    assert (ending.failure_class, ending.message) == ("ExitCode", detail)


@pytest.mark.parametrize(
    "line",
    [
        "Error: All model downloads failed",  # a Rust or click program
        "ncclSystemError: System call failed",  # a library's text, not a Python class
        "UserWarning: this will change\nstep 2",  # a warning, and the program went on
        "    raise ValueError(msg)",  # a source line
    ],
)
def test_lines_that_are_not_exceptions(line: str) -> None:
    assert explain(line).exception is None


def test_an_exception_python_ignored_does_not_hide_the_one_that_ended_it() -> None:
    text = out("""
        Traceback (most recent call last):
          File "t.py", line 3, in <module>
        RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB
        Exception ignored in: <function _MultiProcessingDataLoaderIter.__del__ at 0x7f>
        Traceback (most recent call last):
          File "dataloader.py", line 1478, in __del__
        AttributeError: '_MultiProcessingDataLoaderIter' object has no attribute '_shutdown'
    """)
    found = explain(text)
    assert found.exception is not None
    assert found.exception.failure_class == "RuntimeError"
    assert len(found.raised) == 2


def test_notes_are_the_telling_lines_outside_tracebacks() -> None:
    text = out("""
        distributed.nanny - WARNING - Worker exceeded 95% memory budget. Restarting
        loading shard 3
        The exit codes of the workers are {SIGKILL(-9)}
    """)
    assert explain(text).notes == (
        "distributed.nanny - WARNING - Worker exceeded 95% memory budget. Restarting",
        "The exit codes of the workers are {SIGKILL(-9)}",
    )


def test_any_bytes_are_read_without_an_error() -> None:
    rng = random.Random(19)
    alphabet = "aEr.:( )\n\r\t\"'|│[]0-9Traceback File line in\x1b"
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 3000)))
        ending = command_ending(
            text.encode("utf-8", "replace") + b"\xff\xfe", rng.choice([1, 2, 137, -9, -11, -64])
        )
        assert ending.failure_class
        assert ending.message
