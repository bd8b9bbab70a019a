"""The diagnosis rules (SPEC §3): one table, `RULES`, read top to bottom by `runnerd.diagnosis`.

A rule matches when ANY of its criteria does (an exception class name, a regex on the
message, a reason, a signal, an exit code, the caller's category hint) and, if it has one,
its `only_if` regex is found somewhere in what the record says. Order carries the meaning:
specific rules sit above general ones ("CUDA out of memory" is a RuntimeError that must be
oom; a ValueError saying "nan" must be numerical, not validation). The last rule is the
catch-all `unknown`.

To add a rule, insert a `Rule(...)` above the first rule that would otherwise swallow its
records, give it a `pattern` no other rule uses, and add a record that reaches it to
tests/test_diagnosis.py (the tests check that every rule is reachable); a real output that
shows it belongs in tests/data/failures/.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

CATEGORIES = ("oom", "walltime", "retired", "killed_worker", "timeout", "network",
              "dependency", "validation", "numerical", "interrupted", "lost", "signal",
              "disk", "permission", "resource", "bug", "unknown")  # fmt: skip


@functools.cache
def _regex(patterns: tuple[str, ...]) -> re.Pattern[str] | None:
    """One case-insensitive alternation of a rule's message regexes, compiled once."""
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE | re.DOTALL)


@dataclass(frozen=True)
class Facts:
    """The fields of a failure record that rules look at, normalized so rules stay simple.
    `evidence` is everything the record says at once, for a rule's `only_if`."""

    failure_class: str
    message: str
    reason: str
    signal: str | None
    exit_code: int | None
    hint: str | None
    evidence: str = ""


@dataclass(frozen=True, kw_only=True)
class Rule:
    """One row of the table: criteria (any one suffices) and what to conclude from them."""

    category: str
    classes: tuple[str, ...] = ()
    class_prefixes: tuple[str, ...] = ()
    messages: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()
    signals: tuple[str, ...] = ()
    exit_codes: tuple[int, ...] = ()
    hints: tuple[str, ...] = ()
    only_if: str | None = None
    fallback: bool = False
    retryable: bool
    pattern: str
    suggestion: str

    def __post_init__(self) -> None:
        """Reject malformed rows at import, where a typo is cheapest to find."""
        if self.category not in CATEGORIES:
            raise ValueError(f"unknown category {self.category!r}")
        criteria = (
            self.classes,
            self.class_prefixes,
            self.messages,
            self.reasons,
            self.signals,
            self.exit_codes,
            self.hints,
        )
        if not self.fallback and not any(criteria):
            raise ValueError(f"rule {self.pattern!r} has no criteria and would never match")
        if not self.suggestion.strip() or "\n" in self.suggestion:
            raise ValueError(f"rule {self.pattern!r} needs a one-line suggestion")
        _regex(self.messages)
        _regex((self.only_if,) if self.only_if else ())

    def matches(self, facts: Facts) -> bool:
        """Whether any criterion of this rule holds for the record (and `only_if` too)."""
        regex = _regex(self.messages)
        hit = (
            self.fallback
            or facts.hint in self.hints
            or facts.failure_class in self.classes
            or (bool(facts.failure_class) and facts.failure_class.startswith(self.class_prefixes))
            or facts.reason in self.reasons
            or facts.signal in self.signals
            or facts.exit_code in self.exit_codes
            or (regex is not None and regex.search(facts.message) is not None)
        )
        if not hit or self.only_if is None:
            return hit
        condition = _regex((self.only_if,))
        return condition is not None and condition.search(facts.evidence) is not None


# The table is laid out for reading, one rule to a paragraph: the formatter leaves it be.
# fmt: off
_OOM_ADVICE = "Give the run more memory or use smaller batches/chunks; as is it fails again."
_NATIVE = ("SIGSEGV", "SIGABRT", "SIGBUS", "SIGILL", "SIGFPE")
_KILLED = ("SIGKILL", "SIGTERM", "SIGHUP")
_MEMORY = (r"out of memory", r"cannot allocate memory", r"std::bad_alloc", r"\boom\b",
           r"oom[- _]?kill", r"unable to allocate [\d.]+ ?[kmgtp]i?b",
           r"exceeded (?:its |the |job )?memory limit", r"memory limit exceeded",
           r"exceeded \d+% memory budget", r"CUBLAS_STATUS_ALLOC_FAILED", r"RESOURCE_EXHAUSTED",
           r"memory allocation (?:error|failed)")
# What else the output says killed a pool's or launcher's child: a native crash, a
# SIGTERM. ("caused by a segmentation fault ..." is loky's stock wording, not evidence.)
# Windows reports an access violation (or a stack overrun) as an exit status.
_WINDOWS_CRASH = r"\b(?:3221225477|3221226505|3221225725)\b|0xC0000005|0xC0000409|0xC00000FD"
_CHILD_CRASHED = (r"SIGSEGV|SIGABRT|SIGBUS|SIGILL|SIGFPE|(?<!by a )segmentation fault"
                  r"|Fatal Python error|core dumped|exitcode\s*:\s*-(?:11|6|7|4|8)\b"
                  r"|Signal (?:11|6|7|4|8) \(|killed by signal: (?:Aborted|Illegal|Floating)"
                  r"|exit status -(?:11|6|7|4|8)\b|" + _WINDOWS_CRASH)
_CHILD_TERMINATED = r"SIGTERM|Signal 15 \(|exitcode\s*:\s*-15\b|killed by signal: Terminated"
_CHILDREN = ("BrokenProcessPool", "TerminatedWorkerError", "ChildFailedError",
             "ProcessExitedException", "CalledProcessError")
_DATALOADER_DIED = (r"DataLoader worker \(pids?(?:\(s\))? [\d, ]+\) "
                    r"(?:exited unexpectedly|is killed)")
_KW = ("KilledWorker",)
_KW_TEXT = (r"\bKilledWorker\b",)
# "nan"/"inf" as values, not as an interval's bound ("must be in the range [0.0, inf)").
_NAN = r"(?<![\[(]-)(?<![\[(])(?<![,\[(] )(?<!, -)\b(?:nan|inf)\b(?!\s*[)\]])"

RULES: tuple[Rule, ...] = (
    Rule(category="killed_worker", classes=_KW, hints=("killed_worker",), messages=_KW_TEXT,
         only_if=r"memory|\boom\b",
         retryable=False,
         pattern="Dask gave up on the task (KilledWorker): its workers ran out of memory",
         suggestion="Give the workers more memory or split the task; rerun as is, it dies "
                    "again."),
    Rule(category="killed_worker", classes=_KW, hints=("killed_worker",), messages=_KW_TEXT,
         only_if=r"walltime|time limit|preempt|retir|scale[- ]?down|SIGTERM|signal[- ]15",
         retryable=True,
         pattern="Dask gave up on the task (KilledWorker): its workers were stopped from "
                 "outside (walltime, preemption, retirement)",
         suggestion="Nothing in the task is at fault: rerun it on workers with time left."),
    Rule(category="killed_worker", classes=_KW, hints=("killed_worker",), messages=_KW_TEXT,
         retryable=False,
         pattern="Dask gave up on the task (KilledWorker): its workers crashed or were killed",
         suggestion="Read the workers' logs for a native crash or a kill; Dask already "
                    "retried it."),
    Rule(category="resource",
         messages=(r"insufficient shared memory", r"out of shared memory",
                   r"unable to open shared memory", r"killed by signal: Bus error",
                   r"/dev/shm"),
         retryable=False, pattern="shared memory (/dev/shm) ran out, often in DataLoader workers",
         suggestion="Raise /dev/shm (docker --shm-size or --ipc=host) or use fewer workers."),
    Rule(category="oom",
         classes=("MemoryError", "OutOfMemoryError", "_ArrayMemoryError",
                  "ResourceExhaustedError", "OutOfMemory"),
         messages=_MEMORY,
         retryable=False, pattern="out of memory (host or GPU)",
         suggestion=_OOM_ADVICE),
    Rule(category="timeout",
         messages=(r"Watchdog caught collective operation timeout",
                   r"collective operation timeout"),
         retryable=True, pattern="a collective operation timed out (NCCL watchdog)",
         suggestion="One rank stalled or died first: find its error in the ranks' logs; "
                    "rerun if it was transient."),
    Rule(category="signal", classes=_CHILDREN, messages=(_DATALOADER_DIED,),
         only_if=_CHILD_CRASHED,
         retryable=False, pattern="a child process crashed (segfault or abort)",
         suggestion="A native crash repeats: look for the child's stack, suspect extensions."),
    Rule(category="signal", classes=_CHILDREN, messages=(_DATALOADER_DIED,),
         only_if=_CHILD_TERMINATED,
         retryable=True, pattern="a child process was terminated from outside (SIGTERM)",
         suggestion="Something stopped the child (a scheduler, a person); rerun it."),
    Rule(category="oom",
         classes=("BrokenProcessPool", "TerminatedWorkerError"),
         messages=(_DATALOADER_DIED, r"exitcode\s*:\s*-9\b", r"Signal 9 \(SIGKILL\)",
                   r"terminated with signal SIGKILL", r"died with <Signals\.SIGKILL",
                   r"exit status -9\b",
                   r"SIGKILL\(-9\)", r"^Killed$", r"^\S+: line \d+: +\d+ Killed\b"),
         retryable=False,
         pattern="a child process was SIGKILLed while its parent lived (the OOM killer)",
         suggestion="Give it more memory or use fewer/lighter workers; dmesg names the "
                    "victim."),
    Rule(category="oom", hints=("oom",),
         retryable=False, pattern="a witness saw it killed for its memory (OOM killer, nanny)",
         suggestion=_OOM_ADVICE),
    Rule(category="walltime", hints=("walltime",),
         retryable=True, pattern="its job's walltime ended, or the job was cancelled",
         suggestion="Resume it from its last checkpoint in a job with a longer walltime."),
    Rule(category="retired", hints=("retired",),
         retryable=True, pattern="its worker was retired on purpose (scale-down)",
         suggestion="Nothing was wrong with the task itself; rerun it."),
    Rule(category="walltime",
         messages=(r"DUE TO TIME LIMIT", r"time limit (?:reached|exceeded)",
                   r"walltime (?:limit )?exceeded", r"exceeded (?:the )?walltime",
                   r"job killed: walltime", r"TERM_RUNLIMIT", r"\bh_rt\b"),
         retryable=True, pattern="the batch scheduler's time limit ended the job",
         suggestion="Resume it from its last checkpoint in a job with a longer time limit."),
    Rule(category="interrupted", messages=(r"DUE TO PREEMPTION", r"\bpreempted\b"),
         retryable=True, pattern="preempted by the batch scheduler",
         suggestion="Resubmit it; resume from its last checkpoint if it has one."),
    Rule(category="timeout", reasons=("timeout",),
         classes=("Timeout", "TimeoutError", "TimeoutExpired", "RendezvousTimeoutError"),
         retryable=True, pattern="deadline exceeded or TimeoutError",
         suggestion="Rerun with a longer deadline, or find where it stalled from its last logs."),
    Rule(category="interrupted", classes=("Interrupted",),
         retryable=True, pattern="was running when runnerd or the machine went down",
         suggestion="Relaunch it from its last checkpoint: runnerctl resume --interrupted."),
    Rule(category="interrupted", reasons=("abandoned",),
         classes=("KeyboardInterrupt", "Terminated", "Cancelled", "CancelledError"),
         signals=("SIGINT",), exit_codes=(130, -2),
         retryable=True, pattern="interrupted, terminated or cancelled",
         suggestion="It was stopped from outside (Ctrl-C, SIGTERM, cancel, preemption); rerun it."),
    Rule(category="lost", classes=("Stalled",),
         retryable=True, pattern="stalled: no CPU, output, files or heartbeats for stall_timeout",
         suggestion="While it hangs, `runnerctl stack RUN` shows where; suspect a dead worker"
                    " (a killed multiprocessing child), a lock or a peer that never answers."),
    Rule(category="lost", reasons=("lost",), classes=("HeartbeatLost",),
         retryable=True, pattern="heartbeats stopped past the grace period",
         suggestion="Check the host and the process were alive and not hung, then rerun."),
    Rule(category="dependency",
         messages=(r"driver (?:on your system )?is too old", r"driver version is insufficient",
                   r"no kernel image is available", r"found no NVIDIA driver",
                   r"not compiled with CUDA", r"undefined symbol",
                   r"cannot open shared object file", r"version `GLIBC\w*_[\d.]+' not found",
                   r"CUDA driver initialization failed", r"compiled using NumPy \d",
                   r"Error building extension"),
         retryable=False, pattern="GPU driver, CUDA build or native library mismatch",
         suggestion="Match the driver, CUDA and the package builds (nvidia-smi, pip list)."),
    Rule(category="signal", signals=_NATIVE,
         exit_codes=(132, 134, 135, 136, 139, -4, -6, -7, -8, -11),
         messages=(r"(?<!by a )segmentation fault", r"core dumped", r"Fatal Python error",
                   r"illegal instruction", r"floating point exception", r"\bbus error\b"),
         retryable=False, pattern="native crash (SIGSEGV/SIGABRT/SIGBUS/SIGILL/SIGFPE)",
         suggestion="A native crash repeats: read crash.log for the stack, suspect extensions."),
    Rule(category="interrupted",
         messages=(r"\*\*\* (?:JOB|STEP) \S+ (?:ON \S+ )?CANCELLED AT \S+ \*\*\*",),
         retryable=True, pattern="cancelled in the batch scheduler (scancel)",
         suggestion="Someone cancelled the job: resubmit it if that was not meant."),
    Rule(category="signal", signals=_KILLED, exit_codes=(129, 137, 143, -1, -9, -15),
         retryable=True, pattern="killed from outside (SIGKILL/SIGTERM/SIGHUP)",
         suggestion="Likely preempted; check dmesg for an OOM kill before simply rerunning."),
    Rule(category="signal", class_prefixes=("Signal:",),
         retryable=False, pattern="ended by another signal",
         suggestion="Read the run's crash.log to see what raised the signal before rerunning."),
    Rule(category="signal", classes=("ProcessExited",),
         retryable=True, pattern="process exited without reporting",
         suggestion="Read the run's crash.log and the kernel log (dmesg) for an OOM kill."),
    Rule(category="disk",
         messages=(r"\[Errno 28\]", r"no space left on device", r"\[Errno 122\]",
                   r"quota exceeded", r"\bENOSPC\b", r"\bEDQUOT\b", r"file write failed",
                   r"failed writing file", r"not enough (?:disk )?space",
                   r"insufficient disk space"),
         retryable=False, pattern="disk full or over quota",
         suggestion="Free space or raise the quota where it writes (df -h, quota), then rerun."),
    Rule(category="permission", classes=("PermissionError", "GatedRepoError"),
         messages=(r"\[Errno 13\]", r"permission denied", r"\[Errno 1\] Operation not permitted",
                   r"\[Errno 30\]", r"read-only file system", r"\bEACCES\b",
                   r"\b401 Client Error", r"\b403 Client Error", r"\bUnauthorized\b",
                   r"gated repo"),
         retryable=False, pattern="not allowed: file permissions or credentials",
         suggestion="Fix the owner/mode of the path, or the credentials (token) it names."),
    Rule(category="resource",
         messages=(r"database is locked", r"resource temporarily unavailable", r"\[Errno 11\]",
                   r"busy or unavailable", r"device or resource busy",
                   r"address already in use", r"\[Errno 98\]"),
         retryable=True, pattern="a shared resource was busy or locked",
         suggestion="Another process held it; rerun, and stop concurrent runs sharing it."),
    Rule(category="resource",
         messages=(r"\[Errno 24\]", r"too many open files", r"can't start new thread",
                   r"\[Errno 23\]", r"No CUDA GPUs are available"),
         retryable=False, pattern="an OS or machine limit was reached (open files, threads, GPUs)",
         suggestion="Raise the limit (ulimit -n / -u) or use fewer workers; as is it fails "
                    "again."),
    Rule(category="network", classes=("SSLCertVerificationError",),
         messages=(r"CERTIFICATE_VERIFY_FAILED", r"certificate verify failed"),
         retryable=False, pattern="TLS certificate not trusted",
         suggestion="Install the CA certificates, or point SSL_CERT_FILE/REQUESTS_CA_BUNDLE "
                    "at them."),
    Rule(category="network",
         classes=("ConnectionError", "ConnectionResetError", "ConnectionRefusedError",
                  "ConnectionAbortedError", "BrokenPipeError", "RemoteDisconnected",
                  "IncompleteRead"),
         messages=(r"connection (?:reset|refused|aborted)", r"broken pipe",
                   r"network is unreachable", r"no route to host",
                   r"remote end closed connection", r"(?:couldn't|could not) connect to"),
         retryable=True, pattern="connection dropped or refused",
         suggestion="Likely transient: rerun, with retries and backoff around the remote call."),
    Rule(category="network", classes=("gaierror", "herror", "NameResolutionError"),
         messages=(r"temporary failure in name resolution", r"name or service not known",
                   r"nodename nor servname", r"getaddrinfo failed", r"failed to resolve"),
         retryable=True, pattern="DNS lookup failed",
         suggestion="Check the host name and the node's DNS, then rerun."),
    Rule(category="network",
         classes=("MaxRetryError", "NewConnectionError", "ProtocolError", "ReadTimeout",
                  "ConnectTimeout", "ReadTimeoutError", "ConnectTimeoutError",
                  "ChunkedEncodingError", "ClientConnectorError", "ServerDisconnectedError"),
         retryable=True, pattern="HTTP client gave up (urllib3/requests/aiohttp)",
         suggestion="Likely transient: rerun, with retries and backoff around the remote call."),
    Rule(category="network",
         messages=(r"\b5\d\d (?:server error|internal server error|bad gateway"
                   r"|service unavailable|gateway time-?out)\b",
                   r"\b(?:http|status(?:[ _]code)?)(?: error)?[:=]? ?5\d\d\b",
                   r"service unavailable", r"bad gateway", r"too many requests"),
         retryable=True, pattern="server busy or down (HTTP 5xx/429)",
         suggestion="The remote service was failing; rerun later, with backoff."),
    Rule(category="network",
         messages=(r"NCCL error", r"\bnccl(?:System|Remote|Internal)Error\b",
                   r"NCCL communicator was aborted"),
         retryable=True, pattern="NCCL communication error between ranks",
         suggestion="Check the nodes' interconnect (NCCL_DEBUG=INFO shows which link), then "
                    "rerun."),
    Rule(category="timeout",
         messages=(r"\btimed out\b", r"\bdeadline exceeded\b", r"\bsocket timeout\b",
                   r"\btimeout (?:error|exceeded|expired|reached)\b"),
         retryable=True, pattern="'timed out' in the message",
         suggestion="Rerun; if it recurs, raise the timeout or find what it waited on."),
    Rule(category="dependency", classes=("ModuleNotFoundError", "ImportError"),
         messages=(r"no module named", r"cannot import name", r"dll load failed",
                   r"no matching distribution found",
                   r"could not find a version that satisfies"),
         retryable=False, pattern="missing or mismatched package",
         suggestion="Install or pin the package named in the message in the run's environment."),
    Rule(category="validation", classes=("InvalidParameterError", "ValidationError"),
         retryable=False, pattern="a parameter out of its allowed range or type",
         suggestion="Fix the parameter the message names; a rerun as is fails."),
    Rule(category="numerical",
         classes=("FloatingPointError", "ZeroDivisionError", "OverflowError"),
         messages=(_NAN, r"non-?finite", r"division by zero", r"overflow encountered"),
         retryable=False, pattern="NaN/inf or arithmetic error",
         suggestion="Lower the learning rate, clip gradients or check inputs for NaN/inf."),
    Rule(category="validation",
         messages=(r"Error\(s\) in loading state_dict", r"size mismatch for \S+: copying a param",
                   r"(?:Missing|Unexpected) key\(s\) in state_dict"),
         retryable=False, pattern="checkpoint does not fit the model (state_dict mismatch)",
         suggestion="Load it into the model config it was saved from, or convert it first."),
    Rule(category="bug",
         classes=("AttributeError", "NameError", "UnboundLocalError", "IndexError",
                  "RecursionError", "NotImplementedError", "AssertionError"),
         messages=(r"'NoneType' object", r"object is not (?:subscriptable|callable|iterable)",
                   r"unsupported operand type", r"missing \d+ required positional argument",
                   r"shapes cannot be multiplied", r"must match the size of tensor",
                   r"size mismatch, m1", r"expected all tensors to be on the same device",
                   r"device-side assert triggered", r"illegal memory access",
                   r"index out of (?:range|bounds)", r"(?:too many|not enough) values to unpack",
                   r"could not be broadcast", r"to have \d+ channels, but got",
                   r"batch_size \(\d+\) to match", r"expected (?:object of )?scalar type"),
         retryable=False, pattern="a bug in the program (name, type, index or shape)",
         suggestion="Fix the code at the innermost frame of the traceback; as is it fails "
                    "again."),
    Rule(category="validation",
         classes=("ValueError", "TypeError", "KeyError", "FileNotFoundError",
                  "NotADirectoryError", "IsADirectoryError", "JSONDecodeError",
                  "UnicodeDecodeError", "EOFError", "BadZipFile", "UnpicklingError"),
         messages=(r"\binvalid\b", r"\bexpected\b.{0,200}?\bgot\b",
                   r"no such file or directory"),
         retryable=False, pattern="bad input, config or parameter",
         suggestion="Fix the input, config or parameter the message names; a rerun as is fails."),
    Rule(category="unknown", fallback=True,
         retryable=False, pattern="no rule matched",
         suggestion="Read the traceback (runnerctl show); add a rule here if it recurs."),
)
# fmt: on


def _check_table(rules: tuple[Rule, ...]) -> None:
    """Keep the table's invariants: one catch-all, last; patterns tell rules apart."""
    if not rules[-1].fallback or any(rule.fallback for rule in rules[:-1]):
        raise ValueError("the table must end with exactly one fallback rule")
    if len({rule.pattern for rule in rules}) != len(rules):
        raise ValueError("two rules share a pattern")


_check_table(RULES)
