"""Chain-loading, as qmail's tools do it: replace this process with the next program.

execvpe(3) without `os` (relaylock and poplock-logauth run once per connection and keep
their imports small): $PATH is searched like a shell does.
"""

import posix


def execute(program: list[str], environment: dict) -> str:
    """Exec `program`; returns only when nothing could be executed, with the reason."""
    name = program[0]
    if "/" in name:
        candidates = [name]
    else:
        path = environment.get(b"PATH", b"/usr/local/bin:/usr/bin:/bin").decode("utf-8", "replace")
        candidates = [f"{directory or '.'}/{name}" for directory in path.split(":")]
    error = None
    for candidate in candidates:
        try:
            posix.execve(candidate, program, environment)
        except OSError as failure:
            if error is None or failure.errno != 2:  # keep the most telling error (not ENOENT)
                error = failure
    return error.strerror if error is not None else "not found"
