"""Errors a user can meet: each carries one sentence naming the file or field and what to do."""


class UserError(Exception):
    """Bad input the user can fix; the CLI prints the sentence alone and exits with code 2."""

    exit_code = 2


class BadModelFile(UserError):
    """A model file that cannot be read as what it claims to be (truncated, malformed, unsafe)."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class WorkFailed(Exception):
    """The work itself failed (disk full, cancelled); the CLI exits with code 1."""

    exit_code = 1


class Cancelled(WorkFailed):
    """The user asked long work to stop; whatever was being written has been removed."""
