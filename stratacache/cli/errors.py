"""The one exception type commands raise for a failure the user must fix."""


class CliError(Exception):
    """Printed as a single line without a traceback; ``status`` is the exit code.

    Status 2 means wrong usage (bad argument), 1 anything else (missing file,
    invalid config, a failed step).
    """

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status
